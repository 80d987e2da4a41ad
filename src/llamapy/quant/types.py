"""Quant types are gguf's own enum; this module adds block geometry and names."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llamapy.errors import ModelFormatError

QuantType = GGMLQuantizationType

# Types whose blocks are plain IEEE / bfloat16 numbers, one element per "block".
FLOAT_TYPES = frozenset({QuantType.F32, QuantType.F16, QuantType.BF16, QuantType.F64})
# Integer element types some GGUF files carry (rare; never weights of a matmul).
INT_TYPES = frozenset({QuantType.I8, QuantType.I16, QuantType.I32, QuantType.I64})


def block_size(qtype: QuantType) -> int:
    """Number of weights one block of `qtype` holds."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: QuantType) -> int:
    """Bytes one block of `qtype` takes."""
    return GGML_QUANT_SIZES[qtype][1]


def bits_per_weight(qtype: QuantType) -> float:
    return 8.0 * type_size(qtype) / block_size(qtype)


def row_nbytes(qtype: QuantType, n: int) -> int:
    """Bytes of a row of `n` weights; `n` must be a whole number of blocks."""
    bs = block_size(qtype)
    if n % bs:
        raise ModelFormatError(
            f"a row of {n} elements is not a whole number of {qtype.name} blocks of {bs}"
        )
    return n // bs * type_size(qtype)


def parse_quant_type(value: int | str | QuantType) -> QuantType:
    """A quant type from its gguf number or name (case-insensitive)."""
    if isinstance(value, QuantType):
        return value
    if isinstance(value, str):
        try:
            return QuantType[value.upper()]
        except KeyError:
            names = ", ".join(t.name for t in QuantType)
            raise ValueError(f"unknown quant type {value!r}; known: {names}") from None
    try:
        qtype = QuantType(value)
    except ValueError:
        raise ModelFormatError(f"unknown ggml type number {value}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise ModelFormatError(f"ggml type {qtype.name} has no known block size")
    return qtype
