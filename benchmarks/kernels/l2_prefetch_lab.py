"""Does a decode GEMV run faster when its weights already sit in L2, and can a prefetch of the
next matrices, running beside the current GEMV, put them there? (issue 6, the 1B's tg128)

The 1B's GEMVs stream their bytes at 19-37% of DRAM peak (benchmarks/RESULTS.md, seventeenth
session): bound by latency, DRAM mostly idle. If the weights of the *next* GEMV were pulled into
L2 (50 MiB on an H100 / H200; a 1B layer's four matrices are 33 MiB at Q4_0) while the current
one runs, that GEMV would read at L2 latency. This lab measures, as CUDA-graph replays:

1. per matrix: the GEMV over rotating copies (cold, what a decode step sees) and over one copy
   (hot in L2): the ceiling of any prefetch;
2. a chain of L layers x [qkv, o, gate_up, down] GEMVs (the 1B's shapes): distinct weights
   (cold), the same layer L times (hot), and distinct weights with a prefetch kernel on a side
   stream (a branch of the graph) that pulls matrix i + D into L2 when matrix i starts, by
   Hopper's bulk prefetch (`cp.async.bulk.prefetch.L2`: one instruction a chunk, nothing
   returns to registers) or by `prefetch.global.L2` a 128-byte line; and the same prefetch
   launched in line on the main stream.

    python benchmarks/kernels/l2_prefetch_lab.py [--types Q4_0,Q8_0] [--layers 16]

Needs a CUDA device of compute capability >= 9.0 for the bulk form.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from tune_decode import graph_time  # us a call, replaying one graph of all calls

from llamapy.kernels.triton.qmatmul import PackedWeight, pack_weight, qmatmul_with
from llamapy.quant.types import QuantType, row_nbytes

# (name, N, K) of a Llama-3.2-1B layer's decode GEMVs, in step order
LAYER = [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)]


@triton.jit
def _bulk_prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Lane j of program p prefetches chunks p * LANES + j, + programs * LANES, ... of
    [ptr, ptr + nbytes) (ptr 16-byte aligned, nbytes a multiple of 16) into L2."""
    pid = tl.program_id(0)
    lane = tl.arange(0, LANES)
    stride = tl.num_programs(0).to(tl.int64) * LANES * CHUNK
    first = (pid * LANES + lane).to(tl.int64) * CHUNK
    for start in range(0, tl.cdiv(nbytes, stride)):
        off = first + start * stride
        ok = off < nbytes
        size = tl.minimum(nbytes - off, CHUNK).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $3, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r,r",
            [ptr + off, size, ok.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def _line_prefetch_kernel(ptr, nbytes, BLOCK: tl.constexpr):
    """Each program prefetches BLOCK 128-byte lines a step, grid-strided, into L2."""
    pid = tl.program_id(0)
    lines = tl.arange(0, BLOCK).to(tl.int64)
    stride = tl.num_programs(0).to(tl.int64) * BLOCK * 128
    for start in range(0, tl.cdiv(nbytes, stride)):
        off = pid.to(tl.int64) * BLOCK * 128 + start * stride + lines * 128
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r",
            [ptr + off, (off < nbytes).to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


def prefetch(w: PackedWeight, how: str, programs: int) -> None:
    """Pull every tensor of `w` into L2 (`how`: "bulk" or "lines")."""
    for t in w.tensors.values():
        start = t.data_ptr() & ~15
        end = (t.data_ptr() + t.numel() * t.element_size() + 15) & ~15
        view = torch.empty(0, dtype=torch.uint8, device=t.device).set_(
            t.untyped_storage(), 0, (t.untyped_storage().nbytes(),)
        )
        base = view[start - view.data_ptr() :]
        if how == "bulk":
            _bulk_prefetch_kernel[(programs,)](base, end - start, CHUNK=16384, LANES=32,
                                               num_warps=1)  # fmt: skip
        else:
            _line_prefetch_kernel[(programs,)](base, end - start, BLOCK=256, num_warps=4)


def replay_us(record: Callable[[], None], reps: int = 20) -> float:
    """Microseconds per replay of a graph `record` captures (it may fork side streams)."""
    return graph_time([record], reps)


def random_weight(qtype: QuantType, n: int, k: int) -> PackedWeight:
    data = torch.randint(0, 256, (n, row_nbytes(qtype, k)), dtype=torch.uint8)
    if qtype is QuantType.Q8_0:  # finite fp16 scales: a small positive d in each block
        data.view(n, k // 32, 34)[:, :, 0] = 0
        data.view(n, k // 32, 34)[:, :, 1] = 0x20
    elif qtype is QuantType.Q4_0:
        data.view(n, k // 32, 18)[:, :, 0] = 0
        data.view(n, k // 32, 18)[:, :, 1] = 0x20
    return pack_weight(data.cuda(), qtype, (n, k))


def per_matrix(qtype: QuantType) -> list[str]:
    rows = []
    for name, n, k in LAYER + [("output", 128256, 2048)]:
        w0 = random_weight(qtype, n, k)
        copies = max(2, min(48, math.ceil((256 << 20) / w0.nbytes)))
        ws = [w0] + [random_weight(qtype, n, k) for _ in range(copies - 1)]
        x = torch.randn(1, k, device="cuda")
        out = torch.empty(1, n, device="cuda")
        calls = [functools.partial(qmatmul_with, x, w, out=out) for w in ws]
        cold = replay_us(lambda calls=calls: [c() for c in calls]) / len(calls)
        hot = replay_us(lambda calls=calls: [calls[0]() for _ in calls]) / len(calls)
        mib = w0.nbytes / 2**20
        rows.append(f"| {qtype.name} | {name} | {mib:.2f} | {cold:.2f} | {hot:.2f} | "
                    f"{cold / hot:.2f}x |")  # fmt: skip
        del ws
    return rows


def chain(qtype: QuantType, layers: int, programs: int) -> list[str]:
    weights = [[random_weight(qtype, n, k) for _, n, k in LAYER] for _ in range(layers)]
    xs = {k: torch.randn(1, k, device="cuda") for _, _, k in LAYER}
    outs = {n: torch.empty(1, n, device="cuda") for _, n, _ in LAYER}
    flat = [w for layer in weights for w in layer]
    hot_flat = weights[0] * layers

    def gemv(w: PackedWeight) -> None:
        qmatmul_with(xs[w.k], w, out=outs[w.n])

    def plain(ws: list[PackedWeight]) -> Callable[[], None]:
        return lambda: [gemv(w) for w in ws]

    def side(ws: list[PackedWeight], how: str, ahead: int) -> Callable[[], None]:
        def record() -> None:
            main = torch.cuda.current_stream()
            stream = torch.cuda.Stream()
            stream.wait_stream(main)
            with torch.cuda.stream(stream):  # the first `ahead` matrices before anything
                for w in ws[:ahead]:
                    prefetch(w, how, programs)
            for i, w in enumerate(ws):
                if i + ahead < len(ws):
                    stream.wait_stream(main)
                    with torch.cuda.stream(stream):
                        prefetch(ws[i + ahead], how, programs)
                gemv(w)
            main.wait_stream(stream)

        return record

    def inline(ws: list[PackedWeight], how: str) -> Callable[[], None]:
        def record() -> None:
            for i, w in enumerate(ws):
                if i + 1 < len(ws):
                    prefetch(ws[i + 1], how, programs)
                gemv(w)

        return record

    variants = {
        "cold (distinct layers)": plain(flat),
        "hot (one layer repeated)": plain(hot_flat),
        "side bulk, 1 ahead": side(flat, "bulk", 1),
        "side bulk, 2 ahead": side(flat, "bulk", 2),
        "side bulk, 4 ahead": side(flat, "bulk", 4),
        "side lines, 1 ahead": side(flat, "lines", 1),
        "side lines, 2 ahead": side(flat, "lines", 2),
        "inline bulk, 1 ahead": inline(flat, "bulk"),
    }
    rows = []
    cold = None
    for name, record in variants.items():
        try:
            times = [replay_us(record) for _ in range(3)]
        except Exception as exc:  # a variant that does not compile or launch
            rows.append(f"| {qtype.name} | {name} | failed: {type(exc).__name__}: {exc} |")
            continue
        t = min(times)
        cold = cold or t
        rows.append(f"| {qtype.name} | {name} | {t / layers:.2f} | {cold / t:.3f}x | "
                    f"{' / '.join(f'{v / layers:.2f}' for v in times)} |")  # fmt: skip
    return rows


def check_prefetch_harmless(how: str) -> None:
    """A prefetch changes no byte: the weights' tensors and a GEMV's output are the same."""
    w = random_weight(QuantType.Q4_0, 3072, 2048)
    before = {k: t.clone() for k, t in w.tensors.items()}
    x = torch.randn(1, 2048, device="cuda")
    ref = qmatmul_with(x, w)
    prefetch(w, how, 8)
    torch.cuda.synchronize()
    assert all(torch.equal(before[k], t) for k, t in w.tensors.items())
    assert torch.equal(qmatmul_with(x, w), ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q8_0")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--programs", type=int, default=8, help="prefetch kernel's programs")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for how in ("bulk", "lines"):
        check_prefetch_harmless(how)
    print("prefetch kernels: weights and GEMV outputs unchanged", flush=True)
    mats, chains = [], []
    for name in args.types.split(","):
        qtype = QuantType[name]
        mats += per_matrix(qtype)
        print("\n".join(mats[-5:]), flush=True)
        chains += chain(qtype, args.layers, args.programs)
        print("\n".join(chains[-8:]), flush=True)
    print("\n| type | matrix | MiB | cold us | hot (L2) us | cold / hot |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(mats))
    print(f"\n| type | {args.layers}-layer chain | us a layer | vs cold | three replays |")
    print("| --- | --- | ---: | ---: | --- |")
    print("\n".join(chains))


if __name__ == "__main__":
    main()
