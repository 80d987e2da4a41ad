"""GGUFFile against gguf-py's GGUFReader (the oracle) on synthetic and real files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamapy.formats import GGUFFile


def _assert_same_as_reader(path: Path) -> None:
    reader = gguf.GGUFReader(path)
    ours = GGUFFile(path)
    assert ours.version == reader.fields["GGUF.version"].contents()
    user_keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == user_keys
    for key in user_keys:
        expected, got = reader.fields[key].contents(), ours.metadata[key]
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(expected), err_msg=key)
        else:
            assert got == expected, key
    assert list(ours.tensor_infos) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        q = ours.tensor(t.name)
        assert q.qtype == t.tensor_type
        assert q.shape == tuple(int(d) for d in reversed(t.shape))
        expected = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(q.data.numpy().reshape(-1), expected), t.name


def test_tiny_file_matches_gguf_reader(tiny_gguf: Path) -> None:
    _assert_same_as_reader(tiny_gguf)


def test_metadata_value_types(tiny_gguf: Path) -> None:
    f = GGUFFile(tiny_gguf)
    assert f.metadata["test.strings"] == ["héllo", "", "🦙 llama"]
    assert f.metadata["test.flag"] is True
    assert f.metadata["test.i64"] == -(2**40)
    assert f.metadata["test.f64"] == 2.5
    np.testing.assert_array_equal(f.metadata["test.floats"], [0.5, -1.25, 3.0])


def test_tensors_are_zero_copy_views(tiny_gguf: Path) -> None:
    f = GGUFFile(tiny_gguf)
    a = f.tensor("blk.0.attn_q.weight")
    b = f.tensor("blk.0.attn_q.weight")
    assert a.data.data_ptr() == b.data.data_ptr()
    base = f.raw("token_embd.weight").data_ptr()
    info = f.tensor_infos["token_embd.weight"]
    assert base - f._buffer().data_ptr() == info.offset
    assert info.offset % f.alignment == 0


def test_dequantized_tensor_matches_gguf(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)
    f = GGUFFile(tiny_gguf)
    for t in reader.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = f.tensor(t.name).dequantize()
        assert torch.equal(got, torch.from_numpy(np.array(expected, dtype=np.float32))), t.name


def test_missing_tensor_is_key_error(tiny_gguf: Path) -> None:
    with pytest.raises(KeyError, match="no tensor named"):
        GGUFFile(tiny_gguf).tensor("nope.weight")


@pytest.mark.models
@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_real_models_match_gguf_reader(fixture: str, request: pytest.FixtureRequest) -> None:
    _assert_same_as_reader(request.getfixturevalue(fixture))
