"""Read GGUF files: metadata and zero-copy tensor views of the memory-mapped file.

The layout, type numbers and names come from gguf-py (llama.cpp's own Python library):
`GGUFValueType`, `GGMLQuantizationType`, `GGML_QUANT_SIZES`, `GGUF_MAGIC`. The header is
parsed here rather than with `gguf.GGUFReader` because that reader builds a numpy view per
field part (10 s for Gemma 3's 262k-token vocabulary) and trusts every length it reads.
This parser checks each count and length against the bytes that remain before using it, so
a corrupt or hostile file fails fast with a `ModelFormatError` and never makes us allocate
what the header claims. The checks mirror llama.cpp's `gguf_init_from_file_impl`.
`gguf.GGUFReader` remains the test oracle for this module.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFValueType, Keys

from llamapy.config import ModelConfig, config_from_gguf
from llamapy.errors import ModelFormatError
from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType, row_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
ALIGNMENT_KEY = "general.alignment"

# struct format of each scalar value type, little-endian.
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """Where one tensor lies in the file. `shape` is in torch order (GGUF `ne` reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: QuantType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads over a bytes-like buffer."""

    __slots__ = ("buf", "pos", "end", "what")

    def __init__(self, buf: memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf)
        self.what = "header"

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise ModelFormatError(
                f"truncated GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.end} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        # surrogateescape keeps a stray invalid byte instead of failing the whole file.
        return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, count: int, what: str) -> list[str]:
        # Each string takes at least its 8-byte length: bound the count before looping.
        self.need(count * 8, what)
        unpack, buf = struct.unpack_from, self.buf
        out: list[str] = []
        pos, end = self.pos, self.end
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                self.need(n, what)
            out.append(bytes(buf[pos : pos + n]).decode("utf-8", errors="surrogateescape"))
            pos += n
        self.pos = pos
        return out


def _value_type(raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ModelFormatError(f"metadata key {key!r} has unknown value type {raw}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, key: str, depth: int = 0) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    if vtype != GGUFValueType.ARRAY:
        value = cur.scalar(_SCALAR_FORMATS[vtype], f"value of {key!r}")
        return bool(value) if vtype == GGUFValueType.BOOL else value
    if depth > 0:
        # gguf allows nested arrays in principle; llama.cpp refuses them, and so do we.
        raise ModelFormatError(f"metadata key {key!r} holds a nested array")
    etype = _value_type(cur.u32(f"array type of {key!r}"), key)
    count = cur.u64(f"array length of {key!r}")
    if etype == GGUFValueType.STRING:
        return cur.strings(count, f"string array {key!r}")
    if etype == GGUFValueType.ARRAY:
        raise ModelFormatError(f"metadata key {key!r} holds a nested array")
    dtype = np.dtype(_NUMPY_DTYPES[etype])
    cur.need(count * dtype.itemsize, f"array {key!r} of {count} {etype.name}")
    arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos).copy()
    cur.pos += count * dtype.itemsize
    return arr


def _read_metadata(cur: _Cursor, kv_count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    # A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
    cur.need(kv_count * 13, f"{kv_count} metadata entries")
    metadata: dict[str, Any] = {}
    types: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string("metadata key")
        if key in metadata:
            raise ModelFormatError(f"duplicate metadata key {key!r}")
        vtype = _value_type(cur.u32(f"value type of {key!r}"), key)
        metadata[key] = _read_value(cur, vtype, key)
        types[key] = vtype
    return metadata, types


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], QuantType, int]:
    name = cur.string("tensor name")
    n_dims = cur.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise ModelFormatError(f"tensor {name!r} has {n_dims} dimensions (allowed: 1 to 4)")
    ne = [cur.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
    raw_type = cur.u32(f"type of tensor {name!r}")
    try:
        qtype = QuantType(raw_type)
    except ValueError:
        raise ModelFormatError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise ModelFormatError(f"tensor {name!r} has ggml type {qtype.name} of unknown size")
    offset = cur.u64(f"data offset of tensor {name!r}")
    return name, tuple(reversed(ne)), qtype, offset


def _tensor_nbytes(name: str, shape: tuple[int, ...], qtype: QuantType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    ne0 = shape[-1]
    if ne0 % block:
        raise ModelFormatError(
            f"tensor {name!r}: row length {ne0} is not a multiple of the {qtype.name} "
            f"block size {block}"
        )
    rows = 1
    for d in shape[:-1]:
        rows *= d
    nbytes = rows * (ne0 // block) * size
    if nbytes >= 1 << 62:  # overflow guard as in gguf_init_from_file_impl
        raise ModelFormatError(f"tensor {name!r} has an absurd size {shape}")
    return nbytes


class GGUFFile:
    """A GGUF file opened read-only: metadata, tensor infos, zero-copy tensor views."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size < 8:
                    raise ModelFormatError(
                        f"{self.path} is not a GGUF file: only {self.file_size} bytes"
                    )
                magic = f.read(4)
                if magic != GGUF_MAGIC:
                    raise ModelFormatError(
                        f"{self.path} is not a GGUF file (magic {magic!r}, expected b'GGUF')"
                    )
                # ACCESS_COPY: writable private pages, so torch views need no copy or warning.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise ModelFormatError(f"cannot read {self.path}: {e.strerror or e}") from None
        try:
            self._parse()
        except ModelFormatError as e:
            self.close()
            raise ModelFormatError(f"{self.path}: {e}") from None
        self._torch_buffer: torch.Tensor | None = None

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self._mmap), 4)
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            if self.version and self.version & 0xFFFF == 0:
                raise ModelFormatError("big-endian GGUF files are not supported")
            raise ModelFormatError(f"unsupported GGUF version {self.version} (supported: 2 and 3)")
        tensor_count = cur.u64("tensor count")
        kv_count = cur.u64("metadata count")
        self.metadata, self.metadata_types = _read_metadata(cur, kv_count)
        self.alignment = self._alignment()
        # A tensor info takes at least 8 (name) + 4 + 8 (one dim) + 4 + 8 bytes.
        cur.need(tensor_count * 32, f"{tensor_count} tensor infos")
        raw_infos = []
        seen: set[str] = set()
        for _ in range(tensor_count):
            info = _read_tensor_info(cur)
            if info[0] in seen:
                raise ModelFormatError(f"duplicate tensor name {info[0]!r}")
            seen.add(info[0])
            raw_infos.append(info)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensor_infos = self._place_tensors(raw_infos)

    def _alignment(self) -> int:
        alignment = self.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if (
            self.metadata_types.get(ALIGNMENT_KEY, GGUFValueType.UINT32) != GGUFValueType.UINT32
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise ModelFormatError(f"{ALIGNMENT_KEY} must be a power of two, got {alignment}")
        return alignment

    def _place_tensors(self, raw_infos: list) -> dict[str, GGUFTensorInfo]:
        data_size = self.file_size - self.data_offset
        infos: dict[str, GGUFTensorInfo] = {}
        for name, shape, qtype, offset in raw_infos:
            if offset % self.alignment:
                raise ModelFormatError(
                    f"tensor {name!r} data offset {offset} is not a multiple of the "
                    f"alignment {self.alignment}"
                )
            # ggml's dimensions are int64 and so is their product (gguf.c checks both),
            # even when another dimension is 0 and the tensor holds no bytes
            count = 1
            for dim in shape:
                count *= max(dim, 1)
                if dim >= 2**63 or count >= 2**63:
                    raise ModelFormatError(
                        f"tensor {name!r} shape {tuple(shape)} overflows 64-bit element counts"
                    )
            nbytes = _tensor_nbytes(name, shape, qtype)
            if offset + nbytes > data_size:
                raise ModelFormatError(
                    f"tensor {name!r} data ({nbytes} bytes at data offset {offset}) lies "
                    f"beyond the end of the file (truncated or corrupt)"
                )
            infos[name] = GGUFTensorInfo(name, shape, qtype, self.data_offset + offset, nbytes)
        return infos

    # -- access -------------------------------------------------------------------------

    def _buffer(self) -> torch.Tensor:
        if self._torch_buffer is None:
            self._torch_buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)
        return self._torch_buffer

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 view of the mapped file (no copy)."""
        info = self.tensor_infos.get(name)
        if info is None:
            raise KeyError(f"no tensor named {name!r} in {self.path.name}")
        return self._buffer()[info.offset : info.offset + info.nbytes]

    def tensor(self, name: str) -> QTensor:
        """The tensor as raw blocks (`QTensor`), a zero-copy view of the mapped file."""
        raw = self.raw(name)
        info = self.tensor_infos[name]
        data = raw.view(*info.shape[:-1], row_nbytes(info.qtype, info.shape[-1]))
        return QTensor(data, info.qtype, info.shape)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @functools.cached_property
    def config(self) -> ModelConfig:
        return config_from_gguf(self.metadata, set(self.tensor_infos))

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
        return template if isinstance(template, str) else None

    def release_pages(self) -> None:
        """Let the kernel drop the file's resident pages (after the weights were copied or
        repacked): the mapping stays valid and pages read later come back from the file.
        Nothing writes to the mapping, so no copy-on-write page is lost."""
        mm = getattr(self, "_mmap", None)
        if mm is not None and not mm.closed and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._torch_buffer = None
        mm = getattr(self, "_mmap", None)
        if mm is not None:
            # While tensor views still reference the mapping, it closes when they are freed.
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, "
            f"tensors={len(self.tensor_infos)}, metadata={len(self.metadata)})"
        )
