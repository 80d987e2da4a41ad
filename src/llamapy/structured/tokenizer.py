"""llamapy's Tokenizer as llguidance sees it: each token's bytes, the EOS ids, an encoder."""

from __future__ import annotations

import llguidance

from llamapy.tokenizer import Tokenizer
from llamapy.tokenizer.vocab import TokenAttr

# llguidance marks special tokens by a leading 0xFF byte (never valid UTF-8, so no text
# can produce it), as its llama.cpp bridge (llguidance.llamacpp) does
_SPECIAL_PREFIX = b"\xff"


class _Wrapper:
    """The duck type llguidance.TokenizerWrapper reads (tokens, ids, __call__)."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self._tokenizer = tokenizer
        eos = tokenizer.eos_id
        self.eos_token_id = eos if eos is not None else min(tokenizer.eog_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.tokens = token_bytes(tokenizer, n_vocab)
        self.special_token_ids = [
            i for i, t in enumerate(self.tokens) if t.startswith(_SPECIAL_PREFIX)
        ]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


def token_bytes(tokenizer: Tokenizer, n_vocab: int) -> list[bytes]:
    """Every token's bytes (llama_token_to_piece with special=True), special ones marked.

    Control tokens, and user-defined ones that look like them (`<...>`), are special: a
    grammar reaches them only by name (`<|im_end|>` in Lark), never through their text.
    Ids from the tokenizer's size to `n_vocab` (padding rows of the output matrix) are empty;
    ids past `n_vocab` (the model cannot produce them) are left out.
    """
    attrs = tokenizer.vocab.attrs
    out: list[bytes] = []
    for i, piece in enumerate(tokenizer.pieces):
        attr = attrs[i]
        looks_special = piece.startswith(b"<") and piece.endswith(b">")
        if attr & TokenAttr.CONTROL or (attr & TokenAttr.USER_DEFINED and looks_special):
            piece = _SPECIAL_PREFIX + piece
        out.append(piece)
    out.extend(b"" for _ in range(n_vocab - len(out)))
    return out[:n_vocab]


def build_ll_tokenizer(tokenizer: Tokenizer, n_vocab: int | None = None) -> llguidance.LLTokenizer:
    """An LLTokenizer over `n_vocab` ids (default: the tokenizer's size; pass the model's
    output width when it is padded); every end-of-generation token counts as EOS."""
    n = n_vocab if n_vocab is not None else tokenizer.vocab_size
    wrapper = _Wrapper(tokenizer, n)
    eos = sorted(t for t in tokenizer.eog_ids if t < n)  # llama_vocab_is_eog: EOS, EOT, ...
    if not eos:
        raise ValueError("structured output needs an end-of-generation token; the model has none")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=n, eos_token=eos)
