"""Helpers for tests that patch GGUF headers at known places."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFValueType

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


@dataclass
class HeaderLayout:
    tensor_name_spans: list[tuple[int, int]] = field(default_factory=list)
    tensor_type_positions: list[int] = field(default_factory=list)
    tensor_offset_positions: list[int] = field(default_factory=list)
    data_offset: int = 0


def header_layout(path: Path) -> HeaderLayout:
    """Byte positions of the tensor-info fields of a valid GGUF v3 file (a test-side parser)."""
    buf = path.read_bytes()
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
    pos += 16

    def skip_value(vtype: int, pos: int) -> int:
        if vtype == GGUFValueType.STRING:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return pos + 8 + n
        if vtype == GGUFValueType.ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            for _ in range(count):
                pos = skip_value(etype, pos)
            return pos
        return pos + _SCALAR_SIZES[GGUFValueType(vtype)]

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos = skip_value(vtype, pos + 4)
    layout = HeaderLayout()
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", buf, pos)
        layout.tensor_name_spans.append((pos + 8, n))
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * n_dims
        layout.tensor_type_positions.append(pos)
        pos += 4
        layout.tensor_offset_positions.append(pos)
        pos += 8
    layout.data_offset = -(-pos // 32) * 32
    return layout
