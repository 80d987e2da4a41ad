"""`llamapy run` through a real process: streamed text on stdout, timings on stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamapy", "run", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


@pytest.mark.models
def test_run_default_model_greedy(smollm2_path) -> None:
    proc = _run("What is 2+2?", "-n", "8", "--temp", "0", "-m", str(smollm2_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "prompt eval" in proc.stderr and "tokens per second" in proc.stderr
    again = _run("What is 2+2?", "-n", "8", "--temp", "0", "-m", str(smollm2_path))
    assert again.stdout == proc.stdout


@pytest.mark.models
def test_run_raw_prompt_from_stdin(smollm2_path) -> None:
    proc = _run("--raw", "-n", "4", "--temp", "0", "-m", str(smollm2_path), stdin="1, 2, 3,")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" 4")


@pytest.mark.models
def test_empty_raw_prompt_is_a_one_line_error(smollm2_path) -> None:
    # SmolLM2 adds no BOS token: a raw empty prompt has no tokens at all
    proc = _run("--raw", "-n", "1", "-m", str(smollm2_path), stdin="")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the prompt is empty" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hi", "--temp", "-1"], "temperature"),
        (["hi", "--top-p", "2"], "top_p"),
        (["hi", "-n", "-5"], "n-predict"),
        (["hi", "-p", "also"], "give the prompt once"),
        (["-f", "/no/such/file.txt"], "cannot read prompt file"),
        (["hi", "-t", "0"], "--threads must be positive, got 0"),
        (["hi", "-c", "-3"], "--ctx-size must be >= 0"),
    ],
)
def test_bad_flags_one_line_exit_2(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_flag_is_usage_error() -> None:
    proc = _run("hi", "--no-such-flag")
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--device", "tpu"), "device must be 'cpu' or 'cuda[:N]'"),
        (("--device", "cpu", "-ngl", "99"), "contradicts -ngl 99"),
        (("-ngl", "-1"), "-ngl must be >= 0"),
    ],
)
def test_bad_device_flags_are_one_line_errors(flags, message) -> None:
    proc = _run("hi", "-n", "1", *flags)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the no-GPU error; this host has one"
)
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    proc = _run("hi", "-n", "1", "--device", "cuda")
    assert proc.returncode == 2
    assert "no CUDA GPU is available" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_cpu_kernels_variable_is_a_one_line_error() -> None:
    import os

    env = {**os.environ, "LLAMAPY_CPU_KERNELS": "turbo"}
    proc = subprocess.run(
        [sys.executable, "-m", "llamapy", "run", "hi", "-n", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2
    assert "LLAMAPY_CPU_KERNELS must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr
