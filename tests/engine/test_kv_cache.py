"""engine/kv_cache.py: the CPU cache is zeroed, laid out per layer, and resident only as it
fills (an anonymous mapping instead of torch.zeros, which writes every page)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from llamapy.engine.kv_cache import (
    allocate_kv_cache,
    kv_bytes_per_block,
    kv_cache_dtype,
    zero_pages,
)


def _cfg(layers: int = 3, kv_heads: int = 2, head_dim: int = 24, v_head_dim: int | None = None):
    return SimpleNamespace(
        num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_caches_are_zeroed_separate_views(dtype):
    cfg = _cfg(v_head_dim=40)
    caches = allocate_kv_cache(cfg, num_blocks=5, block_size=16, dtype=dtype)
    assert len(caches) == cfg.num_layers
    for k, v in caches:
        assert k.shape == (5, 16, 2, 24) and v.shape == (5, 16, 2, 40)
        assert k.dtype == v.dtype == dtype and k.is_contiguous() and v.is_contiguous()
        assert k.data_ptr() % 4096 == 0 and v.data_ptr() % 4096 == 0  # page-aligned starts
        assert not k.any() and not v.any()
    # writes land in one cache only: no two views overlap
    for i, (k, v) in enumerate(caches):
        k.fill_(i + 1)
        v.fill_(-(i + 1))
    for i, (k, v) in enumerate(caches):
        assert bool((k == i + 1).all()) and bool((v == -(i + 1)).all())
    # the bytes the engine budgets per block (kv_bytes_per_block) fit what was laid out
    per_block = kv_bytes_per_block(cfg, 16, dtype)
    assert per_block == sum(k[0].nbytes + v[0].nbytes for k, v in caches)


def test_zero_pages_shape_and_edge_sizes():
    assert zero_pages(0).shape == (0,)
    t = zero_pages(10_000)
    assert t.shape == (10_000,) and t.dtype == torch.uint8 and not t.any()


# A 256 MiB cache allocated (RSS nearly unchanged), then 4 of its 64 blocks written.
PROBE = """
import json, torch
from types import SimpleNamespace
from llamapy.engine.kv_cache import allocate_kv_cache
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) << 10
cfg = SimpleNamespace(num_layers=4, num_kv_heads=8, head_dim=128, v_head_dim=None)
before = anon()
caches = allocate_kv_cache(cfg, num_blocks=64, block_size=256, dtype=torch.float32)
allocated = anon() - before
for k, v in caches:
    k[:4] = 1.0
    v[:4] = 1.0
written = anon() - before
print(json.dumps({"allocated": allocated, "written": written}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_cache_is_resident_only_as_it_fills():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert out["allocated"] < 8 * mib, out  # of 256 MiB
    assert 16 * mib <= out["written"] < 40 * mib, out  # 4 of 64 blocks: 16 MiB written


def test_kv_cache_type_names() -> None:
    """llama.cpp's -ctk names (and torch's) to dtypes; CUDA takes float16 only; anything else
    is refused naming the choices."""
    assert kv_cache_dtype("f32") == kv_cache_dtype("float32") == torch.float32
    assert kv_cache_dtype("F16") == kv_cache_dtype(" float16") == torch.float16
    assert kv_cache_dtype("bf16") == torch.bfloat16
    assert kv_cache_dtype("f16", "cuda:1") == torch.float16
    for bad, device in (("q8_0", "cpu"), ("", "cpu"), ("f32", "cuda"), ("bf16", "cuda:0")):
        with pytest.raises(ValueError, match="KV cache type must be one of"):
            kv_cache_dtype(bad, device)
