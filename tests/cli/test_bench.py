"""`llamapy bench` and `llamapy mkmodel` on tiny random models (outputs parsed, never timed)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamapy.cli.bench import BenchSettings, BenchTest, EngineBench
from llamapy.cli.main import main
from llamapy.cli.mkmodel import ModelShape, make_random_llama
from llamapy.formats.gguf_file import GGUFFile
from llamapy.quant.types import QuantType

TINY_SHAPE = "64,2,4,2,128"


@pytest.fixture(scope="module")
def vocab_gguf(tmp_path_factory) -> Path:
    from gguf_factory import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("vocab") / "vocab.gguf", vocab=48)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, vocab_gguf: Path) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.gguf"
    assert main(["mkmodel", str(out), "--shape", TINY_SHAPE, "--vocab", str(vocab_gguf)]) == 0
    return out


def _bench(capsys, *args: str) -> str:
    assert main(["bench", *args]) == 0
    return capsys.readouterr().out


def _params(path: Path) -> int:
    # independent count: gguf-py's reader, logical shapes
    return sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(path).tensors)


def _positive_finite(x: float) -> bool:
    return math.isfinite(x) and x > 0


# -- bench ------------------------------------------------------------------------------------


def test_markdown_table(capsys, tiny_model: Path) -> None:
    out = _bench(capsys, "-m", str(tiny_model), "-p", "16", "-n", "4", "-r", "2", "-t", "1")
    lines = out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    assert set(lines[1]) <= set("|-: ")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[5] for r in rows] == ["pp16", "tg4"]
    for r in rows:
        assert r[0].startswith("llama ") and r[0].endswith(" Q4_0")
        assert r[3] == "CPU" and r[4] == "1"
        assert r[2] == f"{_params(tiny_model) / 1e6:.2f} M"
        assert r[1] == f"{tiny_model.stat().st_size / 2**20:.2f} MiB"
        mean, sd = (float(x) for x in r[6].split("±"))
        assert _positive_finite(mean) and math.isfinite(sd) and sd >= 0


def _records(fmt: str, out: str) -> list[dict]:
    if fmt == "json":
        return json.loads(out)
    if fmt == "jsonl":
        return [json.loads(line) for line in out.strip().splitlines()]
    rows = list(csv.DictReader(io.StringIO(out)))
    for r in rows:
        for k in ("samples_ns", "samples_ts"):
            r[k] = [float(x) for x in r[k].split()]
        for k in ("avg_ts", "stddev_ts"):
            r[k] = float(r[k])
        for k in ("model_size", "model_n_params", "n_threads", "n_prompt", "n_gen"):
            r[k] = int(r[k])
    return rows


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_record_formats(capsys, tiny_model: Path, fmt: str) -> None:
    out = _bench(
        capsys, "-m", str(tiny_model), "-p", "8", "-n", "3", "-r", "2", "-t", "1", "-o", fmt
    )
    recs = _records(fmt, out)
    assert [(r["n_prompt"], r["n_gen"], r["test"]) for r in recs] == [(8, 0, "pp8"), (0, 3, "tg3")]
    for r in recs:
        assert r["model_filename"] == str(tiny_model)
        assert r["model_type"].startswith("llama ") and r["model_type"].endswith(" Q4_0")
        assert r["model_size"] == tiny_model.stat().st_size
        assert r["model_n_params"] == _params(tiny_model)
        assert r["n_threads"] == 1
        assert r["backends"] == "CPU"
        assert len(r["samples_ns"]) == 2 and len(r["samples_ts"]) == 2
        n_tokens = r["n_prompt"] or r["n_gen"]
        for ns, ts in zip(r["samples_ns"], r["samples_ts"], strict=True):
            assert _positive_finite(ts)
            assert ts == pytest.approx(n_tokens * 1e9 / float(ns), rel=1e-9)
        assert r["avg_ts"] == pytest.approx(np.mean(r["samples_ts"]), rel=1e-9)
        assert r["stddev_ts"] == pytest.approx(np.std(r["samples_ts"], ddof=1), rel=1e-6, abs=1e-9)


def test_batched(capsys, tiny_model: Path) -> None:
    args = ["-m", str(tiny_model), "-p", "8", "-n", "3", "-r", "1", "-t", "1", "-o", "jsonl"]
    recs = _records("jsonl", _bench(capsys, *args, "--batch", "3,1"))
    got = [(r["test"], r["n_parallel"], r["n_prompt"], r["n_gen"], r["n_depth"]) for r in recs]
    assert got == [
        ("pp8 @ B=1", 1, 8, 0, 0),
        ("tg3 @ B=1", 1, 0, 3, 8),
        ("pp8 @ B=3", 3, 8, 0, 0),
        ("tg3 @ B=3", 3, 0, 3, 8),
    ]
    for r in recs:
        n_tokens = r["n_parallel"] * (r["n_prompt"] or r["n_gen"])
        assert r["samples_ts"][0] == pytest.approx(n_tokens * 1e9 / r["samples_ns"][0])
        assert _positive_finite(r["avg_ts"])


def test_cache_type(capsys, tiny_model: Path) -> None:
    """-ctk / -ctv: the engine's KV cache in that type, llama-bench's type_k / type_v in the
    table (only when given) and in the records (always: f16, the default)."""
    args = ["-m", str(tiny_model), "-p", "0", "-n", "3", "-r", "1", "-t", "1"]
    lines = _bench(capsys, *args, "-ctk", "f32").strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[5:7] == ["type_k", "type_v"]
    assert [c.strip() for c in lines[2].strip("|").split("|")][5:7] == ["f32", "f32"]
    rec = _records("jsonl", _bench(capsys, *args, "-ctv", "bf16", "-o", "jsonl"))[0]
    assert (rec["type_k"], rec["type_v"]) == ("bf16", "bf16")
    rec = _records("jsonl", _bench(capsys, *args, "-o", "jsonl"))[0]
    assert (rec["type_k"], rec["type_v"]) == ("f16", "f16")
    settings = BenchSettings(kv_cache_dtype="f32")
    bench = EngineBench(str(tiny_model), settings, [BenchTest(0, 2)])
    assert {k.dtype for k, _ in bench.llm.engine.runner.kv_caches} == {torch.float32}
    bench.close()


def test_depth(capsys, tiny_model: Path) -> None:
    """-d: llama-bench's `ppP @ dD` / `tgN @ dD` rows (n_depth recorded), depth 0 as before."""
    args = ["-m", str(tiny_model), "-p", "8", "-n", "3", "-d", "0,32", "-r", "1", "-t", "1"]
    recs = _records("jsonl", _bench(capsys, *args, "-o", "jsonl"))
    got = [(r["test"], r["n_prompt"], r["n_gen"], r["n_depth"]) for r in recs]
    assert got == [("pp8", 8, 0, 0), ("pp8 @ d32", 8, 0, 32), ("tg3", 0, 3, 0),
                   ("tg3 @ d32", 0, 3, 32)]  # fmt: skip
    for r in recs:
        n_tokens = r["n_prompt"] or r["n_gen"]
        assert r["samples_ts"][0] == pytest.approx(n_tokens * 1e9 / r["samples_ns"][0])
        assert _positive_finite(r["avg_ts"])


def test_depth_method(tiny_model: Path) -> None:
    """At a depth the timed pass computes only the new tokens: the depth's prompt runs first
    and its full cache blocks are reused (16-token blocks: a partial one is recomputed);
    tg at a depth times N one-token steps after the depth's prefill."""
    settings = BenchSettings(n_threads=1, n_ubatch=16, repetitions=1)
    tests = [BenchTest(20, 0, n_depth=40), BenchTest(0, 3, n_depth=40)]
    bench = EngineBench(str(tiny_model), settings, tests)
    assert bench.llm.engine.block_manager.enable_prefix_caching
    log = _StepLog(bench.llm.engine.runner)
    assert _positive_finite(bench.prefill_at_depth(20, 32))
    assert log.steps == [[16], [16], [16], [4]]  # depth 32 untimed, then the 20 new tokens
    log.steps.clear()
    assert _positive_finite(bench.prefill_at_depth(20, 40))
    assert log.steps == [[16], [16], [8], [16], [12]]  # 40's last 8 again with the 20
    log.steps.clear()
    assert _positive_finite(bench.decode_steps(BenchTest(40, 3, 1, batched=True)))
    assert log.steps == [[16], [16], [8]] + [[1]] * 3
    assert not bench.llm.engine.has_unfinished_requests()
    bench.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_with_ngl(capsys, tiny_model: Path) -> None:
    args = ["-m", str(tiny_model), "-p", "64", "-n", "8", "-r", "2", "-ngl", "99", "-o", "json"]
    recs = _records("json", _bench(capsys, *args, "--batch", "1,16"))
    assert [r["test"] for r in recs] == ["pp64 @ B=1", "tg8 @ B=1", "pp64 @ B=16", "tg8 @ B=16"]
    for r in recs:
        assert r["backends"] == "CUDA" and r["device"] == "cuda" and r["n_gpu_layers"] == 99
        assert r["gpu_info"] and _positive_finite(r["avg_ts"])


class _StepLog:
    """Wraps the model runner: records the tokens of each sequence in every forward pass."""

    def __init__(self, runner) -> None:
        self.run, self.steps = runner.run, []
        runner.run = self

    def __call__(self, batch, block_manager):
        self.steps.append([item.num_new_tokens for item in batch])
        return self.run(batch, block_manager)


def test_method_counts_forward_passes(tiny_model: Path) -> None:
    """pp: ceil(P / ub) passes; tg: N one-token passes; batched tg: N passes of B tokens."""
    settings = BenchSettings(n_threads=1, n_ubatch=16, repetitions=1)
    tests = [BenchTest(40, 0), BenchTest(0, 5), BenchTest(8, 4, 3, batched=True)]
    bench = EngineBench(str(tiny_model), settings, tests)
    assert not bench.llm.engine.block_manager.enable_prefix_caching
    log = _StepLog(bench.llm.engine.runner)
    assert _positive_finite(bench.prefill(40))
    assert log.steps == [[16], [16], [8]]
    log.steps.clear()
    assert _positive_finite(bench.generate(5))
    assert log.steps == [[1]] * 5
    log.steps.clear()
    assert _positive_finite(bench.decode_steps(tests[2]))
    # 3 prompts of 8 under a budget of 16: two prefill steps (the first two sequences
    # decode in the second), then the 4 timed steps of 3 x 1 token
    assert log.steps == [[8, 8], [1, 1, 8]] + [[1, 1, 1]] * 4
    assert not bench.llm.engine.has_unfinished_requests()
    ids = bench.random_prompt(200)
    assert not any(bench.llm.tokenizer.is_special(i) for i in ids[1:])
    bench.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "abc"], "-p expects integers"),
        (["-n", "4,-1"], "-n values must be >= 0"),
        (["-r", "0"], "-r values must be >= 1"),
        (["-r", "2,3"], "-r takes one value"),
        (["-o", "xml"], "-o must be one of"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "--device must be cpu, cuda or cuda:N"),
        (["-ngl", "x"], "-ngl expects integers"),
        (["-ngl", "99", "--device", "cpu"], "conflicts"),
        (["--batch", "0"], "--batch values must be >= 1"),
        (["--batch", "600"], "exceeds the 512 tokens"),
        (["-p", "0", "-n", "0"], "nothing to measure"),
        (["-t", "0"], "-t values must be >= 1"),
        (["-d", "-1"], "-d values must be >= 0"),
        (["-d", "16", "--batch", "2"], "-d applies to llama-bench's tests"),
        (["-ctk", "q8_0"], "KV cache type must be one of f32, f16, bf16, got 'q8_0'"),
        (["-ctk", "f16", "-ctv", "f32"], "-ctk f16 and -ctv f32 differ"),
        (["-ngl", "99", "-ctk", "f32"], "on CUDA the KV cache type must be one of f16"),
        (["-m", "/no/such/model.gguf", "-t", "1"], "/no/such/model.gguf"),
    ],
)
def test_bad_flags_one_line_exit_2(capsys, args: list[str], message: str) -> None:
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith("llamapy bench: error:")


# -- mkmodel ----------------------------------------------------------------------------------


def test_mkmodel_file_matches_an_independent_recipe(tmp_path: Path, vocab_gguf: Path) -> None:
    shape = ModelShape(64, 1, 4, 2, 96)
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {seed}")
    out = make_random_llama(
        tmp_path / "m.gguf",
        shape,
        vocab_gguf,
        QuantType.Q5_1,
        output_qtype=QuantType.Q8_0,
        seed=seed,
    )
    f = GGUFFile(out)
    vocab = GGUFFile(vocab_gguf)
    cfg = f.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_size) == (
        64, 1, 4, 2, 96,
    )  # fmt: skip
    assert cfg.rope_theta == 500000.0 and cfg.context_length == 8192
    for key, value in vocab.metadata.items():
        if key.startswith("tokenizer."):
            assert np.array_equal(np.asarray(f.metadata[key]), np.asarray(value)), key
            assert f.metadata_types[key] == vocab.metadata_types[key]
    assert f.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q5_1
    assert "output.weight" not in f.tensor_infos  # tied, as SmolLM2 and Llama-3.2-1B
    assert f.tensor_infos["token_embd.weight"].qtype == QuantType.Q8_0
    assert f.tensor_infos["blk.0.ffn_down.weight"].qtype == QuantType.Q5_1
    assert f.tensor_infos["blk.0.ffn_down.weight"].shape == (64, 96)
    assert torch.equal(f.tensor("blk.0.attn_norm.weight").dequantize(), torch.ones(64))
    # The same draws, quantized by gguf-py: the first two weights in file order.
    gen = torch.Generator().manual_seed(seed)
    n_vocab = len(vocab.metadata["tokenizer.ggml.tokens"])
    embd = (torch.randn(n_vocab, 64, generator=gen) * 0.02).numpy()
    q = (torch.randn(64, 64, generator=gen) * 0.02).numpy()
    assert (
        f.raw("token_embd.weight").numpy().tobytes()
        == gguf.quants.quantize(embd, QuantType.Q8_0).tobytes()
    )
    assert (
        f.raw("blk.0.attn_q.weight").numpy().tobytes()
        == gguf.quants.quantize(q, QuantType.Q5_1).tobytes()
    )
    w = f.tensor("blk.0.ffn_up.weight").dequantize()
    # N(0, 0.02) over 6144 draws: the sample std is within 3% (5 sigma) plus Q5_1 rounding.
    assert abs(w.std().item() / 0.02 - 1) < 0.05 and abs(w.mean().item()) < 0.002


def test_mkmodel_runs_in_llamapy(capsys, tiny_model: Path) -> None:
    rc = main(["run", "-m", str(tiny_model), "-n", "4", "--temp", "0", "--raw", "-t", "1", "hi"])
    assert rc == 0
    assert "prompt eval" in capsys.readouterr().err


@pytest.mark.models
def test_mkmodel_loads_in_llama_cpp(tmp_path: Path, smollm2_path: Path) -> None:
    """llama.cpp itself reads the file (a real vocabulary: llama.cpp needs SPM/BPE pieces)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    out = tmp_path / "for-llama-cpp.gguf"
    assert main(["mkmodel", str(out), "--shape", TINY_SHAPE, "--vocab", str(smollm2_path)]) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False)
    assert llm.n_vocab() == len(GGUFFile(out).metadata["tokenizer.ggml.tokens"])
    assert llm.n_embd() == 64 and llm.metadata["llama.context_length"] == "8192"
    done = llm.create_completion("hi", max_tokens=4, temperature=0)
    assert done["usage"]["completion_tokens"] >= 1
    llm.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "64,2"], "--shape must be one of"),
        (["--shape", "64,2,5,1,128"], "multiple of heads"),
        (["--shape", "64,2,4,3,128"], "multiple of KV heads"),
        (["--shape", "48,1,4,2,128"], "multiples of 32"),
        (["--type", "Q4_K"], "--type must be one of"),
        (["--output-type", "IQ2_XS"], "--output-type must be one of"),
        (["--seed", "-1"], "--seed"),
        (["--vocab", "/no/such/vocab.gguf"], "/no/such/vocab.gguf"),
    ],
)
def test_mkmodel_bad_flags(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    assert main(["mkmodel", str(tmp_path / "x.gguf"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.gguf").exists()
