"""write_gguf against gguf-py (its GGUFWriter output, GGUFReader and numpy quantizers) and
against llamapy's own reader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValue, GGUFValueType

from llamapy.formats.gguf_file import GGUFFile
from llamapy.formats.gguf_writer import PendingTensor, write_gguf
from llamapy.quant.qtensor import QTensor
from llamapy.quant.quantize import QUANTIZERS
from llamapy.quant.types import QuantType, row_nbytes


def _reader_tensor(reader: GGUFReader, name: str):
    return next(t for t in reader.tensors if t.name == name)


def _same_value(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def test_round_trip_is_byte_identical_to_gguf_py(tmp_path: Path, tiny_gguf: Path) -> None:
    src = GGUFFile(tiny_gguf)
    out = write_gguf(
        tmp_path / "copy.gguf",
        src.metadata["general.architecture"],
        src.metadata,
        [(name, src.tensor(name), None) for name in src.tensor_infos],
        metadata_types=src.metadata_types,
    )
    # gguf-py's own GGUFWriter wrote the source: the same content gives the same bytes.
    assert out.read_bytes() == tiny_gguf.read_bytes()
    back = GGUFFile(out)
    assert list(back.metadata) == list(src.metadata)
    for key, value in src.metadata.items():
        assert _same_value(back.metadata[key], value), key
        assert back.metadata_types[key] == src.metadata_types[key], key
    reader = GGUFReader(out)
    for name, info in src.tensor_infos.items():
        assert back.tensor_infos[name].shape == info.shape
        assert back.tensor_infos[name].qtype == info.qtype
        assert torch.equal(back.raw(name), src.raw(name)), name
        rt = _reader_tensor(reader, name)
        assert rt.tensor_type == info.qtype
        assert rt.data.tobytes() == src.raw(name).numpy().tobytes(), name


@pytest.mark.parametrize("qtype", sorted(QUANTIZERS, key=int))
def test_float_tensors_are_quantized_as_gguf_py(
    tmp_path: Path, rng: np.random.Generator, qtype: QuantType
) -> None:
    x = (rng.standard_normal((6, 64)) * rng.uniform(0.01, 10)).astype(np.float32)
    as_torch = torch.from_numpy(x.copy())
    path = write_gguf(
        tmp_path / "q.gguf",
        "llama",
        {},
        [("from_numpy", x, qtype), ("from_torch", as_torch, qtype)],
    )
    expected = gguf.quants.quantize(x, qtype)
    reader = GGUFReader(path)
    mine = GGUFFile(path)
    for name in ("from_numpy", "from_torch"):
        rt = _reader_tensor(reader, name)
        assert rt.tensor_type == qtype
        assert tuple(int(d) for d in reversed(rt.shape)) == x.shape
        assert rt.data.tobytes() == np.ascontiguousarray(expected).tobytes(), name
        assert mine.tensor(name).shape == x.shape


def test_natural_types_raw_blocks_ints_and_pending(tmp_path: Path, rng) -> None:
    f16 = torch.from_numpy(rng.standard_normal((3, 32)).astype(np.float16))
    bf16 = torch.from_numpy(rng.standard_normal((3, 32)).astype(np.float32)).to(torch.bfloat16)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(x, QuantType.Q5_1)  # uint8 (4, row bytes)
    ints = torch.from_numpy(rng.integers(-(2**31), 2**31, (5,), dtype=np.int32))
    made = []

    def make() -> np.ndarray:
        made.append(1)
        return x

    path = write_gguf(
        tmp_path / "t.gguf",
        "llama",
        {},
        [
            ("f16", f16, None),
            ("bf16", bf16, None),
            ("f64_as_f32", torch.from_numpy(x.astype(np.float64)), None),
            ("raw_q5_1", blocks, QuantType.Q5_1),
            ("i32", ints, None),
            ("pending_q8_0", PendingTensor(x.shape, make), QuantType.Q8_0),
        ],
    )
    assert made == [1]
    f = GGUFFile(path)
    assert f.tensor_infos["f16"].qtype == QuantType.F16
    assert torch.equal(f.tensor("f16").data.view(torch.float16), f16)
    assert f.tensor_infos["bf16"].qtype == QuantType.BF16
    assert torch.equal(f.tensor("bf16").data.view(torch.bfloat16), bf16)
    assert f.tensor_infos["f64_as_f32"].qtype == QuantType.F32
    assert torch.equal(f.tensor("f64_as_f32").dequantize(), torch.from_numpy(x))
    assert f.tensor_infos["raw_q5_1"].shape == (4, 64)
    assert f.raw("raw_q5_1").numpy().tobytes() == blocks.tobytes()
    assert f.tensor_infos["i32"].qtype == QuantType.I32
    assert torch.equal(f.raw("i32").view(torch.int32), ints)
    q8 = gguf.quants.quantize(x, QuantType.Q8_0)
    assert f.raw("pending_q8_0").numpy().tobytes() == q8.tobytes()


def test_qtensor_in_another_type_is_requantized(tmp_path: Path, rng) -> None:
    x = rng.standard_normal((2, 64)).astype(np.float32)
    q = QTensor(torch.from_numpy(gguf.quants.quantize(x, QuantType.Q8_0)), QuantType.Q8_0, x.shape)
    path = write_gguf(tmp_path / "r.gguf", "llama", {}, [("w", q, QuantType.F32)])
    expected = gguf.quants.dequantize(gguf.quants.quantize(x, QuantType.Q8_0), QuantType.Q8_0)
    got = GGUFFile(path).tensor("w").dequantize().numpy()
    np.testing.assert_array_equal(got, expected)


def test_metadata_types_inferred_and_explicit(tmp_path: Path) -> None:
    md = {
        "t.u32": 7,
        "t.i32": -3,
        "t.u64": 2**40,
        "t.i64": -(2**40),
        "t.f32": 1.5,
        "t.bool": True,
        "t.str": "héllo",
        "t.int_list": [1, -2, 3],
        "t.str_list": ["a", "", "🦙"],
        "t.np_f32": np.array([0.5, 2.0], dtype=np.float32),
        "t.np_u8": np.array([1, 255], dtype=np.uint8),
        "t.explicit_u8": GGUFValue(9, GGUFValueType.UINT8),
        "t.override": 5,
    }
    path = write_gguf(
        tmp_path / "m.gguf", "llama", md, [], metadata_types={"t.override": GGUFValueType.INT16}
    )
    expected = {
        "t.u32": GGUFValueType.UINT32,
        "t.i32": GGUFValueType.INT32,
        "t.u64": GGUFValueType.UINT64,
        "t.i64": GGUFValueType.INT64,
        "t.f32": GGUFValueType.FLOAT32,
        "t.bool": GGUFValueType.BOOL,
        "t.str": GGUFValueType.STRING,
        "t.explicit_u8": GGUFValueType.UINT8,
        "t.override": GGUFValueType.INT16,
    }
    arrays = {
        "t.int_list": GGUFValueType.INT32,
        "t.str_list": GGUFValueType.STRING,
        "t.np_f32": GGUFValueType.FLOAT32,
        "t.np_u8": GGUFValueType.UINT8,
    }
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    for key, vtype in expected.items():
        assert reader.fields[key].types == [vtype], key
    for key, sub in arrays.items():
        assert reader.fields[key].types == [GGUFValueType.ARRAY, sub], key
    back = GGUFFile(path).metadata
    for key, value in md.items():
        want = value.value if isinstance(value, GGUFValue) else value
        assert _same_value(back[key], want), key


def test_custom_alignment(tmp_path: Path, rng) -> None:
    x = rng.standard_normal((3, 32)).astype(np.float32)
    path = write_gguf(
        tmp_path / "a.gguf",
        "llama",
        {"general.alignment": 256},
        [("a", x[:1, :8], None), ("b", x, QuantType.Q4_0)],
    )
    f = GGUFFile(path)
    assert f.alignment == 256
    assert all((i.offset - f.data_offset) % 256 == 0 for i in f.tensor_infos.values())
    assert f.raw("b").numpy().tobytes() == gguf.quants.quantize(x, QuantType.Q4_0).tobytes()


@pytest.mark.parametrize(
    ("metadata", "tensors", "message"),
    [
        ({"general.architecture": "gemma3"}, [], "arch"),
        ({"k": [1, "a"]}, [], "one type"),
        ({"k": []}, [], "empty"),
        ({"k": object()}, [], "cannot store"),
        ({}, [("w", np.zeros((2, 34), np.uint8), None)], "ggml type"),
        ({}, [("w", np.zeros((2, 48), np.float32), QuantType.Q4_0)], "block size"),
        ({}, [("w", np.zeros((2, 35), np.uint8), QuantType.Q8_0)], "type size"),
        ({}, [("w", np.zeros((2, 32), np.int32), QuantType.Q8_0)], "integer"),
        ({}, [("w", PendingTensor((2, 32), lambda: np.zeros((3, 32))), QuantType.F32)], "made"),
        ({}, [("w", np.float32(1.0), None)], "expected a tensor"),
    ],
)
def test_bad_input_raises_and_leaves_no_file(tmp_path: Path, metadata, tensors, message) -> None:
    out = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=message):
        write_gguf(out, "llama", metadata, tensors)
    assert list(tmp_path.iterdir()) == []


def test_written_sizes_match_rows(tmp_path: Path, rng) -> None:
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "s.gguf", "llama", {}, [("w", x, QuantType.Q4_1)])
    info = GGUFFile(path).tensor_infos["w"]
    assert info.shape == (2, 3, 64)
    assert info.nbytes == 6 * row_nbytes(QuantType.Q4_1, 64)
