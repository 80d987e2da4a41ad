"""kernels/cpu/malloc.py: glibc settings that keep a prefill's scratch pages mapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamapy.kernels.cpu import malloc

GLIBC = malloc._libc() is not None

# One 20 MB tensor allocated, touched and freed: where it came from (mmapped bytes while it
# lives) and what the heap keeps free after it (glibc's mallinfo2, 2.33+).
PROBE = """
import ctypes, json, torch
from llamapy.kernels.cpu.malloc import _libc, tune_malloc
applied = tune_malloc()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = _libc()
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
t = torch.empty(5 << 20, dtype=torch.float32).fill_(1.0)
mapped = libc.mallinfo2().hblkhd - before
del t
print(json.dumps({"applied": applied, "mapped": mapped, "kept": libc.mallinfo2().fordblks}))
"""


def run_probe(code: str, **env_vars: str) -> dict:
    """The JSON line a probe prints, run in a fresh process (glibc's malloc state is per
    process) without the MALLOC_*_ environment variables, which would fix the thresholds."""
    env = dict(os.environ, **env_vars)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(tune: str) -> dict:
    return run_probe(PROBE, LLAMAPY_MALLOC_TUNE=tune)


@pytest.mark.skipif(
    not GLIBC or not hasattr(malloc._libc(), "mallinfo2"), reason="glibc >= 2.33 (mallinfo2)"
)
def test_tuned_heap_keeps_scratch_pages():
    off, on = probe("0"), probe("1")
    assert off["applied"] is False and on["applied"] is True
    mb = 1 << 20
    # defaults: a fresh mapping, unmapped again on free (the next one faults its pages in)
    assert off["mapped"] >= 20 * mb and off["kept"] < 20 * mb, off
    # tuned: from the heap, and the heap keeps the freed pages for the next prefill
    assert on["mapped"] < mb and on["kept"] >= 20 * mb, on


def test_switch_off_and_idempotence(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setenv("LLAMAPY_MALLOC_TUNE", "off")
    assert malloc.tune_malloc() is False
    monkeypatch.setenv("LLAMAPY_MALLOC_TUNE", "1")
    assert malloc.tune_malloc() is False  # decided once per process
    monkeypatch.setattr(malloc, "_applied", None)
    assert malloc.tune_malloc() is GLIBC
    assert malloc.tune_malloc() is GLIBC


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setattr(malloc, "_libc", lambda: None)
    monkeypatch.delenv("LLAMAPY_MALLOC_TUNE", raising=False)
    assert malloc.tune_malloc() is False


# glibc's dynamic threshold: after a mapped 20 MB block is freed, blocks up to 20 MB come
# from the heap (it rises to at most 32 MB); a 10 MB block allocated then either comes from
# the heap (dynamic) or gets its own mapping (`mapped_while_loading`); after the context,
# tune_malloc's 32 MB threshold is back where it was in effect.
LOAD_PROBE = """
import ctypes, json, os, torch
from llamapy.kernels.cpu.malloc import _libc, mapped_while_loading, tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = _libc()
libc.mallinfo2.restype = Info
def mapped_for(mb):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(mb << 18, dtype=torch.float32).fill_(1.0)
    grown = libc.mallinfo2().hblkhd - before
    del t
    return grown
tuned = os.environ["TUNE_FIRST"] == "1" and tune_malloc()
out = {}
with mapped_while_loading():
    out["inside_big"] = mapped_for(20)
    out["inside_after"] = mapped_for(10)
out["after"] = mapped_for(10)
out["tuned"] = tuned
print(json.dumps(out))
"""


def load_probe(tune_first: bool, switch: str = "1") -> dict:
    return run_probe(LOAD_PROBE, LLAMAPY_MALLOC_TUNE=switch, TUNE_FIRST=str(int(tune_first)))


@pytest.mark.skipif(
    not GLIBC or not hasattr(malloc._libc(), "mallinfo2"), reason="glibc >= 2.33 (mallinfo2)"
)
def test_load_context_maps_large_blocks_and_restores_the_tuning():
    mb = 1 << 20
    fresh = load_probe(tune_first=False)
    # inside: the 10 MB block after a freed 20 MB one is mapped (the threshold stays fixed)
    assert fresh["inside_big"] >= 20 * mb and fresh["inside_after"] >= 10 * mb, fresh
    # untuned process: after the context the fixed default threshold stays (10 MB mapped)
    assert fresh["after"] >= 10 * mb, fresh
    tuned = load_probe(tune_first=True)
    assert tuned["tuned"] is True
    assert tuned["inside_after"] >= 10 * mb, tuned
    assert tuned["after"] < mb, tuned  # tune_malloc's 32 MB threshold again: from the heap
    # switched off: glibc's dynamic threshold decides (the freed 20 MB block raised it)
    off = load_probe(tune_first=False, switch="0")
    assert off["inside_big"] >= 20 * mb and off["inside_after"] < mb, off
