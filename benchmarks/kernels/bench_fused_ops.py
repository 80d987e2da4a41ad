"""Fused elementwise Triton kernels vs the torch ops the model runs today (layers/), same
inputs, same sitting: RMSNorm, residual add + RMSNorm, per-head q RMSNorm, rotary, rotary +
KV-cache write, SiLU / GELU-tanh and-mul. Shapes of SmolLM2-135M (D=576) and Llama-3.2-1B
(D=2048), bf16 activations, T tokens per step.

Each case is first checked (max |triton - torch| / max |torch|), then timed: median of
triton.testing.do_bench (eager launches, L2 flushed) and of do_bench_cudagraph (replayed
graphs: the decode path, no launch overhead). A short table comes last.

    python benchmarks/kernels/bench_fused_ops.py [--tokens 1 64 512] [--dims 576 2048] [--json]
    python benchmarks/kernels/bench_fused_ops.py --smoke   # tiny, CPU, TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

if "--smoke" in sys.argv:  # Triton reads this when the kernels are decorated (at import)
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from llamapy.kernels.triton import activation, norm, rotary
from llamapy.layers import activation as torch_activation
from llamapy.layers.attention import write_kv
from llamapy.layers.norm import rms_norm as torch_rms_norm
from llamapy.layers.rotary import RotaryEmbedding

EPS = 1e-5
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_heads: int
    num_kv: int
    head_dim: int
    ffn: int


MODELS = {
    576: ModelShape(num_heads=9, num_kv=3, head_dim=64, ffn=1536),  # SmolLM2-135M
    2048: ModelShape(num_heads=32, num_kv=8, head_dim=64, ffn=8192),  # Llama-3.2-1B
    64: ModelShape(num_heads=2, num_kv=1, head_dim=32, ffn=96),  # --smoke
}


@dataclass(frozen=True, slots=True)
class Case:
    """`setup()` makes fresh inputs; `triton` / `torch` run one step on them (timed);
    `outputs(state, result)` picks what the two must agree on."""

    op: str
    setup: Callable[[], dict]
    triton: Callable[[dict], object]
    torch: Callable[[dict], object]
    outputs: Callable[[dict, object], tuple[torch.Tensor, ...]]
    nbytes: int  # bytes the fused kernel must read and write


def _randn(gen: torch.Generator, *shape: int, dtype=torch.bfloat16, device="cpu"):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def make_cases(t: int, d: int, device: str, seed: int) -> list[Case]:
    m = MODELS[d]
    act = torch.bfloat16
    nq, nk = m.num_heads * m.head_dim, m.num_kv * m.head_dim
    rope = RotaryEmbedding(m.head_dim, 10_000.0, interleaved=True)  # llama GGUF layout
    num_slots = (t // BLOCK_SIZE + 4) * BLOCK_SIZE
    cache_shape = (num_slots // BLOCK_SIZE, BLOCK_SIZE, m.num_kv, m.head_dim)

    def setup() -> dict:
        g = torch.Generator().manual_seed(seed)
        cos, sin = rope.cos_sin(torch.randperm(4096, generator=g)[:t])
        return {
            "x": _randn(g, t, d, device=device),
            "residual": _randn(g, t, d, dtype=torch.float32, device=device),
            "w": _randn(g, d, dtype=torch.float32, device=device) + 1.0,
            "w_head": _randn(g, m.head_dim, dtype=torch.float32, device=device) + 1.0,
            "qkv": _randn(g, t, nq + 2 * nk, device=device),
            "cos": cos.to(device),
            "sin": sin.to(device),
            "caches": [torch.zeros(cache_shape, dtype=act, device=device) for _ in range(2)],
            "slots": torch.randperm(num_slots, generator=g)[:t].to(device),
            "gate_up": _randn(g, t, 2 * m.ffn, device=device),
        }

    def qkv(s):  # (T, nh, hd), (T, nkv, hd), (T, nkv, hd) views of the fused projection
        q, k, v = s["qkv"].split([nq, nk, nk], dim=-1)
        return (q.view(t, m.num_heads, m.head_dim), k.view(t, m.num_kv, m.head_dim),
                v.view(t, m.num_kv, m.head_dim))  # fmt: skip

    def torch_rope_cache(s):
        q, k, v = qkv(s)
        q_rot, k_rot = rope(q, s["cos"], s["sin"]), rope(k, s["cos"], s["sin"])
        write_kv(*s["caches"], k_rot, v, s["slots"])
        return q_rot

    def cache_outputs(s, q_rot):
        return (q_rot, *(c.flatten(0, 1)[s["slots"]] for c in s["caches"]))

    def torch_add_norm(s):  # the decoder layer today: x = x + h; rms_norm(x)
        residual = s["residual"] + s["x"]
        return torch_rms_norm(residual, s["w"], EPS).to(s["x"].dtype), residual

    same = lambda s, r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    elt = 2  # bf16
    rope_bytes = 2 * t * (nq + nk) * elt + t * m.head_dim * 4  # q, k in and out; cos, sin
    return [
        Case("rms_norm", setup, lambda s: norm.rms_norm(s["x"], s["w"], EPS),
             lambda s: torch_rms_norm(s["x"], s["w"], EPS), same, 2 * t * d * elt),
        Case("add_rms_norm", setup,
             lambda s: norm.fused_add_rms_norm(s["x"], s["residual"], s["w"], EPS),
             torch_add_norm, same, t * d * (2 * elt + 2 * 4)),
        Case("q_head_norm", setup, lambda s: norm.rms_norm(qkv(s)[0], s["w_head"], EPS),
             lambda s: torch_rms_norm(qkv(s)[0], s["w_head"], EPS), same, 2 * t * nq * elt),
        Case("rotary", setup,
             lambda s: rotary.apply_rotary(*qkv(s)[:2], s["cos"], s["sin"], interleaved=True),
             lambda s: tuple(rope(x, s["cos"], s["sin"]) for x in qkv(s)[:2]), same,
             rope_bytes),
        Case("rotary_cache", setup,
             lambda s: rotary.rotary_and_cache(*qkv(s), s["cos"], s["sin"], *s["caches"],
                                               s["slots"], interleaved=True),
             torch_rope_cache, cache_outputs, rope_bytes + 2 * t * nk * elt),
        Case("silu_mul", setup, lambda s: activation.silu_and_mul_fused(s["gate_up"]),
             lambda s: torch_activation.silu_and_mul(*s["gate_up"].chunk(2, dim=-1)), same,
             3 * t * m.ffn * elt),
        Case("gelu_tanh_mul", setup,
             lambda s: activation.gelu_tanh_and_mul_fused(s["gate_up"]),
             lambda s: torch_activation.gelu_tanh_and_mul(*s["gate_up"].chunk(2, dim=-1)),
             same, 3 * t * m.ffn * elt),
    ]  # fmt: skip


def check(case: Case) -> float:
    """max |triton - torch| / max |torch| over the case's outputs, each run on fresh inputs."""
    s1, s2 = case.setup(), case.setup()
    got, want = case.outputs(s1, case.triton(s1)), case.outputs(s2, case.torch(s2))
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape or a.isnan().any():
            return float("inf")
        scale = b.float().abs().max().clamp_min(1e-30)
        worst = max(worst, float((a.float() - b.float()).abs().max() / scale))
    return worst


def time_us(fn: Callable[[], object], graph: bool) -> float:
    """Median microseconds per call."""
    if not torch.cuda.is_available():  # --smoke: wall clock of a few interpreter runs
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs) * 1e6
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


# bf16 rounding of a few steps on values of the output's scale (torch also rounds in bf16)
TOLERANCE = 2.0**-5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 2048], choices=[576, 2048])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, interpreter")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("needs a CUDA GPU (or --smoke for the interpreter on CPU)")
    device = "cuda" if cuda else "cpu"
    tokens, dims = ([2], [64]) if args.smoke else (args.tokens, args.dims)

    cases = [(t, d, c) for d in dims for t in tokens for c in make_cases(t, d, device, args.seed)]
    errors = {(t, d, c.op): check(c) for t, d, c in cases}  # correctness first
    bad = {k: e for k, e in errors.items() if not e <= TOLERANCE}
    for (t, d, op), e in errors.items():
        verdict = "FAIL" if (t, d, op) in bad else "ok"
        print(f"check {op:14s} T={t:<4d} D={d:<5d} max rel err {e:.2e} {verdict}")
    if bad:
        sys.exit(f"{len(bad)} case(s) disagree with torch beyond {TOLERANCE:.1e}: {sorted(bad)}")

    rows = []
    for t, d, c in cases:
        row = {"op": c.op, "T": t, "D": d, "rel_err": errors[(t, d, c.op)], **time_case(c, cuda)}
        row["triton_gb_s"] = c.nbytes / (row[f"triton_{'graph' if cuda else 'eager'}_us"] * 1e3)
        rows.append(row)
        print(json.dumps(row) if args.json else f"timed {c.op} T={t} D={d}", flush=True)
    print_table(rows, cuda)


def time_case(case: Case, cuda: bool) -> dict[str, float]:
    s_triton, s_torch = case.setup(), case.setup()
    times = {}
    for mode in ["eager", "graph"] if cuda else ["eager"]:
        times[f"torch_{mode}_us"] = time_us(lambda: case.torch(s_torch), mode == "graph")
        times[f"triton_{mode}_us"] = time_us(lambda: case.triton(s_triton), mode == "graph")
    return times


def print_table(rows: list[dict], cuda: bool) -> None:
    modes = ["eager", "graph"] if cuda else ["eager"]
    head = f"{'op':14s} {'T':>4s} {'D':>5s}"
    for mode in modes:
        head += f" {'torch ' + mode:>12s} {'triton ' + mode:>13s} {'x':>6s}"
    print(f"\ndevice: {torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}; µs, median")
    print(head + f" {'GB/s':>7s}")
    for r in rows:
        line = f"{r['op']:14s} {r['T']:4d} {r['D']:5d}"
        for mode in modes:
            a, b = r[f"torch_{mode}_us"], r[f"triton_{mode}_us"]
            line += f" {a:12.1f} {b:13.1f} {a / b:6.2f}"
        print(line + f" {r['triton_gb_s']:7.1f}")


if __name__ == "__main__":
    main()
