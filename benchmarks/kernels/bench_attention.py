"""Paged attention kernels: Triton split-KV decode and varlen prefill vs torch SDPA on the
same K/V gathered into contiguous tensors (the gather itself is not timed: the baseline's
best case), same sitting, same inputs. Every config is checked against SDPA first.

Decode: B in {1, 16, 64, 256}, context {128, 1024, 4096}, SmolLM2 / Llama-3.2-1B / Gemma 3
head shapes, block tables sized for a 4096-token capacity (as a CUDA graph sees them); time
is the median of `triton.testing.do_bench` (launches included) and of
`do_bench_cudagraph` (as the engine replays decode); GB/s counts the K/V bytes read.
Prefill: 512 new tokens, without and after a 1536-token cached prefix; TFLOP/s counts the
causal QK^T and PV multiply-adds.

    python benchmarks/kernels/bench_attention.py [--dtype bf16] [--block-size 16] [--json]
    python benchmarks/kernels/bench_attention.py --smoke   # tiny, CPU, TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

# (n_heads, n_kv, head_dim)
MODELS = {"smollm2-135m": (9, 3, 64), "llama-3.2-1b": (32, 8, 64), "gemma3-270m": (4, 1, 256)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench(fn, *, smoke: bool, graph: bool = False) -> float:
    """Median milliseconds."""
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    if graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


def _paged_kv(batch: int, ctx: int, n_kv: int, d: int, args, device, gen):
    """Caches with `batch` sequences of `ctx` tokens in shuffled blocks, block tables of
    `args.capacity` tokens, and the same K/V gathered contiguously (B, ctx, n_kv, d)."""
    dtype, block_size = DTYPES[args.dtype], args.block_size
    blocks_per_seq = -(-ctx // block_size)
    max_blocks = max(blocks_per_seq, args.capacity // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, n_kv, d)
    k_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device)
    tables[:, :blocks_per_seq] = perm.view(batch, blocks_per_seq)
    used = tables[:, :blocks_per_seq].long()
    k = k_cache[used].flatten(1, 2)[:, :ctx]  # (B, ctx, n_kv, d)
    v = v_cache[used].flatten(1, 2)[:, :ctx]
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, seq_lens, k, v


def _sdpa(q, k, v, scale, causal):
    """q (B, Tq, H, d), k/v (B, L, n_kv, d) -> (B, Tq, H, d); causal aligned to the end."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    t_q, t_k = q.shape[1], k.shape[1]
    mask = None
    if causal and t_q != t_k:  # queries at the end: a shifted causal mask
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    out = torch.nn.functional.scaled_dot_product_attention(
        qh,
        kh,
        vh,
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.float() - want.float()).abs().max().item()
    tol = 1e-4 if got.dtype == torch.float32 else 3e-2
    if not math.isfinite(err) or err > tol:
        raise SystemExit(f"{name}: max error {err:.3g} vs SDPA exceeds {tol}")
    return err


def bench_decode(model, batch, ctx, args, device, gen) -> dict:
    from llamapy.kernels.triton.attention import default_num_splits, paged_attention_decode

    n_heads, n_kv, d = args.models[model]
    dtype = DTYPES[args.dtype]
    k_cache, v_cache, tables, seq_lens, k, v = _paged_kv(batch, ctx, n_kv, d, args, device, gen)
    q = torch.randn(batch, n_heads, d, generator=gen, device=device).to(dtype)
    out = torch.empty_like(q)
    scale = d**-0.5
    run = lambda: paged_attention_decode(  # noqa: E731
        q, k_cache, v_cache, tables, seq_lens, scale=scale, out=out
    )
    ref = lambda: _sdpa(q[:, None], k, v, scale, causal=False)  # noqa: E731
    err = _check(f"decode {model} B={batch} ctx={ctx}", run(), ref()[:, 0])
    t = _bench(run, smoke=args.smoke)
    t_graph = t if args.smoke else _bench(run, smoke=False, graph=True)
    t_sdpa = _bench(ref, smoke=args.smoke)
    kv_bytes = 2 * batch * ctx * n_kv * d * k_cache.element_size()
    splits = default_num_splits(batch, n_kv, tables.shape[1], args.block_size, d, q.device)
    return {
        "op": "decode",
        "model": model,
        "B": batch,
        "ctx": ctx,
        "splits": splits,
        "max_err": err,
        "triton_us": t * 1e3,
        "graph_us": t_graph * 1e3,
        "sdpa_us": t_sdpa * 1e3,
        "GB/s": kv_bytes / (t_graph * 1e-3) / 1e9,
        "speedup": t_sdpa / t,
    }


def bench_prefill(model, q_len, prefix, args, device, gen) -> dict:
    from llamapy.kernels.triton.attention import paged_attention_prefill

    n_heads, n_kv, d = args.models[model]
    dtype = DTYPES[args.dtype]
    k_cache, v_cache, tables, seq_lens, k, v = _paged_kv(
        1, prefix + q_len, n_kv, d, args, device, gen
    )
    q = torch.randn(q_len, n_heads, d, generator=gen, device=device).to(dtype)
    starts = torch.tensor([0, q_len], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    scale = d**-0.5
    run = lambda: paged_attention_prefill(  # noqa: E731
        q, k_cache, v_cache, tables, seq_lens, starts, q_len, scale=scale, out=out
    )
    ref = lambda: _sdpa(q[None], k, v, scale, causal=True)  # noqa: E731
    err = _check(f"prefill {model} {q_len}+{prefix}", run(), ref()[0])
    t = _bench(run, smoke=args.smoke)
    t_sdpa = _bench(ref, smoke=args.smoke)
    visible = q_len * prefix + q_len * (q_len + 1) // 2  # (query, key) pairs
    flops = 4 * n_heads * d * visible
    return {
        "op": "prefill",
        "model": model,
        "B": 1,
        "ctx": f"{q_len}+{prefix}",
        "splits": "-",
        "max_err": err,
        "triton_us": t * 1e3,
        "graph_us": float("nan"),
        "sdpa_us": t_sdpa * 1e3,
        "TFLOP/s": flops / (t * 1e-3) / 1e12,
        "speedup": t_sdpa / t,
    }


def _table(rows: list[dict]) -> str:
    head = f"{'op':8}{'model':14}{'B':>5}{'ctx':>10}{'splits':>7}{'triton us':>11}"
    head += f"{'graph us':>10}{'sdpa us':>10}{'rate':>14}{'vs sdpa':>9}"
    lines = [head]
    for r in rows:
        rate = f"{r['GB/s']:.0f} GB/s" if "GB/s" in r else f"{r['TFLOP/s']:.1f} TF/s"
        lines.append(
            f"{r['op']:8}{r['model']:14}{r['B']:>5}{r['ctx']!s:>10}{r['splits']!s:>7}"
            f"{r['triton_us']:>11.1f}{r['graph_us']:>10.1f}{r['sdpa_us']:>10.1f}{rate:>14}"
            f"{r['speedup']:>8.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="one tiny config (CPU interpreter)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per config")
    args = ap.parse_args()
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are imported
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke for the interpreter)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)

    if args.smoke:
        args.models, args.capacity = {"tiny": (4, 2, 32)}, 64
        decode_cfgs = [("tiny", 2, 40)]
        prefill_cfgs = [("tiny", 24, 0), ("tiny", 24, 16)]
    else:
        args.models, args.capacity = MODELS, 4096  # tokens a block table row can address
        decode_cfgs = [
            (m, b, c) for m in MODELS for b in (1, 16, 64, 256) for c in (128, 1024, 4096)
        ]
        prefill_cfgs = [(m, 512, p) for m in MODELS for p in (0, 1536)]
    rows = []
    for cfg in decode_cfgs:
        rows.append(bench_decode(*cfg, args, device, gen))
        if args.json:
            print(json.dumps(rows[-1]))
    for cfg in prefill_cfgs:
        rows.append(bench_prefill(*cfg, args, device, gen))
        if args.json:
            print(json.dumps(rows[-1]))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU interpreter"
    print(f"\n{name}, {args.dtype}, block_size {args.block_size}; median times")
    print(_table(rows))


if __name__ == "__main__":
    main()
