"""Sweep the decode kernels' tiles at real model shapes on a GPU.

GEMVs run over rotating copies of the weight (more bytes than L2 holds) and every variant is
timed as CUDA-graph replays, which is what a decode step sees: launch gaps included, no host
work. Decode attention (the fused kernel the decode step runs) is timed the same way at a few
context lengths. Prints, per shape, the current choice, the best variant and the speedup,
and writes all timings as JSON.

    python benchmarks/kernels/tune_decode.py --json tune.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time
from collections.abc import Callable

import torch

from llamapy.engine.model_runner import graph_decode_splits
from llamapy.kernels.triton import attention, qmatmul_kquants
from llamapy.kernels.triton.qmatmul import pack_weight, qmatmul_with
from llamapy.quant.types import QuantType, row_nbytes

# (name, N, K): the decode matrices of SmolLM2-135M and Llama-3.2-1B (QKV and gate/up fused;
# "qk" and "v": QKV as two matmuls, where V has another type, as in Q4_K_M files).
SHAPES = [
    ("smol qkv", 960, 576),
    ("smol qk", 768, 576),
    ("smol v", 192, 576),
    ("smol o", 576, 576),
    ("smol gate_up", 3072, 576),
    ("smol down", 576, 1536),
    ("smol output", 49152, 576),
    ("1b qkv", 3072, 2048),
    ("1b qk", 2560, 2048),
    ("1b v", 512, 2048),
    ("1b o", 2048, 2048),
    ("1b gate_up", 16384, 2048),
    ("1b down", 2048, 8192),
    ("1b output", 128256, 2048),
]
# (name, heads, kv heads, head dim)
ATTN = [("smol", 9, 3, 64), ("1b", 32, 8, 64), ("gemma", 4, 1, 256)]


def graph_time(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Microseconds per call, replaying one graph of all calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


def random_packed(qtype: QuantType, n: int, k: int, copies: int) -> list:
    out = []
    for _ in range(copies):
        data = torch.randint(0, 256, (n, row_nbytes(qtype, k)), dtype=torch.uint8)
        out.append(pack_weight(data.cuda(), qtype, (n, k)))
    return out


def legacy_variants(n: int, k: int, wide: bool = False, q8x: int = 0) -> list[dict[str, int]]:
    """The legacy GEMV's tiles; `wide` sweeps 1-2 row tiles, 64-256 blocks a step (a whole
    row of a 2048-wide matrix in one step: more loads in flight) and 1-2 warp programs;
    `q8x` times them with int8 activations in that many levels (`qmatmul.GEMV_INT8_X`)."""
    out = []
    grid = itertools.product((4, 8, 16, 32), (8, 16, 32), (4, 8), (1, 2, 4))
    if wide:
        grid = itertools.product((1, 2, 4, 8), (32, 64, 128, 256), (1, 2, 4), (1, 2))
    nb = k // 32
    nb_pow2 = 1 << max(0, (nb - 1).bit_length())  # a step may be masked past K
    for bn, bb, warps, split in grid:
        if bn > n or (wide and (bb > nb_pow2 or (split > 1 and split * bb > nb))):
            continue
        cfg = {"BLOCK_N": bn, "BLOCK_B": bb, "num_warps": warps, "SPLIT": split}
        out.append(cfg | {"Q8X": q8x})
    return out


def kquant_variants(qtype: QuantType, k: int) -> list[qmatmul_kquants.KernelConfig]:
    units = k // 256
    out = []
    for bn, nsb, warps, split in itertools.product(
        (1, 2, 4, 8, 16), (1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)
    ):
        per_thread = bn * nsb * 32 / (32 * warps)
        if nsb > units or not 4 <= per_thread <= 32 or split > max(1, units // nsb):
            continue
        out.append(qmatmul_kquants.KernelConfig(False, 1, bn, nsb, split, warps))
    return out


def fused_form(name: str, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """x and the qmatmul keywords of a matrix's fused decode form (`DecoderLayer.
    forward_fused`): QKV / gate_up take the RMSNorm prologue, o adds into the residual,
    down takes the SiLU gating of a [gate | up] x and adds into the residual; the output
    matrix stays plain."""
    dev = "cuda"
    role = name.split()[-1]
    if role in ("qkv", "qk", "v", "gate_up"):
        g = torch.rand(k, device=dev, dtype=dtype) + 0.5
        out = torch.empty(1, n, device=dev, dtype=dtype)
        return torch.randn(1, k, device=dev, dtype=dtype), {
            "out": out,
            "norm_weight": g,
            "eps": 1e-5,
        }
    residual = torch.randn(1, n, device=dev, dtype=dtype)
    if role == "o":
        return torch.randn(1, k, device=dev, dtype=dtype), {"residual": residual}
    if role == "down":
        gu = torch.randn(1, 2 * k, device=dev, dtype=dtype)
        return gu, {"act": "silu", "residual": residual}
    return torch.randn(1, k, device=dev, dtype=dtype), {
        "out": torch.empty(1, n, device=dev, dtype=dtype)
    }


def tune_gemv(
    qtype: QuantType,
    dtype: torch.dtype,
    results: list[dict],
    json_path: str | None,
    shapes: str | None = None,
    wide: bool = False,
    q8x: int = 0,
    fused: bool = False,
) -> None:
    for name, n, k in SHAPES:
        if shapes is not None and not any(name.startswith(s) for s in shapes.split(",")):
            continue
        if k % 256 and qtype in qmatmul_kquants.TYPES:
            continue
        nbytes = n * row_nbytes(qtype, k)
        copies = max(2, min(64, math.ceil((256 << 20) / nbytes)))
        ws = random_packed(qtype, n, k, copies)
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        out = torch.empty(1, n, device="cuda", dtype=dtype)
        kw = {"out": out}
        if fused:  # the decode step's form of this matrix (legacy types)
            x, kw = fused_form(name, n, k, dtype)
        base = graph_time([functools.partial(qmatmul_with, x, w, **kw) for w in ws])
        best = (base, "current")
        if qtype in qmatmul_kquants.TYPES:
            for cfg in kquant_variants(qtype, k):
                launch = qmatmul_kquants.launch
                calls = [functools.partial(launch, x, w.tensors, qtype, n, k, out, cfg) for w in ws]
                try:
                    t = graph_time(calls)
                except Exception as exc:  # out of resources: skip the variant
                    print(f"  skip {cfg}: {type(exc).__name__}")
                    continue
                label = f"bn={cfg.block_n} nsb={cfg.nsb} w={cfg.num_warps} split={cfg.split}"
                results.append({"kind": "gemv", "qtype": qtype.name, "shape": name, "cfg": label,
                                "us": t})  # fmt: skip
                best = min(best, (t, label))
        else:
            for cfg in legacy_variants(n, k, wide, q8x):
                calls = [functools.partial(qmatmul_with, x, w, **kw, gemv_config=cfg) for w in ws]
                try:
                    t = graph_time(calls)
                except Exception as exc:
                    print(f"  skip {cfg}: {type(exc).__name__}")
                    continue
                results.append({"kind": "gemv", "qtype": qtype.name, "shape": name,
                                "cfg": json.dumps(cfg), "us": t})  # fmt: skip
                best = min(best, (t, json.dumps(cfg)))
        if json_path:  # as we go: a timed-out sweep keeps what it measured
            with open(json_path, "w") as f:
                json.dump(results, f)
        gbs = nbytes / (best[0] * 1e-6) / 1e9
        print(f"| {qtype.name} | {name} | {nbytes / 2**20:.2f} MiB | {base:.2f} | {best[0]:.2f} | "
              f"{base / best[0]:.2f}x | {gbs:.0f} GB/s | {best[1]} |", flush=True)  # fmt: skip
        del ws


def _fused_attention_us(
    case: dict, splits: int, tiles: tuple[int, int, int] | None, early_v: bool
) -> float:
    """Microseconds per fused decode attention call over the case's rotating caches."""
    c, default = case, attention.DECODE_EARLY_V
    attention.DECODE_EARLY_V = early_v
    try:
        return graph_time([
            functools.partial(
                attention.rope_cache_attention_decode, c["q"], c["k"], c["v"], c["cos"],
                c["sin"], c["kc"], c["vc"], table, c["lens"], slot, interleaved=True,
                scale=c["d"] ** -0.5, sliding_window=c["window"], num_splits=splits,
                out=c["out"], tiles=tiles,
            )
            for table, slot in zip(c["tables"], c["slots"], strict=True)
        ])  # fmt: skip
    finally:
        attention.DECODE_EARLY_V = default


def tune_attention(results: list[dict]) -> None:
    """The decode step's attention as the engine runs it at one sequence: the fused kernel
    (rotary + cache write + split attention, `rope_cache_attention_decode`) and its split
    merge, at the graphs' split count (`graph_decode_splits`) and over tiles, split counts
    and where each tile's V is loaded (`attention.DECODE_EARLY_V`)."""
    block_size, copies = 16, 8
    for (name, heads, kv, d), seq in itertools.product(ATTN, (128, 512, 2048)):
        max_blocks = 4096 // block_size  # a graph's tables: the whole capacity
        kc = torch.randn(max_blocks * copies, block_size, kv, d, device="cuda",
                         dtype=torch.float16)  # fmt: skip
        vc = torch.randn_like(kc)
        tables = [
            torch.arange(i * max_blocks, (i + 1) * max_blocks, device="cuda",
                         dtype=torch.int32)[None]
            for i in range(copies)
        ]  # fmt: skip
        slots = [t[0, (seq - 1) // block_size].long()[None] * block_size
                 + (seq - 1) % block_size for t in tables]  # fmt: skip
        lens = torch.tensor([seq], device="cuda", dtype=torch.int32)
        qkv = torch.randn(1, (heads + 2 * kv) * d, device="cuda")  # the QKV GEMV's output
        q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
        q, k, v = q.view(1, heads, d), k.view(1, kv, d), v.view(1, kv, d)
        cos = torch.randn(1, d // 2, device="cuda")
        sin = torch.randn_like(cos)
        out = torch.empty(1, heads, d, device="cuda")
        window = 512 if name == "gemma" else None

        case = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "kc": kc, "vc": vc,
                "tables": tables, "slots": slots, "lens": lens, "out": out, "d": d,
                "window": window}  # fmt: skip

        def run(splits: int, tiles: tuple[int, int, int] | None, early_v: bool, case=case):
            return _fused_attention_us(case, splits, tiles, early_v)

        current_splits = graph_decode_splits(1, kv)
        base = run(current_splits, None, attention.DECODE_EARLY_V)
        best = (base, "current")
        for bn, stages, splits, early_v in itertools.product(
            (16, 32, 64), (1, 2), (1, 2, 4, 8, 16, 32), (False, True)
        ):
            if d > 128 and bn > 32:
                continue
            if splits > max(1, seq // bn):
                continue
            try:
                t = run(splits, (bn, 4, stages), early_v)
            except Exception as exc:
                print(f"  skip attn {bn} {stages} {splits} {early_v}: {type(exc).__name__}")
                continue
            label = f"bn={bn} st={stages} splits={splits} early_v={int(early_v)}"
            results.append({"kind": "attn", "shape": f"{name} seq={seq}", "cfg": label, "us": t})
            best = min(best, (t, label))
        print(f"| attn {name} | seq {seq} | {base:.2f} | {best[0]:.2f} | {base / best[0]:.2f}x | "
              f"{best[1]} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q4_K,Q8_0,Q6_K")
    parser.add_argument("--no-attention", action="store_true")
    parser.add_argument("--json")
    parser.add_argument(
        "--shapes", help="only the matrices whose name starts with one of these (comma-separated: "
        "smol, 1b, '1b qkv,1b down')",
    )  # fmt: skip
    parser.add_argument("--wide", action="store_true", help="a wider tile space (legacy types)")
    parser.add_argument(
        "--q8x", nargs="?", type=int, const=1, default=0, choices=(0, 1, 2),
        help="legacy variants with int8 activations (1 or 2 levels; bare: 1)",
    )  # fmt: skip
    parser.add_argument("--fused", action="store_true", help="the decode step's fused forms")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: list[dict] = []
    t0 = time.time()
    print(f"{torch.cuda.get_device_name()}")
    if not args.no_attention:
        print("| attention | context | current us | best us | gain | best |")
        tune_attention(results)
    print("| type | matrix | bytes | current us | best us | gain | best GB/s | best |")
    for name in args.types.split(","):
        tune_gemv(
            QuantType[name],
            torch.float32,
            results,
            args.json,
            args.shapes,
            args.wide,
            args.q8x,
            args.fused,
        )  # activations are float32
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
