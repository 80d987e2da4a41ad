"""The benchmark scripts added for the GPU and CPU speed issues refuse bad arguments with
a one-line usage error (exit 2) before loading any model or touching a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llamapy.kernels.triton as kt

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("benchmarks/kernels/bench_dequant_mm.py", ["--types", "Q9_9"], "ggml type names"),
    ("benchmarks/kernels/bench_dequant_mm.py", ["--m", "0"], "--m values must be >= 1"),
    ("benchmarks/prefill_graphs_ab.py", ["x.gguf", "--pp", "a"], "prompt lengths"),
    ("benchmarks/prefill_graphs_ab.py", ["x.gguf", "--reps", "0"], "must be >= 1"),
    ("benchmarks/gpu_bench.py", ["x.gguf", "--profile", "--profile-batch", "0"], ">= 1"),
    ("benchmarks/gpu_bench.py", ["x.gguf", "--cpu-kernels", "fast,x"], "comma-separated list"),
    ("benchmarks/gpu_bench.py", ["x.gguf", "--batch-prompt", "0"], "--batch-prompt must be"),
    ("benchmarks/gpu_bench.py", ["x.gguf", "--depth", "-1"], "--depth must be >= 0"),
    ("benchmarks/kernels/sass_count.py", ["--type", "Q4_0", "--byte-twin"], "--byte-twin takes"),
    ("benchmarks/kernels/bench_cpu_decode_step.py", ["m", "--variants", "x"], "unknown variant"),
    ("benchmarks/kernels/bench_cpu_decode_step.py", ["m", "--ctx", "0"], "must be >= 1"),
    ("benchmarks/host_step_bench.py", ["--batch", "0,64"], "positive integers"),
    ("benchmarks/host_step_bench.py", ["--batch", "x"], "integers like 64,256"),
    ("benchmarks/host_step_bench.py", ["--tokens", "1"], "--tokens must be >= 2"),
    ("benchmarks/host_step_bench.py", ["--repeat", "0"], "--repeat must be >= 1"),
    ("benchmarks/cpu_context_bench.py", ["--ranges", "x"], "integers like 64,256"),
    ("benchmarks/cpu_context_bench.py", ["--ranges", "4,0"], "positive integers"),
    ("benchmarks/cpu_bench.py", ["--baseline", "vllm"], "invalid choice"),
    ("benchmarks/cpu_bench.py", ["-d", "-4"], "-p, -n and -d >= 0"),
    ("benchmarks/cpu_bench.py", ["-d", "64", "--baseline", "transformers"], "llama.cpp baseline"),
    ("benchmarks/kernels/sass_count.py", ["--pro", "merge", "--q8x"], "--pro merge takes"),
    ("benchmarks/cpu_first_token.py", ["--lengths", "x"], "integers like 64,256"),
    ("benchmarks/cpu_first_token.py", ["--lengths", "8,0"], "positive integers"),
    ("benchmarks/cpu_first_token.py", ["--reps", "0"], "--reps and --threads must be >= 1"),
    ("benchmarks/kernels/sass_count.py", ["--type", "Q9"], "bad --type 'Q9'"),
    ("benchmarks/kernels/sass_count.py", ["--tile", "32"], "bad --type"),
    ("benchmarks/kernels/sass_count.py", ["--type", "Q4_K"], "no legacy GEMV kernel"),
    ("benchmarks/kernels/sass_count.py", ["--tile", "24x8"], "powers of two, got 24"),
    ("benchmarks/kernels/sass_count.py", ["--warps", "0"], "powers of two, got 0"),
    ("benchmarks/kernels/sass_count.py", ["--type", "F16", "--q8x"], "legacy quant type"),
    ("benchmarks/gpu_vs_llamacpp.py", ["--tools", ".", "--shapes", "gpt2"], "--shapes takes"),
    ("benchmarks/gpu_vs_llamacpp.py", ["--tools", ".", "--types", "Q4_0,IQ1_S"], "--types takes"),
    ("benchmarks/gpu_vs_llamacpp.py", ["--tools", ".", "--reps", "0"], "--reps must be >= 1"),
    ("benchmarks/gpu_vs_llamacpp.py", ["--tools", "/nonexistent"], "lacks build-llamacpp.sh"),
    ("benchmarks/gpu_vs_llamacpp.py", ["--tools", "/nonexistent", "--hf"], "hf_bench.py"),
    ("benchmarks/gpu_vs_llamacpp.py", ["--tools", ".", "--batch", "64,x"], "integers like 64,256"),
    ("benchmarks/gpu_vs_llamacpp.py", ["--tools", ".", "--batch", "0"], "positive integers"),
    ("benchmarks/kernels/grid_sync_lab.py", ["--stages", "0"], "--stages must be >= 1"),
    ("benchmarks/kernels/grid_sync_lab.py", ["--per-sm", "1,x"], "integers like 1,2"),
    ("benchmarks/kernels/grid_sync_lab.py", ["--per-sm", "0"], "positive integers"),
    ("benchmarks/kernels/grid_sync_lab.py", ["--width", "96"], "power of two, got 96"),
    ("benchmarks/gpu_ab.py", ["--setting", "a:X=1", "--setting", "b:"], "after --: the files"),
    ("benchmarks/gpu_ab.py", ["--setting", "a:X=1", "--", "f.gguf"], "at least two --setting"),
    ("benchmarks/gpu_ab.py", ["--setting", "a:", "--setting", "a:X=1", "--", "f"], "different"),
    ("benchmarks/gpu_ab.py", ["--setting", "a X=1", "--", "f.gguf"], "expected NAME:VAR=VALUE"),
    ("benchmarks/gpu_ab.py", ["--setting", "a:X", "--", "f.gguf"], "expected VAR=VALUE"),
    (
        "benchmarks/gpu_ab.py",
        ["--setting", "a:", "--setting", "b:", "--rounds", "0", "--", "f"],
        "--rounds must be >= 1",
    ),  # fmt: skip
    (
        "benchmarks/gpu_ab.py",
        ["--setting", "a:", "--setting", "b:", "--", "f", "--json", "j"],
        "gpu_ab.py adds --json",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("script", "args", "message"), CASES, ids=lambda c: str(c)[:40])
def test_bad_arguments_are_usage_errors(script: str, args: list[str], message: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr.strip().splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("baseline", "absent", "message"),
    [
        ("transformers", "accelerate", "accelerate"),
        ("llama.cpp", "llama_cpp", "llama-cpp-python"),
    ],
)
def test_cpu_bench_names_a_missing_baseline_package(
    baseline: str, absent: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A baseline whose package is not installed is a usage error naming what to install
    (transformers' GGUF loader needs accelerate), before any model loads."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cpu_bench

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a)
    )
    with pytest.raises(SystemExit) as done:
        cpu_bench.main(["--baseline", baseline, "no-such-model"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the {baseline} baseline needs: pip install" in err and message in err, err


@pytest.mark.models
def test_host_step_bench_runs(smollm2_path) -> None:
    """The stub runner keeps up with ModelRunner's interface (a tiny run, async and sync)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for extra in ([], ["--no-async"]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/host_step_bench.py"), str(smollm2_path),
             "--batch", "4", "--tokens", "4", "--repeat", "1", *extra],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "| 4 |" in done.stdout


@pytest.mark.models
def test_cpu_context_bench_runs(smollm2_path) -> None:
    """A tiny run: one line of ms per step for each context range."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/cpu_context_bench.py"), str(smollm2_path),
         "--ranges", "3,2"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "8-11: " in done.stdout and "11-13: " in done.stdout, done.stdout


@pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed")
def test_sass_count_compiles_for_hopper_without_a_gpu() -> None:
    """The GEMV compiles to sm_90 SASS here (ptxas / cuobjdump from Triton's wheel); a
    register cap below what the kernel takes shows up as spills (stack bytes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    outputs = []
    for extra in ([], ["--maxnreg", "48"]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/kernels/sass_count.py"), "--type", "Q4_0",
             "--tile", "16x32", "--pro", "norm", *extra],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        m = re.search(r"([\d.]+) a weight; (\d+) registers, (\d+) B stack", done.stdout)
        assert m, done.stdout
        outputs.append((float(m.group(1)), int(m.group(2)), int(m.group(3))))
    (per_weight, regs, stack), (_, capped_regs, capped_stack) = outputs
    assert per_weight > 1.0  # at least the FMA of each weight
    assert regs > 48 and stack == 0
    assert capped_regs <= 48 and capped_stack > 0


def test_gpu_bench_mismatch_margin() -> None:
    """The largest reference margin a top-1 mismatch overturned (0 without mismatches)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks/gpu_bench.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    ref = torch.randn(50, 300, dtype=torch.float64)
    assert gpu_bench.mismatch_margin(ref.clone(), ref) == 0.0
    got = ref.clone()
    top = ref.argmax(-1)
    second = ref.clone()
    second[torch.arange(50), top] = -1e9
    runner_up = second.argmax(-1)
    for row in (3, 17):  # make the runner-up win there
        got[row, runner_up[row]] = ref[row, top[row]] + 1.0
    want = max(ref[r, top[r]] - ref[r, runner_up[r]] for r in (3, 17)).item()
    assert gpu_bench.mismatch_margin(got, ref) == pytest.approx(want)


def test_gpu_vs_llamacpp_table(tmp_path, monkeypatch) -> None:
    """Both engines' reports parsed and set side by side: ratio llamapy / llama.cpp, the
    roofline for token generation only, a dash where an engine has no figure."""
    import importlib.util
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its bench_args import

    spec = importlib.util.spec_from_file_location(
        "gpu_vs_llamacpp", ROOT / "benchmarks/gpu_vs_llamacpp.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = tmp_path / "smollm2-135m-Q4_0.gguf", tmp_path / "llama-3.2-1b-Q8_0.gguf"

    def entry(path, n_prompt, n_gen, ts, sd):
        return {"model_filename": str(path), "n_prompt": n_prompt, "n_gen": n_gen,
                "avg_ts": ts, "stddev_ts": sd}  # fmt: skip

    rows = [entry(a, 512, 0, 50000.0, 900.0), entry(a, 0, 128, 900.0, 5.0)]
    report = json.dumps([*rows, entry(b, 0, 128, 800.0, 4.0)])
    theirs = mod.llama_bench_rows(report)
    assert theirs[(a.name, "pp512")] == (50000.0, 900.0)
    assert theirs[(a.name, "tg128")] == (900.0, 5.0)
    ours = mod.gpu_bench_rows({
        a.name: {"bench": [{"test": "pp512", "ts": 150000.0, "sd": 10.0},
                           {"test": "tg128", "ts": 1800.0, "sd": 1.0}]},
        b.name: {"check": {}, "bench": []},
    })  # fmt: skip
    assert ours == {(a.name, "pp512"): (150000.0, 10.0), (a.name, "tg128"): (1800.0, 1.0)}
    sizes = {a.name: 80 << 20, b.name: 1 << 30}
    out = mod.table([a, b], sizes, theirs, ours, copy_bw=4e12).splitlines()
    roof = f"{4e12 / (80 << 20):.0f}"
    assert out[2] == f"| {a.name} | 80.0 | tg128 | 900.0 ± 5.0 | 1800.0 ± 1.0 | 2.00 | {roof} |"
    assert out[3] == f"| {a.name} | 80.0 | pp512 | 50000.0 ± 900.0 | 150000.0 ± 10.0 | 3.00 |  |"
    assert out[4] == f"| {b.name} | 1024.0 | tg128 | 800.0 ± 4.0 | - | - | 3725 |"
    assert out[5] == f"| {b.name} | 1024.0 | pp512 | - | - | - |  |"
    # llama-batched-bench's jsonl lines (among its log lines) and gpu_bench's batched rows
    log = "main: n_kv_max = 70000\n" + "\n".join(
        json.dumps({"pp": 128, "tg": 128, "pl": pl, "speed_pp": 1.0, "speed_tg": tg})
        for pl, tg in ((64, 11702.5), (256, 18149.0))
    )
    theirs |= mod.batched_rows(log, b.name)
    assert theirs[(b.name, "batched B=64")] == (11702.5, 0.0)
    ours |= mod.gpu_bench_rows(
        {b.name: {"bench": [{"test": "batched B=64", "ts": 29000.0, "sd": 0.0}]}}
    )
    rows = mod.table([b], sizes, theirs, ours, 4e12, ("tg128", "batched B=64", "batched B=256"))
    lines = rows.splitlines()
    assert (
        lines[3]
        == f"| {b.name} | 1024.0 | batched B=64 | 11702.5 ± 0.0 | 29000.0 ± 0.0 | 2.48 |  |"
    )
    assert lines[4] == f"| {b.name} | 1024.0 | batched B=256 | 18149.0 ± 0.0 | - | - |  |"
    # --hf: transformers eager's lines (among its warnings) and llamapy's tg128 per file
    hf = mod.hf_rows(
        "warning: something\n"
        "transformers eager bf16 smollm2-135m: tg128 35.6 t/s  pp512 9000.0 t/s\n"
        "transformers eager bf16 llama-1b: tg128 61.7 t/s  pp512 8000.0 t/s\n"
    )
    assert hf == {"smollm2-135m": 35.6, "llama-3.2-1b": 61.7}
    lines = mod.hf_table([a, b], hf, ours).splitlines()
    assert lines[2] == f"| {a.name} | 35.6 | 1800.0 | 50.6 |"
    assert lines[3] == f"| {b.name} | 61.7 | - | - |"


def test_gpu_ab_alternates_settings(tmp_path, monkeypatch, capsys) -> None:
    """Settings run in turn for each round, each under its own environment, with
    gpu_bench.py's arguments and a --json path; the table holds every round's t/s and each
    setting's mean over the first's."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_ab", ROOT / "benchmarks/gpu_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    tps = {"1": [1000.0, 1010.0], "0": [900.0, 910.0]}

    def fake_run(cmd, env):
        flag = env["LLAMAPY_X"]
        calls.append((flag, cmd[2:-2]))
        ts = tps[flag][sum(1 for f, _ in calls if f == flag) - 1]
        report = {"f.gguf": {"bench": [{"test": "tg128", "ts": ts, "sd": 0.0}]}}
        Path(cmd[-1]).write_text(json.dumps(report))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    md = tmp_path / "ab.md"
    argv = ["gpu_ab.py", "--setting", "new:LLAMAPY_X=1", "--setting", "old:LLAMAPY_X=0",
            "--md", str(md), "--", "f.gguf", "--tg", "128"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    assert [flag for flag, _ in calls] == ["1", "0", "1", "0"]  # alternating, two rounds
    assert all(args == ["f.gguf", "--tg", "128"] for _, args in calls)
    lines = md.read_text().splitlines()
    assert lines[0] == "| file | test | new | old | old / new |"
    assert lines[2] == "| f.gguf | tg128 | 1000.0 / 1010.0 | 900.0 / 910.0 | 0.900 |"
    assert lines[2] in capsys.readouterr().out
    assert mod.setting("base:") == ("base", {})
    assert mod.setting("a:X=1,Y=") == ("a", {"X": "1", "Y": ""})


def test_gpu_vs_llamacpp_prepare_makes_the_files_only(tmp_path, monkeypatch, capsys, smollm2_path):
    """--prepare: with llama.cpp already built (no build started), the missing files are made
    by `llamapy mkmodel` and listed; no benchmark runs."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "gpu_vs_llamacpp", ROOT / "benchmarks/gpu_vs_llamacpp.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tools, work, bin_dir = tmp_path / "tools", tmp_path / "work", tmp_path / "bin"
    for d in (tools, bin_dir):
        d.mkdir()
    (tools / "build-llamacpp.sh").write_text("exit 1\n")  # must not run: the build is there
    (tools / "llamacpp-src.tgz").write_bytes(b"")
    (tools / "vocab-smollm2.gguf").symlink_to(smollm2_path)
    (bin_dir / "llama-bench").write_text("")
    monkeypatch.setattr(mod, "BIN", bin_dir)
    ran = []
    monkeypatch.setattr(mod, "_output", lambda cmd: ran.append(cmd) or "")
    argv = ["gpu_vs_llamacpp.py", "--tools", str(tools), "--work", str(work), "--shapes",
            "smollm2-135m", "--types", "Q8_0", "--prepare"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    made = work / "smollm2-135m-Q8_0.gguf"
    assert made.is_file() and made.stat().st_size > 100 << 20
    assert str(made) in capsys.readouterr().out
    assert ran == [] and not (work / "build.log").exists()
