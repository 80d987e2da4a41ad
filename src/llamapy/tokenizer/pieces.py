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


def utf8(text: str) -> bytes:
    """A token text's bytes: UTF-8, with the bytes a GGUF string could not decode back as
    they were (they arrive as U+DC80..U+DCFF, `surrogateescape`); any other lone surrogate
    (a JSON vocabulary can hold one) as its 3-byte form rather than an error."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # rare: character by character
        return b"".join(_utf8_char(c) for c in text)


def _utf8_char(c: str) -> bytes:
    try:
        return c.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return c.encode("utf-8", "surrogatepass")


# the same map as a str.translate table onto code points 0-255 (then latin-1 bytes)
_TO_LATIN1 = {ord(c): b for c, b in UNICODE_TO_BYTE.items()}
_MAPPED = frozenset(UNICODE_TO_BYTE)


def _decode_byte_level(text: str) -> bytes:
    """`llama_decode_text`: map each character back to its byte. Every character mapped
    (all but odd vocabularies): one translate and encode in C, not a Python step per
    character (with piece_table's int flags: SmolLM2's table 85 -> 23 ms, Gemma 3's 325 ->
    46 ms, built at the first generated token)."""
    if _MAPPED.issuperset(text):
        return text.translate(_TO_LATIN1).encode("latin-1")
    out = bytearray()
    for c in text:
        if c in UNICODE_TO_BYTE:
            out.append(UNICODE_TO_BYTE[c])
        else:  # llama.cpp's (odd) marker for a character outside the byte map
            out += b"[UNK_BYTE_0x" + utf8(c).hex().encode() + utf8(text) + b"]"
    return bytes(out)


def piece_table(vocab: Vocab, byte_level: bool) -> list[bytes]:
    """Each token's piece with special=True (llama.cpp's cache_token_to_piece)."""
    # plain ints: IntFlag's & is a Python call per token
    shown = int(TokenAttr.CONTROL | TokenAttr.UNKNOWN | TokenAttr.USER_DEFINED)
    normal, byte = int(TokenAttr.NORMAL), int(TokenAttr.BYTE)
    pieces: list[bytes] = []
    display = vocab.display or vocab.tokens
    for text, shown_text, flags in zip(vocab.tokens, display, vocab.attrs, strict=True):
        attr = int(flags)
        if attr & shown:
            pieces.append(utf8(text))
        elif attr & normal:
            text = shown_text
            if byte_level:
                pieces.append(_decode_byte_level(text))
            else:  # SPM, WPM and SPM-style BPE: ▁ stands for a space
                pieces.append(utf8(text.replace("▁", " ")))
        elif attr & byte:
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
