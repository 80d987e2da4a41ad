"""Importance-matrix files in both formats, written here independently (gguf-py for the GGUF
format, struct for the legacy one) and read back as llama-quantize normalizes them."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from llamapy.errors import ModelFormatError
from llamapy.quant.imatrix import load_imatrix


def write_gguf_imatrix(
    path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], *, metadata: bool = True
) -> Path:
    """entries: name -> (sums (n_mat, ne0), counts (n_mat,)), as llama-imatrix saves them."""
    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    if metadata:
        w.add_array("imatrix.datasets", ["wiki.train.raw"])
        w.add_uint32("imatrix.chunk_count", 7)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        w.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_legacy_imatrix(
    path: Path, entries: dict[str, tuple[int, np.ndarray]], trailer: tuple[int, str] | None
) -> Path:
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    if trailer is not None:
        chunks, dataset = trailer
        out += struct.pack("<ii", chunks, len(dataset.encode())) + dataset.encode()
    path.write_bytes(out)
    return path


def test_gguf_format(rng: np.random.Generator, tmp_path: Path) -> None:
    sums = rng.random((1, 64), dtype=np.float32) * 100
    experts = rng.random((3, 32), dtype=np.float32) * 100
    counts = np.array([0.0, 5.0, 9.0])  # an expert never routed to: its values are 1
    path = write_gguf_imatrix(
        tmp_path / "m.gguf",
        {
            "blk.0.attn_q.weight": (sums, np.array([17.0])),
            "blk.0.ffn_up_exps.weight": (experts, counts),
        },
    )
    m = load_imatrix(path)
    assert not m.is_legacy and m.datasets == ["wiki.train.raw"]
    assert (m.chunk_count, m.chunk_size) == (7, 512)
    np.testing.assert_array_equal(m.entries["blk.0.attn_q.weight"], sums[0] / np.float32(17))
    want = np.concatenate([np.ones(32, np.float32), experts[1] / 5, experts[2] / 9])
    np.testing.assert_array_equal(m.entries["blk.0.ffn_up_exps.weight"], want)
    t = m.for_tensor("blk.0.attn_q.weight", (128, 64))
    assert t is not None and t.shape == (64,)
    assert m.for_tensor("blk.0.ffn_up_exps.weight", (3, 16, 32)).shape == (3, 32)
    assert m.for_tensor("blk.1.attn_q.weight", (128, 64)) is None
    with pytest.raises(ModelFormatError, match="imatrix size 64 is different .* 32"):
        m.for_tensor("blk.0.attn_q.weight", (128, 32))


def test_gguf_without_metadata_is_refused(tmp_path: Path) -> None:
    path = write_gguf_imatrix(
        tmp_path / "m.gguf", {"a.weight": (np.ones((1, 32)), np.ones(1))}, metadata=False
    )
    with pytest.raises(ModelFormatError, match="lacks metadata imatrix.datasets"):
        load_imatrix(path)


@pytest.mark.parametrize("trailer", [None, (12, "calibration.txt")])
def test_legacy_format(rng: np.random.Generator, tmp_path: Path, trailer) -> None:
    a, b = rng.random(96, dtype=np.float32), rng.random(32, dtype=np.float32)
    path = write_legacy_imatrix(
        tmp_path / "m.dat", {"blk.0.attn_v.weight": (4, a), "output.weight": (0, b)}, trailer
    )
    m = load_imatrix(path)
    assert m.is_legacy
    np.testing.assert_array_equal(m.entries["blk.0.attn_v.weight"], a / np.float32(4))
    np.testing.assert_array_equal(m.entries["output.weight"], b)  # ncall 0: as stored
    assert m.datasets == ([] if trailer is None else ["calibration.txt"])
    assert m.chunk_count == (0 if trailer is None else 12)


def test_bad_files(tmp_path: Path) -> None:
    good = write_legacy_imatrix(
        tmp_path / "m.dat", {"x.weight": (1, np.ones(64, np.float32))}, None
    ).read_bytes()
    (tmp_path / "cut.dat").write_bytes(good[:-10])
    with pytest.raises(ModelFormatError, match="truncated in entry 1"):
        load_imatrix(tmp_path / "cut.dat")
    (tmp_path / "empty.dat").write_bytes(struct.pack("<i", 0))
    with pytest.raises(ModelFormatError, match="neither a GGUF nor a legacy imatrix"):
        load_imatrix(tmp_path / "empty.dat")
    nan = write_legacy_imatrix(tmp_path / "nan.dat", {"x.weight": (1, np.full(4, np.nan))}, None)
    with pytest.raises(ModelFormatError, match="non-finite"):
        load_imatrix(nan)
    with pytest.raises(ModelFormatError, match="cannot read imatrix"):
        load_imatrix(tmp_path / "missing.dat")
