"""`Tokenizer`: text -> token ids -> text with llama.cpp's semantics (`llama_tokenize`,
`llama_detokenize`), on top of the Rust `tokenizers` library."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from llamapy.errors import LlamapyError
from llamapy.tokenizer.backend import build_backend
from llamapy.tokenizer.pieces import clean_spaces, piece_table
from llamapy.tokenizer.special import Fragment, SpecialSplitter
from llamapy.tokenizer.vocab import TokenAttr, Vocab, vocab_from_gguf

_NEWLINE_RUNS = re.compile(r"(\n+)")


class TokenIdError(LlamapyError, ValueError):
    """A token id outside the vocabulary."""


class Tokenizer:
    """A model's tokenizer. Build it with `from_gguf`, `from_hf` or `from_path`."""

    def __init__(self, vocab: Vocab, backend: _Backend, *, hf_pipeline: bool = False) -> None:
        self.vocab = vocab
        self._backend = backend
        self._splitter = SpecialSplitter(vocab)
        # HF folders run tokenizer.json's own normalizer (space prefix, ▁ escaping).
        self._hf_pipeline = hf_pipeline
        self._byte_level = vocab.kind == "bpe" and (vocab.pre is None or vocab.pre.byte_encode)
        self._pieces: list[bytes] | None = None
        self._visible: list[bytes] | None = None

    # construction

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata (`GGUFFile(path).metadata`)."""
        vocab = vocab_from_gguf(metadata)
        return cls(vocab, build_backend(vocab))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        from llamapy.formats import GGUFFile

        return cls.from_metadata(GGUFFile(path).metadata)

    @classmethod
    def from_hf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a Hugging Face folder's tokenizer.json (+ tokenizer_config.json)."""
        from llamapy.tokenizer.hf import vocab_and_backend_from_hf

        vocab, backend = vocab_and_backend_from_hf(Path(path))
        return cls(vocab, backend, hf_pipeline=True)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a `.gguf` file or a Hugging Face folder."""
        return cls.from_hf(path) if Path(path).is_dir() else cls.from_gguf(path)

    # properties

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def bos_id(self) -> int | None:
        return self.vocab.ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.vocab.ids.get("eos")

    @property
    def eog_ids(self) -> frozenset[int]:
        """End-of-generation tokens (llama_vocab_is_eog)."""
        return self.vocab.eog_ids

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    def is_special(self, token_id: int) -> bool:
        """Control or unknown: hidden when decoding with skip_special."""
        return bool(self.vocab.attrs[self._check(token_id)] & _HIDDEN)

    def id_to_piece(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (llama_vocab_get_text)."""
        return self.vocab.tokens[self._check(token_id)]

    def piece_to_id(self, piece: str) -> int | None:
        return self.vocab.token_to_id.get(piece)

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """What the token decodes to on its own (llama_token_to_piece, lstrip 0)."""
        self._check(token_id)
        return (self.pieces if special else self.visible_pieces)[token_id]

    @property
    def pieces(self) -> list[bytes]:
        if self._pieces is None:
            self._pieces = piece_table(self.vocab, self._byte_level)
        return self._pieces

    @property
    def visible_pieces(self) -> list[bytes]:
        """`pieces` with control and unknown tokens as b"" (decoding with skip_special),
        built once: the per-token test of an enum flag costs more than the lookup."""
        if self._visible is None:
            hidden = int(_HIDDEN)  # a plain int: IntFlag's & is a Python call per token
            attrs = self.vocab.attrs
            self._visible = [b"" if attrs[i] & hidden else p for i, p in enumerate(self.pieces)]
        return self._visible

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab.size:
            raise TokenIdError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab.size - 1})"
            )
        return token_id

    # encoding

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`, as `llama_tokenize(text, add_special, parse_special)`."""
        fragments = self._splitter.split(text, parse_special)
        vocab = self.vocab
        out: list[int] = []
        if add_special and self._adds_bos():
            out.append(self._required("bos"))
        out.extend(self._encode_fragments(fragments))
        if add_special:
            if vocab.kind == "wpm":
                out.append(self._required("sep"))
            elif vocab.add_eos:
                out.append(self._required("eos"))
        return out

    def encode_batch(
        self, texts: Sequence[str], add_special: bool = True, parse_special: bool = False
    ) -> list[list[int]]:
        return [self.encode(t, add_special, parse_special) for t in texts]

    def _adds_bos(self) -> bool:
        return self.vocab.kind == "wpm" or self.vocab.add_bos

    def _required(self, name: str) -> int:
        token_id = self.vocab.ids.get(name)
        if token_id is None:
            raise LlamapyError(f"the tokenizer must add a {name.upper()} token but has none")
        return token_id

    def _encode_fragments(self, fragments: list[Fragment]) -> list[int]:
        """Encode raw fragments in one batch; special ids pass through."""
        texts: list[str] = []
        slots: list[int | None] = []  # token id, or None for "next encoded text"
        is_prev_special = True  # SPM: a space prefix at the start and after specials
        for frag in fragments:
            if isinstance(frag, int):
                slots.append(frag)
                is_prev_special = True
                continue
            for piece in self._prepare(frag, is_prev_special):
                if isinstance(piece, int):
                    slots.append(piece)
                else:
                    texts.append(piece)
                    slots.append(None)
            is_prev_special = False
        encoded = self._run_backend(texts)
        out: list[int] = []
        k = 0
        for slot in slots:
            if slot is None:
                out.extend(encoded[k])
                k += 1
            else:
                out.append(slot)
        return out

    def _prepare(self, frag: str, is_prev_special: bool) -> list[str | int]:
        """A raw fragment as the backend must see it (llama_vocab::impl::tokenize)."""
        vocab = self.vocab
        if self._hf_pipeline or vocab.kind == "wpm":
            return [frag]
        if vocab.kind == "spm":
            if vocab.add_space_prefix and is_prev_special:
                frag = " " + frag
            return [frag.replace(" ", "▁")]
        if not vocab.escape_whitespaces:
            return [frag]
        # gemma4: ▁ for spaces, newline runs apart; a newline run that is a token is taken
        # whole (the "fix for gemma 4" in llm_tokenizer_bpe_session::tokenize).
        out: list[str | int] = []
        for run in _NEWLINE_RUNS.split(frag.replace(" ", "▁")):
            if not run:
                continue
            token_id = vocab.token_to_id.get(run) if run[0] == "\n" else None
            out.append(run if token_id is None else token_id)
        return out

    def _run_backend(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if len(texts) == 1:
            return [self._backend.encode(texts[0], add_special_tokens=False).ids]
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    # decoding

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        """As `llama_detokenize(ids, remove_special=skip_special, unparse_special=not skip)`."""
        ids = list(ids)
        for token_id in ids:
            self._check(token_id)
        vocab = self.vocab
        remove_space = vocab.add_space_prefix
        if skip_special and vocab.add_bos and ids and ids[0] == vocab.ids.get("bos"):
            remove_space = False
            ids = ids[1:]
        if skip_special and vocab.add_eos and ids and ids[-1] == vocab.ids.get("eos"):
            ids = ids[:-1]
        pieces = self.visible_pieces if skip_special else self.pieces
        parts = [pieces[i] for i in ids]
        if remove_space and parts and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        text = b"".join(parts)
        return clean_spaces(text) if vocab.clean_spaces else text

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        pre = f", pre={self.vocab.pre.name}" if self.vocab.pre else ""
        return f"Tokenizer(model={self.vocab.model}{pre}, vocab_size={self.vocab.size})"


_HIDDEN = TokenAttr.CONTROL | TokenAttr.UNKNOWN
