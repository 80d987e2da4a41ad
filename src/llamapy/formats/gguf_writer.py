"""Write GGUF files from metadata and tensors (float, or already-quantized ggml blocks).

A thin layer over gguf-py's `GGUFWriter` (the format's own library): it adds typed metadata
from plain Python values, tensors given as torch / numpy arrays or `QTensor`s (quantized here
with llamapy's quantizer when asked for another type), and tensors made only when written
(`PendingTensor`), so a large model never has to sit in memory whole.

    write_gguf("out.gguf", "llama", {"llama.block_count": 2, ...}, [
        ("token_embd.weight", torch.randn(32, 64), QuantType.Q8_0),   # floats -> quantized
        ("output_norm.weight", np.ones(64, np.float32), None),         # kept as F32
        ("blk.0.attn_q.weight", qtensor, None),                         # blocks as they are
        ("blk.0.ffn_up.weight", PendingTensor((128, 64), make), QuantType.Q4_0),
    ])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from gguf import GGUFValue, GGUFValueType, GGUFWriter, Keys

from llamapy.quant.quantize import quantize
from llamapy.quant.types import FLOAT_TYPES, INT_TYPES, QuantType, row_nbytes

# GGUF array element types of numpy dtypes (as GGUFFile reads them back).
_ARRAY_TYPES: dict[np.dtype, GGUFValueType] = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
    np.dtype(np.bool_): GGUFValueType.BOOL,
}
# The ggml type a float or integer tensor keeps when no type is asked for.
_NATURAL_TYPES: dict[torch.dtype, QuantType] = {
    torch.float32: QuantType.F32,
    torch.float64: QuantType.F32,  # ggml has F64, but no model stores weights in it
    torch.float16: QuantType.F16,
    torch.bfloat16: QuantType.BF16,
    torch.int8: QuantType.I8,
    torch.int16: QuantType.I16,
    torch.int32: QuantType.I32,
    torch.int64: QuantType.I64,
}
_INT_DTYPES = {
    QuantType.I8: torch.int8,
    QuantType.I16: torch.int16,
    QuantType.I32: torch.int32,
    QuantType.I64: torch.int64,
}


@runtime_checkable
class QTensorLike(Protocol):
    """Raw ggml blocks with their type and logical shape (e.g. `llamapy.quant.QTensor`)."""

    data: torch.Tensor
    qtype: QuantType
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PendingTensor:
    """A tensor of logical `shape` made only when it is written: `make()` returns its data
    (anything `write_gguf` accepts as a tensor, except another PendingTensor)."""

    shape: tuple[int, ...]
    make: Callable[[], Any]


TensorData = torch.Tensor | np.ndarray | QTensorLike | PendingTensor
TensorEntry = tuple[str, TensorData, QuantType | None]


# -- metadata ---------------------------------------------------------------------------------


def _scalar_type(value: Any, key: str) -> GGUFValueType:
    """The GGUF type a plain Python value gets: ints as the standard keys are (UINT32 when it
    fits), floats FLOAT32, as llama.cpp's converters write them."""
    if isinstance(value, bool | np.bool_):
        return GGUFValueType.BOOL
    if isinstance(value, int | np.integer):
        v = int(value)
        if 0 <= v < 2**32:
            return GGUFValueType.UINT32
        if -(2**31) <= v < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if v > 0 else GGUFValueType.INT64
    if isinstance(value, float | np.floating):
        return GGUFValueType.FLOAT32
    if isinstance(value, str | bytes):
        return GGUFValueType.STRING
    raise ValueError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _array_value(value: Any, key: str) -> GGUFValue:
    if isinstance(value, np.ndarray):
        sub = _ARRAY_TYPES.get(value.dtype.newbyteorder("="))
        if sub is None:
            raise ValueError(f"metadata {key!r}: no GGUF array type for numpy {value.dtype}")
        items = value.tolist()
    else:
        items = list(value)
        if not items:
            raise ValueError(f"metadata {key!r}: GGUF arrays cannot be empty")
        # Lists of ints are INT32 arrays, as gguf-py writes token types.
        kinds = {GGUFValueType.get_type(x) if not isinstance(x, bool) else None for x in items}
        if kinds == {None}:
            sub = GGUFValueType.BOOL
        elif len(kinds) == 1:
            sub = kinds.pop()
        elif kinds == {GGUFValueType.INT32, GGUFValueType.FLOAT32}:
            sub, items = GGUFValueType.FLOAT32, [float(x) for x in items]
        else:
            raise ValueError(f"metadata {key!r}: array items must all be of one type")
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"metadata {key!r}: nested arrays are not supported")
    if not items:
        raise ValueError(f"metadata {key!r}: GGUF arrays cannot be empty")
    return GGUFValue(items, GGUFValueType.ARRAY, sub)


def _typed_value(key: str, value: Any, vtype: GGUFValueType | None) -> GGUFValue:
    if isinstance(value, GGUFValue):
        return value
    if vtype == GGUFValueType.ARRAY or (
        vtype is None and isinstance(value, list | tuple | np.ndarray)
    ):
        return _array_value(value, key)
    if isinstance(value, np.generic):
        value = value.item()
    return GGUFValue(value, vtype if vtype is not None else _scalar_type(value, key))


# -- tensors ----------------------------------------------------------------------------------


def _as_torch(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(data))
    return data.detach().cpu()


def _to_blocks(name: str, data: Any, qtype: QuantType | None) -> tuple[torch.Tensor, QuantType]:
    """Any accepted tensor -> (raw uint8 rows `(*shape[:-1], row_nbytes)`, its ggml type)."""
    if isinstance(data, QTensorLike) and not isinstance(data, torch.Tensor):
        if qtype is None or qtype == data.qtype:
            return data.data.detach().cpu(), data.qtype
        data = data.dequantize()  # a conversion between types goes through float32
    if not isinstance(data, torch.Tensor | np.ndarray):
        raise ValueError(f"tensor {name!r}: expected a tensor, array or QTensor, got {data!r}")
    t = _as_torch(data)
    if t.dim() == 0:
        raise ValueError(f"tensor {name!r} is 0-dimensional; give it a shape")
    if t.dtype == torch.uint8:
        if qtype is None:
            raise ValueError(f"tensor {name!r}: raw uint8 blocks need their ggml type")
        return t, qtype
    natural = _NATURAL_TYPES.get(t.dtype)
    if natural is None:
        raise ValueError(f"tensor {name!r}: cannot store torch dtype {t.dtype}")
    qtype = natural if qtype is None else qtype
    if qtype in INT_TYPES:
        return t.to(_INT_DTYPES[qtype]).contiguous().view(torch.uint8), qtype
    if not t.is_floating_point():
        raise ValueError(f"tensor {name!r}: integer data cannot be stored as {qtype.name}")
    if qtype == QuantType.F64:
        return t.to(torch.float64).contiguous().view(torch.uint8), qtype
    if qtype in FLOAT_TYPES and t.dtype == _float_dtype(qtype):
        return t.contiguous().view(torch.uint8), qtype  # the bytes as they are (NaN payloads too)
    return quantize(t, qtype), qtype


def _float_dtype(qtype: QuantType) -> torch.dtype:
    return {
        QuantType.F32: torch.float32,
        QuantType.F16: torch.float16,
        QuantType.BF16: torch.bfloat16,
    }[qtype]


def _logical_shape(name: str, blocks: torch.Tensor, qtype: QuantType) -> tuple[int, ...]:
    from gguf.quants import quant_shape_from_byte_shape

    try:
        return tuple(quant_shape_from_byte_shape(tuple(blocks.shape), qtype))
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None


@dataclass(slots=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    qtype: QuantType
    blocks: torch.Tensor | None  # None: made by `pending` at write time
    pending: Callable[[], Any] | None = None


def _entry(name: str, data: TensorData, qtype: QuantType | None) -> _Entry:
    if isinstance(data, PendingTensor):
        if qtype is None:
            raise ValueError(f"tensor {name!r}: a PendingTensor needs its ggml type")
        shape = tuple(int(d) for d in data.shape)
        row_nbytes(qtype, shape[-1])  # fails now, not half-way through the file
        return _Entry(name, shape, qtype, None, data.make)
    blocks, qtype = _to_blocks(name, data, qtype)
    return _Entry(name, _logical_shape(name, blocks, qtype), qtype, blocks)


def _materialize(entry: _Entry) -> np.ndarray:
    blocks = entry.blocks
    if blocks is None:
        assert entry.pending is not None
        blocks, qtype = _to_blocks(entry.name, entry.pending(), entry.qtype)
        shape = _logical_shape(entry.name, blocks, qtype)
        if qtype != entry.qtype or shape != entry.shape:
            raise ValueError(
                f"tensor {entry.name!r}: made {qtype.name} {shape}, declared "
                f"{entry.qtype.name} {entry.shape}"
            )
    return blocks.contiguous().numpy()


# -- the file ---------------------------------------------------------------------------------


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    metadata: Mapping[str, Any],
    tensors: Iterable[TensorEntry],
    *,
    metadata_types: Mapping[str, GGUFValueType] | None = None,
) -> Path:
    """Write a GGUF v3 file; returns its path. The file appears whole or not at all.

    Args:
        path: the output file (replaced if it exists).
        arch: `general.architecture` (written first, as llama.cpp's converters do).
        metadata: key -> value, in the order to write. Values: bool, int (UINT32 when it fits
            in one, else INT32 / INT64 / UINT64), float (FLOAT32), str, list / tuple (an array;
            ints are INT32, as gguf-py writes token types), a numpy array (its dtype gives the
            element type), or a `gguf.GGUFValue` for an explicit type. `general.alignment`
            sets the data alignment.
        tensors: `(name, data, qtype)` in file order. `data` is a QTensor (its blocks as they
            are; requantized through float32 if `qtype` names another type), a float tensor
            or array (quantized to `qtype` with llamapy's quantizer; `qtype=None` keeps F32 /
            F16 / BF16), a uint8 tensor or array of raw blocks `(*shape[:-1], row_bytes)` of
            `qtype`, an integer tensor (I8..I64), or a `PendingTensor` (made when written).
        metadata_types: GGUF value types by key (e.g. `GGUFFile.metadata_types`), which
            override the inferred ones.

    Raises:
        ValueError: a value or tensor that GGUF cannot hold as given.
    """
    path = Path(path)
    types = metadata_types or {}
    writer = GGUFWriter(None, arch)
    for key, value in metadata.items():
        if key == Keys.General.ARCHITECTURE:
            if value != arch:
                raise ValueError(f"metadata {key!r} is {value!r} but arch is {arch!r}")
            continue
        if key == Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(value))
            continue
        typed = _typed_value(key, value, types.get(key))
        writer.add_key_value(key, typed.value, typed.type, typed.sub_type)
    entries = [_entry(name, data, qtype) for name, data, qtype in tensors]
    for e in entries:
        nbytes = row_nbytes(e.qtype, e.shape[-1]) * int(np.prod(e.shape[:-1], dtype=np.int64))
        writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), nbytes, raw_dtype=e.qtype)
    tmp = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in entries:
            writer.write_tensor_data(_materialize(e))
            e.blocks = None  # let it go as soon as it is written
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
