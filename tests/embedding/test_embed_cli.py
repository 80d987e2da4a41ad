"""`llamapy embed` and `llamapy rerank`: output equal to the oracle and to the Python API;
mistakes are one line on stderr with exit code 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from llamapy.cli.main import main

pytestmark = pytest.mark.models

TEXTS = ["A man is eating food.", "Une femme joue du violon.", "def f(): return 42"]


def _run(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_embed_json_and_text_equal_sentence_transformers(capsys, minilm_path, st_minilm):
    ref = st_minilm.encode(TEXTS)
    out = json.loads(_run(capsys, "embed", "-m", str(minilm_path), "--json", *TEXTS))
    got = np.array([d["embedding"] for d in out["data"]])
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1, 2]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    n_tokens = sum(len(st_minilm.tokenizer(t).input_ids) for t in TEXTS)
    assert out["usage"]["prompt_tokens"] == n_tokens
    lines = _run(capsys, "embed", "-m", str(minilm_path), *TEXTS).splitlines()
    text_rows = np.array([[float(x) for x in line.split()] for line in lines])
    np.testing.assert_allclose(text_rows, got, atol=1e-6)  # printed with 6 decimals


def test_embed_normalisation_and_pooling_flags(capsys, minilm_path, tmp_path, st_minilm):
    m = str(minilm_path)
    raw = json.loads(_run(capsys, "embed", "-m", m, "--json", "--no-normalize", TEXTS[0]))
    vec = np.array(raw["data"][0]["embedding"])
    assert abs(np.linalg.norm(vec) - 1.0) > 1e-2
    maxabs = json.loads(_run(capsys, "embed", "-m", m, "--json", "--embd-normalize", "0", TEXTS[0]))
    np.testing.assert_allclose(
        np.array(maxabs["data"][0]["embedding"]), vec / np.abs(vec).max() * 32760, rtol=1e-5
    )
    file = tmp_path / "texts.txt"
    file.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n", encoding="utf-8")
    tokens = _run(capsys, "embed", "-m", m, "--pooling", "none", "-f", str(file))
    blocks = tokens.strip("\n").split("\n\n")
    assert (
        [len(b.splitlines()) for b in blocks]
        == [  # [CLS] ... [SEP]: a line a token
            len(st_minilm.tokenizer(t).input_ids) for t in TEXTS[:2]
        ]
    )


def test_rerank_prints_the_api_ranking(capsys, tmp_path, minilm_path, rng):
    tf = pytest.importorskip("transformers", reason="transformers (dev extra) makes the model")
    cfg = tf.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    torch.manual_seed(int(rng.integers(2**31)))
    model = tf.BertForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm_path / name, tmp_path / name)
    from llamapy.api import LLM

    docs = ["red apples", "a blue sky", "green grass", "the deep sea"]
    ref = LLM(tmp_path).rerank("colours", docs)
    out = _run(capsys, "rerank", "-m", str(tmp_path), "-q", "colours", *docs).splitlines()
    rows = [line.split("\t") for line in out]
    assert [(int(i), d) for _, i, d in rows] == [(r.index, r.document) for r in ref]
    np.testing.assert_allclose([float(s) for s, _, _ in rows], [r.score for r in ref], atol=1e-6)
    top = json.loads(
        _run(
            capsys, "rerank", "-m", str(tmp_path), "-q", "colours", "--top-n", "2", "--json", *docs
        )
    )
    assert [r["index"] for r in top["results"]] == [r.index for r in ref[:2]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "-m", "minilm-l6"], "at least one TEXT"),
        (["embed", "-m", "minilm-l6", "-f", "/nonexistent/file"], "cannot read"),
        (["embed", "-m", "minilm-l6", "-t", "0", "x"], "--threads"),
        (["embed", "-m", "minilm-l6", "word " * 300], "at most 256"),
        (["rerank", "-m", "minilm-l6", "-q", "q", "doc"], "no classification head"),
        (["rerank", "-m", "minilm-l6", "-q", "q", "--top-n", "0", "doc"], "--top-n"),
        (["embed", "-m", "/nonexistent/model", "x"], "nonexistent"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(capsys, minilm_path, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_unknown_pooling_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["embed", "-m", "minilm-l6", "--pooling", "max", "x"])
    assert e.value.code == 2 and "--pooling" in capsys.readouterr().err
