"""`llamapy info` on the real models and on synthetic files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamapy.cli.main import main


def _info_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()  # drop what fixtures printed (the rng seed)
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _types(summary: dict) -> set[str]:
    return {q["type"] for q in summary["quant_mix"]}


@pytest.mark.models
def test_info_smollm2(capsys: pytest.CaptureFixture[str], smollm2_path: Path) -> None:
    s = _info_json(capsys, "smollm2-135m")
    hp = s["hyperparameters"]
    assert s["architecture"] == "llama"
    assert (hp["num_layers"], hp["hidden_size"]) == (30, 576)
    assert (hp["num_heads"], hp["num_kv_heads"], hp["ffn_size"]) == (9, 3, 1536)
    assert (hp["vocab_size"], hp["context_length"]) == (49152, 8192)
    assert _types(s) == {"Q4_1", "Q8_0", "F32"}
    assert s["tokenizer"] == {"model": "gpt2", "pre": "smollm", "vocab_size": 49152}
    assert s["chat_template"] is True
    assert s["path"] == str(smollm2_path)
    assert s["file_size"] == smollm2_path.stat().st_size
    assert 134e6 < s["parameters"] < 136e6
    # The quant mix adds up to the whole.
    assert sum(q["bytes"] for q in s["quant_mix"]) == s["tensor_bytes"]
    assert sum(q["params"] for q in s["quant_mix"]) == s["parameters"]


@pytest.mark.models
def test_info_gemma3(capsys: pytest.CaptureFixture[str], gemma3_path: Path) -> None:
    s = _info_json(capsys, "gemma3-270m")
    hp = s["hyperparameters"]
    assert s["architecture"] == "gemma3"
    assert (hp["num_layers"], hp["hidden_size"]) == (18, 640)
    assert (hp["num_heads"], hp["num_kv_heads"], hp["head_dim"]) == (4, 1, 256)
    assert hp["sliding_window"] == 512
    # Five sliding-window layers, then a global one (llama.cpp's swa pattern 6).
    assert hp["sliding_layers"] == [(i % 6) != 5 for i in range(18)]
    assert hp["vocab_size"] == 262144
    assert _types(s) == {"Q5_0", "Q4_K", "Q6_K", "Q8_0", "F32"}
    assert s["chat_template"] is False


@pytest.mark.models
def test_info_minilm_reads_hf_folder(capsys: pytest.CaptureFixture[str], minilm_path: Path) -> None:
    s = _info_json(capsys, "minilm-l6", "--tensors")
    hp = s["hyperparameters"]
    assert s["format"] == "hf"
    assert s["architecture"] == "bert"
    assert (hp["num_layers"], hp["hidden_size"], hp["num_heads"]) == (6, 384, 12)
    assert hp["pooling"] == "mean"
    assert s["tokenizer"]["vocab_size"] == 30522
    names = {t["name"] for t in s["tensors"]}
    assert {"token_embd.weight", "blk.5.ffn_down.weight", "position_embd.weight"} <= names


def test_info_text_output(capsys: pytest.CaptureFixture[str], tiny_gguf: Path) -> None:
    assert main(["info", str(tiny_gguf), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "architecture:   llama" in out
    assert "blk.1.ffn_down.weight" in out
    assert "Q8_0" in out


def test_info_json_on_synthetic_file(capsys: pytest.CaptureFixture[str], tiny_gguf: Path) -> None:
    s = _info_json(capsys, "-m", str(tiny_gguf))
    assert s["summary_version"] == 1
    assert s["hyperparameters"]["num_layers"] == 2
    assert s["parameters"] == sum(q["params"] for q in s["quant_mix"])


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llamapy", "info", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "nope.gguf" in proc.stderr


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["info", "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "pull" in out


def test_pull_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["smollm2-135m", "gemma3-270m", "minilm-l6"]


def test_pull_unknown_name_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]


@pytest.mark.models
def test_pull_verifies_cached_model(capsys: pytest.CaptureFixture[str], smollm2_path: Path) -> None:
    assert main(["pull", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == f"smollm2-135m\t{smollm2_path}"
