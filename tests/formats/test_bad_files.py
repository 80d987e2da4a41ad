"""Corrupt, truncated and hostile GGUF files fail fast with a ModelFormatError."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamapy.errors import LlamapyError, ModelFormatError
from llamapy.formats import GGUFFile, open_model_file
from tests_support import header_layout

# A corrupt header must never make the reader allocate what it claims.
MAX_ALLOC = 64 * 2**20


def _load(path: Path) -> GGUFFile | None:
    """Open and touch everything; return None on a clean ModelFormatError."""
    tracemalloc.start()
    try:
        f = GGUFFile(path)
        for name in f.tensor_infos:
            f.tensor(name)
        return f
    except ModelFormatError:
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MAX_ALLOC, f"reader allocated {peak} bytes"


def _write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_not_a_gguf_file(tmp_path: Path) -> None:
    p = _write(tmp_path, b"this is a text file, not a model\n" * 4)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        GGUFFile(p)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_tiny_file(tmp_path: Path, size: int) -> None:
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        GGUFFile(_write(tmp_path, b"GGUF\x03\x00\x00"[:size]))


def test_bad_magic(tiny_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[:4] = b"GGML"
    with pytest.raises(ModelFormatError, match="magic"):
        GGUFFile(_write(tmp_path, bytes(data)))


@pytest.mark.parametrize("version", [0, 1, 4, 0x7FFFFFFF])
def test_bad_version(tiny_gguf: Path, tmp_path: Path, version: int) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = struct.pack("<I", version)
    with pytest.raises(ModelFormatError, match="version"):
        GGUFFile(_write(tmp_path, bytes(data)))


def test_big_endian(tiny_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = struct.pack(">I", 3)
    with pytest.raises(ModelFormatError, match="big-endian"):
        GGUFFile(_write(tmp_path, bytes(data)))


@pytest.mark.parametrize("field", ["tensor_count", "kv_count"])
@pytest.mark.parametrize("value", [2**63 - 1, 2**64 - 1, 2**40, 10**6])
def test_absurd_counts(tiny_gguf: Path, tmp_path: Path, field: str, value: int) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    offset = 8 if field == "tensor_count" else 16
    data[offset : offset + 8] = struct.pack("<Q", value)
    assert _load(_write(tmp_path, bytes(data))) is None


def test_absurd_string_length(tiny_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[24:32] = struct.pack("<Q", 2**62)  # length of the first key
    with pytest.raises(ModelFormatError, match="truncated"):
        GGUFFile(_write(tmp_path, bytes(data)))


def test_truncated_in_tensor_data(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    with pytest.raises(ModelFormatError, match="beyond the end"):
        GGUFFile(_write(tmp_path, data[: len(data) - 100]))


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.1, 0.5])
def test_truncated_anywhere(tiny_gguf: Path, tmp_path: Path, fraction: float) -> None:
    data = tiny_gguf.read_bytes()
    assert _load(_write(tmp_path, data[: int(len(data) * fraction)])) is None


def test_tensor_offset_out_of_bounds(tiny_gguf: Path, tmp_path: Path) -> None:
    layout = header_layout(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    pos = layout.tensor_offset_positions[-1]
    data[pos : pos + 8] = struct.pack("<Q", 2**40)
    with pytest.raises(ModelFormatError, match="beyond the end"):
        GGUFFile(_write(tmp_path, bytes(data)))


def test_misaligned_tensor_offset(tiny_gguf: Path, tmp_path: Path) -> None:
    layout = header_layout(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    pos = layout.tensor_offset_positions[1]
    (offset,) = struct.unpack_from("<Q", data, pos)
    data[pos : pos + 8] = struct.pack("<Q", offset + 1)
    with pytest.raises(ModelFormatError, match="alignment"):
        GGUFFile(_write(tmp_path, bytes(data)))


def test_duplicate_tensor_name(tiny_gguf: Path, tmp_path: Path) -> None:
    layout = header_layout(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    # Rename tensor 2 to tensor 1's name where both names have the same length.
    (a, la), (b, lb) = layout.tensor_name_spans[3], layout.tensor_name_spans[4]
    assert la == lb, "fixture layout changed"
    data[b : b + lb] = data[a : a + la]
    with pytest.raises(ModelFormatError, match="duplicate tensor name"):
        GGUFFile(_write(tmp_path, bytes(data)))


def test_unknown_tensor_type(tiny_gguf: Path, tmp_path: Path) -> None:
    layout = header_layout(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    pos = layout.tensor_type_positions[0]
    data[pos : pos + 4] = struct.pack("<I", 250)
    with pytest.raises(ModelFormatError, match="unknown ggml type 250"):
        GGUFFile(_write(tmp_path, bytes(data)))


def test_unknown_architecture_is_named(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes().replace(b"llama", b"llamb", 1)
    model = open_model_file(_write(tmp_path, data))
    with pytest.raises(LlamapyError, match="'llamb'"):
        _ = model.config


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mutated_header_loads_or_fails_cleanly(tiny_gguf: Path, tmp_path: Path, data) -> None:
    raw = bytearray(tiny_gguf.read_bytes())
    header_end = header_layout(tiny_gguf).data_offset
    kind = data.draw(st.sampled_from(["byte", "u64", "u32", "truncate", "insert"]))
    pos = data.draw(st.integers(0, header_end - 1), label="pos")
    if kind == "byte":
        raw[pos] = data.draw(st.integers(0, 255))
    elif kind == "u64":
        value = data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]))
        raw[pos : pos + 8] = struct.pack("<Q", value)
    elif kind == "u32":
        raw[pos : pos + 4] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
    elif kind == "truncate":
        del raw[pos:]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    path = _write(tmp_path, bytes(raw), "mutated.gguf")
    f = _load(path)
    if f is not None:
        # A clean, named error from the config is as good as a clean load.
        with contextlib.suppress(LlamapyError):
            _ = f.config


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    p = _write(tmp_path, b"not a model at all")
    proc = subprocess.run(
        [sys.executable, "-m", "llamapy", "info", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "not a GGUF file" in lines[0]
    assert "Traceback" not in proc.stderr


def test_dimension_past_int64_with_a_zero_dimension(tiny_gguf: Path, tmp_path: Path) -> None:
    """A tensor of 0 x 2^64-1 elements holds no bytes but cannot be shaped: a clean error
    (hypothesis once found it as a TypeError from torch's view)."""
    layout = header_layout(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    for (start, length), type_pos in zip(
        layout.tensor_name_spans, layout.tensor_type_positions, strict=True
    ):
        (n_dims,) = struct.unpack_from("<I", data, start + length)
        if n_dims == 2:
            data[type_pos - 16 : type_pos] = struct.pack("<QQ", 0, 2**64 - 1)
            break
    else:
        pytest.fail("fixture has no 2-D tensor")
    with pytest.raises(ModelFormatError, match="overflows 64-bit"):
        _load(_write(tmp_path, bytes(data))) or GGUFFile(_write(tmp_path, bytes(data)))
