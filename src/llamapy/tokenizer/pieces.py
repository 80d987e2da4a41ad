"""Token ids -> bytes, as llama.cpp's `token_to_piece` and `detokenize` produce them."""

from __future__ import annotations

import re

from llamapy.tokenizer.vocab import TokenAttr, Vocab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _decode_byte_level(text: str) -> bytes:
    """`llama_decode_text`: map each character back to its byte."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            if c in UNICODE_TO_BYTE:
                out.append(UNICODE_TO_BYTE[c])
            else:  # llama.cpp's (odd) marker for a character outside the byte map
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
        return bytes(out)


def piece_table(vocab: Vocab, byte_level: bool) -> list[bytes]:
    """Each token's piece with special=True (llama.cpp's cache_token_to_piece)."""
    shown = TokenAttr.CONTROL | TokenAttr.UNKNOWN | TokenAttr.USER_DEFINED
    pieces: list[bytes] = []
    display = vocab.display or vocab.tokens
    for text, shown_text, attr in zip(vocab.tokens, display, vocab.attrs, strict=True):
        if attr & shown:
            pieces.append(text.encode())
        elif attr & TokenAttr.NORMAL:
            text = shown_text
            if byte_level:
                pieces.append(_decode_byte_level(text))
            else:  # SPM, WPM and SPM-style BPE: ▁ stands for a space
                pieces.append(text.replace("▁", " ").encode())
        elif attr & TokenAttr.BYTE:
            pieces.append(bytes([int(text[3:5], 16)]))
        else:
            pieces.append(b"")
    return pieces


_PUNCT_SPACE = re.compile(rb" (?=[?!.,])")
_QUOTE_SPACES = re.compile(rb" ' ")
_CONTRACTION_SPACE = re.compile(rb" '(?=[sm]|re|ve)")


def clean_spaces(text: bytes) -> bytes:
    """The three clean-up passes at the end of `llama_vocab::impl::detokenize`."""
    text = _PUNCT_SPACE.sub(b"", text)  # " ?", " !", " .", " ,"
    text = _QUOTE_SPACES.sub(b"'", text)  # " ' "
    return _CONTRACTION_SPACE.sub(b"'", text)  # " 's", " 'm", " 're", " 've"
