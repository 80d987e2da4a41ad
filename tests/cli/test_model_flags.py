"""The model flags every generating command shares (`cli.common.add_model_args`): bad
values are one-line usage errors before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "-t", "0"], "--threads must be positive, got 0"),
        (["serve", "-c", "-1"], "--ctx-size must be >= 0"),
        (["serve", "--port", "0"], "--port must be in 1..65535"),
        (["serve", "--parallel", "0"], "--parallel must be positive"),
        (["chat", "-t", "-2"], "--threads must be positive, got -2"),
        (["chat", "-c", "-5"], "--ctx-size must be >= 0"),
        (["perplexity", "-f", "/etc/hostname", "-t", "0"], "--threads must be positive"),
        (["embed", "-t", "0", "hi"], "--threads must be positive"),
        (["embed", "-c", "-1", "hi"], "--ctx-size must be >= 0"),
        (["embed", "--embd-normalize", "-5", "hi"], "--embd-normalize must be -1, 0 or a"),
        (["rerank", "-t", "0", "-q", "q", "doc"], "--threads must be positive"),
        (["run", "-ctk", "q4_0", "hi"], "KV cache type must be one of f32, f16, bf16"),
        (["chat", "-ctv", "f64"], "KV cache type must be one of f32, f16, bf16"),
        (["serve", "-ctk", "f16", "-ctv", "bf16"], "-ctk f16 and -ctv bf16 differ"),
        (["perplexity", "-f", "/etc/hostname", "-ctk", "x"], "KV cache type must be one of"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_model_flags_are_one_line_errors(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llamapy", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
