"""`llamapy convert HF_FOLDER OUT`: the command line (the conversion itself is checked
against llama.cpp and transformers in tests/convert/test_hf_to_gguf.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llamapy.cli.main import main
from llamapy.formats.gguf_file import GGUFFile
from llamapy.quant.types import QuantType

sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
from tiny_models import save_folder, tiny_config, tiny_model  # noqa: E402


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    model = tiny_model(tiny_config("qwen2"), int(torch.randint(0, 2**31, ()).item()))
    return save_folder(model, tmp_path / "qwen2")


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_convert_auto_is_f16_for_a_float32_checkpoint(folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["convert", str(folder), str(out), "--no-vocab"]) == 0
    assert "wrote" in capsys.readouterr().out
    with GGUFFile(out) as f:
        assert f.metadata["general.architecture"] == "qwen2"
        assert f.metadata["tokenizer.ggml.model"] == "none"
        assert f.tensor_infos["blk.0.attn_q.weight"].qtype == QuantType.F16
        assert f.tensor_infos["blk.0.attn_q.bias"].qtype == QuantType.F32
        q = f.tensor("blk.0.attn_q.weight").dequantize()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        w = st.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(q, w.to(torch.float16).float())  # qwen2: no permutation


def test_convert_to_a_quant_type(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    assert main(["convert", str(folder), str(out), "--outtype", "q8_0", "--no-vocab"]) == 0
    with GGUFFile(out) as f:
        assert f.tensor_infos["blk.1.ffn_down.weight"].qtype == QuantType.Q8_0


def test_errors_are_one_line(folder: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "m.gguf")
    assert "unknown --outtype 'f8'" in _error(
        capsys, ["convert", str(folder), out, "--outtype", "f8"]
    )
    assert "is not a folder" in _error(capsys, ["convert", str(tmp_path / "nope"), out])
    err = _error(capsys, ["convert", str(folder), out])
    assert "tokenizer.json model 'WordLevel' cannot be written" in err and "--no-vocab" in err
    (folder / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in _error(capsys, ["convert", str(folder), out])
    Path(out).write_bytes(b"")
    assert "exists; use --force" in _error(capsys, ["convert", str(folder), out])
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    save_file({"wte.weight": torch.zeros(4, 4)}, str(other / "model.safetensors"))
    err = _error(capsys, ["convert", str(other), out + "2"])
    assert "'GPT2LMHeadModel' is not supported" in err
