"""`llamapy quantize` and `--quantize` (quantize at load): what they write, print, refuse."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gguf_factory import write_tiny_llama
from llamapy.cli.main import main
from llamapy.formats.gguf_file import GGUFFile
from llamapy.quant.types import QuantType


@pytest.fixture
def f32_model(tmp_path: Path, rng: np.random.Generator) -> Path:
    return write_tiny_llama(tmp_path / "f32.gguf", qtype=gguf.GGMLQuantizationType.F32, rng=rng)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_quantize_writes_the_preset(f32_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q.gguf"
    capsys.readouterr()
    assert main(["quantize", str(f32_model), str(out), "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "quant size =" in printed and "BPW" in printed and "Q8_0" in printed
    with GGUFFile(out) as f, GGUFFile(f32_model) as src:
        assert f.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
        for name, info in f.tensor_infos.items():
            want = QuantType.F32 if len(info.shape) == 1 else QuantType.Q8_0
            assert info.qtype == want, name
            if want == QuantType.Q8_0:  # gguf-py's quantizer is the oracle
                x = src.tensor(name).dequantize().numpy()
                ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
                assert np.array_equal(f.raw(name).numpy(), ref.reshape(-1)), name


def test_pure_and_type_flags(f32_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q.gguf"
    argv = [
        "quantize",
        str(f32_model),
        str(out),
        "Q4_0",
        "--pure",
        "--token-embedding-type",
        "q8_0",
        "--no-progress",
    ]
    assert main(argv) == 0
    with GGUFFile(out) as f:
        assert f.tensor_infos["token_embd.weight"].qtype == QuantType.Q8_0
        assert f.tensor_infos["blk.0.attn_v.weight"].qtype == QuantType.Q4_0


def test_imatrix_flag_reads_legacy_files(f32_model: Path, tmp_path: Path, capsys) -> None:
    dat = tmp_path / "m.dat"
    name = b"blk.0.ffn_up.weight"
    payload = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 2, 64)
    dat.write_bytes(payload + np.full(64, 2.0, "<f4").tobytes())
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(f32_model), str(out), "Q4_0", "--imatrix", str(dat)]) == 0
    with GGUFFile(out) as f:
        assert f.metadata["quantize.imatrix.entries_count"] == 1
        assert f.metadata["quantize.imatrix.file"] == str(dat)


def test_errors_are_one_line(f32_model: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "q.gguf")
    assert "unknown quantization type 'Q9_Z'" in _error(
        capsys, ["quantize", str(f32_model), out, "Q9_Z"]
    )
    assert "unknown ggml type 'x1'" in _error(
        capsys, ["quantize", str(f32_model), out, "Q4_0", "--output-tensor-type", "x1"]
    )
    assert "nope.gguf' not found" in _error(
        capsys, ["quantize", str(tmp_path / "nope.gguf"), out, "Q4_0"]
    )
    assert "is the input file" in _error(
        capsys, ["quantize", str(f32_model), str(f32_model), "Q4_0", "--force"]
    )
    Path(out).write_bytes(b"x")
    assert "exists; use --force" in _error(capsys, ["quantize", str(f32_model), out, "Q4_0"])
    assert Path(out).read_bytes() == b"x"
    assert main(["quantize", str(f32_model), out, "Q4_0", "--force"]) == 0
    assert "does not exist" in _error(
        capsys, ["quantize", str(f32_model), str(tmp_path / "no" / "q.gguf"), "Q4_0"]
    )
    assert "imatrix file" in _error(
        capsys, ["quantize", str(f32_model), out + "2", "Q4_0", "--imatrix", "/nonexistent"]
    )


def test_hf_folder_of_an_unsupported_arch(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    save_file({"wte.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    err = _error(capsys, ["quantize", str(folder), str(tmp_path / "o.gguf"), "Q8_0"])
    assert "GPT2LMHeadModel" in err and "not supported" in err


def test_quantize_at_load(f32_model: Path, tmp_path: Path) -> None:
    """LLM(model, quantize=...) runs the weights `llamapy quantize` writes: same greedy text
    as the quantized file."""
    from llamapy.api import LLM
    from llamapy.sampling.params import SamplingParams

    out = tmp_path / "q.gguf"
    assert main(["quantize", str(f32_model), str(out), "Q4_0"]) == 0
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = torch.randint(3, 32, (5,)).tolist()
    a = LLM(str(f32_model), n_ctx=64, quantize="Q4_0", cpu_kernels="reference")
    b = LLM(str(out), n_ctx=64, cpu_kernels="reference")
    outs = []
    for llm in (a, b):
        llm.engine.add_request(prompt, params)
        outs.append(_run(llm))
    assert len(outs[0]) == 8 and outs[0] == outs[1]


def _run(llm) -> list[int]:
    tokens: list[int] = []
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            tokens += out.token_ids
    return tokens


def test_bad_quantize_flag_is_a_usage_error(f32_model: Path, capsys) -> None:
    err = _error(capsys, ["run", "-m", str(f32_model), "--quantize", "Q4_Q", "-p", "hi"])
    assert "--quantize: unknown quantization type 'Q4_Q'" in err
