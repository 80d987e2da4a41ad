"""Lab (issue 6, the 1B's tg128): the decode GEMV with x quantized *once*, before the GEMV,
into int8 codes in one or two levels, against the float32-x GEMV and the int8-x GEMV that
quantizes x in every program's prologue (`qmatmul.GEMV_INT8_X`).

Why: the int8-x GEMV takes ~2.2 instructions a weight in its K loop against ~7.3 for float32
x, yet timed only ~1.25x faster at the 1B's gate_up (eighth session). Each of its programs
quantizes the whole x row first (K floats: amax per block, rounding, packing), about as many
instructions again as its share of the weights; in two levels (x ~ s1 c1 + s2 c2, accurate
enough for issue 6's logits bar: top-1 1.000, KL 2.8e-7 in the nineteenth session) twice
that, which made it slower than float32 x. If the producer of x (a norm, the attention's
merge, the gating) wrote the codes once, the GEMV would read them like weights. This lab
times that GEMV, Q4_0 and Q8_0, plain form, at the 1B's shapes, over rotating weight copies
as CUDA-graph replays, with a small tile sweep; the codes come from torch here.

    python benchmarks/kernels/q8x_lab.py [--types Q4_0,Q8_0] [--check-only]

Under TRITON_INTERPRET=1 (no GPU) `--check-only` runs the float64 check on small shapes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math

import torch
import triton
import triton.language as tl
from tune_decode import graph_time as replay_us  # us a call, replaying one graph of all calls

from llamapy.kernels.triton import INTERPRET, xcodes
from llamapy.kernels.triton.qmatmul import _dp4a, _words, pack_weight, qmatmul_with
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, row_nbytes

SHAPES = [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048),
          ("down", 2048, 8192), ("output", 128256, 2048)]  # fmt: skip
QT_CODE = {QuantType.Q4_0: 0, QuantType.Q8_0: 4}


def quantize_x(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (K,) float32 -> codes (levels, K // 4) int32 words (4 int8 codes a word, the first in
    the low byte), scales (levels, K // 32) float32 and code sums (levels, K // 32) int32:
    x ~ sum over levels of scale * codes, each level quantizing what the ones before left."""
    r = x.reshape(-1, 32).double()
    codes, scales, sums = [], [], []
    for _ in range(levels):
        amax = r.abs().amax(dim=1).clamp_min(2.0**-60)
        s = (amax / 127).float().double()
        c = torch.round(r / s[:, None]).clamp(-127, 127)
        r = r - c * s[:, None]
        codes.append(c.to(torch.int8).reshape(-1).view(torch.int32))
        scales.append(s.float())
        sums.append(c.sum(dim=1).to(torch.int32))
    return torch.stack(codes), torch.stack(scales), torch.stack(sums)


@triton.jit
def _pre_step(acc, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, rows, n_mask, nb, b_first,
              QT: tl.constexpr, LEVELS: tl.constexpr, BLOCK_B: tl.constexpr,
              INTERP: tl.constexpr):  # fmt: skip
    """acc (BN, BB) += blocks [b_first, +BLOCK_B) of the rows times the x the codes stand for."""
    offs_b = b_first + tl.arange(0, BLOCK_B)
    b_ok = offs_b < nb
    blk = rows[:, None] * nb + offs_b[None, :]
    d = tl.load(d_ptr + blk, mask=n_mask[:, None] & b_ok[None, :], other=0.0).to(tl.float32)
    if QT == 0:
        w = _words(qs_ptr, rows, n_mask, b_first, nb, 4, 0, BLOCK_B)
        lo = w & 0x0F0F0F0F  # weights 4i .. 4i + 3 of block, word i
        hi = (w >> 4) & 0x0F0F0F0F  # weights 16 + 4i ..
    else:
        lo = _words(qs_ptr, rows, n_mask, b_first, nb, 8, 0, BLOCK_B)
        hi = _words(qs_ptr, rows, n_mask, b_first, nb, 8, 4, BLOCK_B)
    zero = tl.zeros(lo.shape, tl.int32)
    xw = offs_b[:, None] * 8 + tl.arange(0, 4)[None, :]  # (BB, 4) code words, low half
    part = tl.zeros(d.shape, tl.float32)
    for lvl in tl.static_range(LEVELS):
        cl = tl.load(xc_ptr + lvl * (nb * 8) + xw, mask=b_ok[:, None], other=0)
        ch = tl.load(xc_ptr + lvl * (nb * 8) + xw + 4, mask=b_ok[:, None], other=0)
        s = tl.load(xs_ptr + lvl * nb + offs_b, mask=b_ok, other=0.0)
        dot = _dp4a(lo, cl[None, :, :], zero, QT == 4, INTERP)
        dot = _dp4a(hi, ch[None, :, :], dot, QT == 4, INTERP)
        isum = tl.sum(dot, axis=2)
        if QT == 0:
            isum -= 8 * tl.load(xt_ptr + lvl * nb + offs_b, mask=b_ok, other=0)[None, :]
        part += isum.to(tl.float32) * s[None, :]
    return acc + d * part


def quantize(x, xq, pro: int, g=None, eps: float = 1e-5):
    """Fill xq = (codes, scales, sums) with the codes of the row x (K,) or, pro 2, of its
    [gate | up] (2K,): the engine's quantizing kernel (`xcodes._quantize_kernel`, first
    written here), two levels."""
    k = xq[1].shape[-1] * 32
    for dst, src in zip(xq, xcodes.quantize(x.view(1, -1), k, pro, g, eps), strict=True):
        dst.copy_(src)
    return xq


@triton.jit
def _gemv_pre_kernel(
    xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, out_ptr, N, K, steps_per_split,
    QT: tl.constexpr, LEVELS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    SPLIT: tl.constexpr, INTERP: tl.constexpr, RES: tl.constexpr = False,
):  # fmt: skip
    """out[n] = sum_b d[n, b] sum_l s[l, b] (sum_j q[n, b, j] c[l, b, j] - 8 t[l, b]) for this
    program's rows and K split (SPLIT > 1: float32 partials (SPLIT, N) into out)."""
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    while tile < n_tiles:  # one tile a program, or grid-strided over fewer (persistent)
        _pre_tile(tile, pid_k, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, out_ptr, N, K,
                  steps_per_split, QT, LEVELS, BLOCK_N, BLOCK_B, SPLIT, INTERP, RES)  # fmt: skip
        tile += tl.num_programs(0)


@triton.jit
def _pre_tile(
    tile, pid_k, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, out_ptr, N, K, steps_per_split,
    QT: tl.constexpr, LEVELS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    SPLIT: tl.constexpr, INTERP: tl.constexpr, RES: tl.constexpr,
):  # fmt: skip
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n.to(tl.int64)
    n_mask = offs_n < N
    nb = K // 32
    b_start = pid_k * steps_per_split * BLOCK_B
    acc = tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
    if INTERP:  # numpy >= 2.4 cannot make the interpreter's scalars `range` bounds
        step = 0
        while step < steps_per_split:
            acc = _pre_step(acc, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, rows, n_mask, nb,
                            b_start + step * BLOCK_B, QT, LEVELS, BLOCK_B, INTERP)  # fmt: skip
            step += 1
    else:
        for step in range(0, steps_per_split):
            acc = _pre_step(acc, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, rows, n_mask, nb,
                            b_start + step * BLOCK_B, QT, LEVELS, BLOCK_B, INTERP)  # fmt: skip
    y = tl.sum(acc, axis=1)
    if SPLIT == 1:
        if RES:  # out is the residual stream: y added into it
            y += tl.load(out_ptr + offs_n, mask=n_mask, other=0.0)
        tl.store(out_ptr + offs_n, y, mask=n_mask)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * N + offs_n, y, mask=n_mask)


def gemv_pre(xq, w, out, ws, cfg: dict[str, int], levels: int, res: bool = False):
    """The precomputed-codes GEMV; `ws` (SPLIT, N) float32 when cfg's SPLIT > 1; `res`: out
    is a residual the result is added into (SPLIT 1 only)."""
    codes, scales, sums = xq
    nb = w.k // 32
    steps = triton.cdiv(nb, cfg["BLOCK_B"])
    split = cfg["SPLIT"]
    per_split = triton.cdiv(steps, split)
    tiles = triton.cdiv(w.n, cfg["BLOCK_N"])
    # PROGS > 0: that many programs per K split, each looping over tiles (persistent)
    grid = (min(tiles, cfg.get("PROGS", 0) or tiles), split)
    qs = w.tensors["qs"].view(torch.int32)
    target = out if split == 1 else ws
    _gemv_pre_kernel[grid](
        codes, scales, sums, qs, w.tensors["d"], target, w.n, w.k, per_split,
        QT=QT_CODE[w.qtype], LEVELS=levels, BLOCK_N=cfg["BLOCK_N"], BLOCK_B=cfg["BLOCK_B"],
        SPLIT=split, INTERP=INTERPRET, RES=res, num_warps=cfg["num_warps"],
    )  # fmt: skip
    if split > 1:
        torch.sum(ws[:split], dim=0, out=out)
    return out


def random_weight(qtype: QuantType, n: int, k: int, device: str):
    data = torch.randint(0, 256, (n, row_nbytes(qtype, k)), dtype=torch.uint8)
    size = 18 if qtype is QuantType.Q4_0 else 34
    blocks = data.view(n, k // 32, size)
    scale = (torch.rand(n, k // 32) * 0.02 + 0.001).half().view(torch.uint8).view(n, k // 32, 2)
    blocks[:, :, :2] = scale
    return data, pack_weight(data.to(device), qtype, (n, k))


def check(qtype: QuantType, device: str, n: int = 96, k: int = 256) -> None:
    """Against float64: the codes' own error (x ~ sum s c) is the only approximation."""
    data, w = random_weight(qtype, n, k, device)
    x = torch.randn(k)
    wf = dequantize(data, qtype).double()  # llamapy's dequantizer, checked against gguf-py
    for levels in (1, 2):
        codes, scales, sums = quantize_x(x, levels)
        xr = sum(
            (codes[i].view(torch.int8).double().reshape(-1, 32) * scales[i].double()[:, None])
            for i in range(levels)
        ).reshape(-1)  # the x the codes stand for
        ref = wf @ xr
        for cfg in ({"BLOCK_N": 16, "BLOCK_B": 4, "num_warps": 4, "SPLIT": 1},
                    {"BLOCK_N": 8, "BLOCK_B": 2, "num_warps": 2, "SPLIT": 2},
                    {"BLOCK_N": 16, "BLOCK_B": 4, "num_warps": 4, "SPLIT": 2,
                     "PROGS": 2}):  # fmt: skip
            out = torch.full((n,), float("nan"), device=device)
            ws = torch.empty(cfg["SPLIT"], n, device=device)
            xq = (codes.to(device), scales.to(device), sums.to(device))
            got = gemv_pre(xq, w, out, ws, cfg, levels).double().cpu()
            err = (got - ref).abs().max() / ref.abs().max()
            assert err < 1e-5, (qtype, levels, cfg, float(err))
        err_x = ((xr - x.double()).abs().max() / x.abs().max()).item()
        print(f"{qtype.name} levels={levels}: matches float64 of the codes' x; "
              f"x's own error {err_x:.1e}")  # fmt: skip


def code_buffers(k: int, levels: int, device: str):
    nb = k // 32
    return (torch.empty(levels, nb * 8, dtype=torch.int32, device=device),
            torch.empty(levels, nb, device=device),
            torch.empty(levels, nb, dtype=torch.int32, device=device))  # fmt: skip


def check_quantize(device: str, k: int = 512, n: int = 64) -> None:
    """The quantizing kernel's codes stand for its prologue's x (float64) to the 2-level
    error, and the GEMV over them matches float64 W y."""
    data, w = random_weight(QuantType.Q4_0, n, k, device)
    wf = dequantize(data, QuantType.Q4_0).double()
    eps = 1e-5
    for pro in (0, 1, 2):
        x = torch.randn(2 * k if pro == 2 else k)
        g = torch.rand(k) + 0.5
        xd = x.double()
        if pro == 0:
            y = xd
        elif pro == 1:
            y = xd / torch.sqrt((xd * xd).mean() + eps) * g.double()
        else:
            gate, up = xd[:k], xd[k:]
            y = gate * torch.sigmoid(gate) * up
        xq = quantize(x.to(device), code_buffers(k, 2, device), pro, g.to(device), eps)
        codes = xq[0].cpu().view(torch.int8).double().reshape(2, -1, 32)
        xr = (codes * xq[1].cpu().double()[:, :, None]).sum(dim=0).reshape(-1)
        err = ((xr - y).abs().max() / y.abs().max()).item()
        assert err < 1e-4, (pro, err)
        sums = codes.sum(dim=2)
        assert torch.equal(sums, xq[2].cpu().double()), pro
        out = torch.full((n,), float("nan"), device=device)
        cfg = {"BLOCK_N": 2, "BLOCK_B": 8, "num_warps": 1, "SPLIT": 1}
        got = gemv_pre(xq, w, out, None, cfg, 2).double().cpu()
        ref = wf @ y
        gerr = ((got - ref).abs().max() / ref.abs().max()).item()
        assert gerr < 1e-4, (pro, gerr)
        print(f"quantize PRO={pro}: codes within {err:.1e} of float64 x, GEMV within {gerr:.1e}")


# The x-stationary tiles the sweep picked (1B Q4_0, 2 levels; H100)
STATIONARY = {
    "qkv": {"BLOCK_N": 2, "BLOCK_B": 32, "num_warps": 1, "SPLIT": 1},
    "o": {"BLOCK_N": 1, "BLOCK_B": 64, "num_warps": 2, "SPLIT": 1},
    "gate_up": {"BLOCK_N": 2, "BLOCK_B": 32, "num_warps": 1, "SPLIT": 1},
    "down": {"BLOCK_N": 1, "BLOCK_B": 128, "num_warps": 4, "SPLIT": 1},
}


def layer_chain(qtype: QuantType, layers: int = 16) -> list[str]:
    """us a layer of the 1B's four decode GEMVs, distinct weights a layer, as the decode step
    runs them now (fused norm / gating prologues, residual adds) and with codes made by a
    quantizing kernel before each GEMV (or before some)."""
    dims = {name: (n, k) for name, n, k in SHAPES}
    ws = [{name: random_weight(qtype, *dims[name], "cuda")[1] for name in STATIONARY}
          for _ in range(layers)]  # fmt: skip
    hid = 2048
    stream = torch.randn(hid, device="cuda") * 0.1
    attn = torch.randn(hid, device="cuda")
    g1, g2 = torch.rand(hid, device="cuda") + 0.5, torch.rand(hid, device="cuda") + 0.5
    qkv = torch.empty(3072, device="cuda")
    gu = torch.empty(16384, device="cuda")
    c2048 = code_buffers(hid, 2, "cuda")
    c8192 = code_buffers(8192, 2, "cuda")

    def current(lw, name):
        s1 = stream.view(1, -1)
        if name == "qkv":
            qmatmul_with(s1, lw["qkv"], out=qkv.view(1, -1), norm_weight=g1, eps=1e-5)
        elif name == "o":
            qmatmul_with(attn.view(1, -1), lw["o"], residual=s1)
        elif name == "gate_up":
            qmatmul_with(s1, lw["gate_up"], out=gu.view(1, -1), norm_weight=g2, eps=1e-5)
        else:
            qmatmul_with(gu.view(1, -1), lw["down"], act="silu", residual=s1)

    def codes(lw, name, make=True):
        cfg = STATIONARY[name]
        if name == "qkv":
            if make:
                quantize(stream, c2048, 1, g1)
            gemv_pre(c2048, lw["qkv"], qkv, None, cfg, 2)
        elif name == "o":
            if make:
                quantize(attn, c2048, 0)
            gemv_pre(c2048, lw["o"], stream, None, cfg, 2, res=True)
        elif name == "gate_up":
            if make:
                quantize(stream, c2048, 1, g2)
            gemv_pre(c2048, lw["gate_up"], gu, None, cfg, 2)
        else:
            if make:
                quantize(gu, c8192, 2)
            gemv_pre(c8192, lw["down"], stream, None, cfg, 2, res=True)

    def chain(which):
        def run():
            for lw in ws:
                for name in STATIONARY:
                    how = which(name)
                    if how == "float":
                        current(lw, name)
                    else:
                        codes(lw, name, make=how == "codes")

        return run

    variants = {
        "float32 x, fused prologues (the decode step now)": lambda name: "float",
        "codes for all four, a quantizing kernel before each": lambda name: "codes",
        "codes for gate_up and down only": lambda name: (
            "codes" if name in ("gate_up", "down") else "float"),
        "codes for gate_up only": lambda name: "codes" if name == "gate_up" else "float",
        "codes for all four, none made (the ceiling if producers wrote them)":
            lambda name: "stale",
    }  # fmt: skip
    rows = []
    base = None
    for label, which in variants.items():
        run = chain(which)
        t = min(replay_us([run], reps=10) for _ in range(3)) / layers
        base = base or t
        rows.append(f"| {qtype.name} | {label} | {t:.2f} | {base / t:.3f}x |")
        print(rows[-1], flush=True)
    return rows


def configs(n: int, k: int, stationary: bool = False):
    """Tiles to sweep. `stationary`: BLOCK_B = 32 x num_warps, so that Triton's layout gives
    each thread one block's four code words for all BLOCK_N rows (x read once a thread and
    reused from registers) instead of spreading rows over threads that each load x again."""
    nb = k // 32
    if stationary:
        for bn, warps, split in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4)):
            bb = 32 * warps
            if bb * split <= max(nb, 32):
                yield {"BLOCK_N": bn, "BLOCK_B": bb, "num_warps": warps, "SPLIT": split}
        return
    for bn, bb, warps, split in itertools.product((8, 16, 32), (16, 32), (4,), (1, 2)):
        if bb * split <= nb:
            yield {"BLOCK_N": bn, "BLOCK_B": bb, "num_warps": warps, "SPLIT": split}


def bench(qtype: QuantType, persistent: bool, stationary: bool) -> list[str]:
    rows = []
    for name, n, k in SHAPES:
        nbytes = n * row_nbytes(qtype, k)
        copies = max(2, min(48, math.ceil((256 << 20) / nbytes)))
        ws_ = [random_weight(qtype, n, k, "cuda")[1] for _ in range(copies)]
        x = torch.randn(1, k, device="cuda")
        out = torch.empty(1, n, device="cuda")
        base = replay_us([functools.partial(qmatmul_with, x, w, out=out) for w in ws_])
        pro = {}
        for lv in (1, 2):  # the current int8-x GEMV, quantizing in its prologue (its own tiles)
            cfg = {"Q8X": lv}
            calls = [functools.partial(qmatmul_with, x, w, out=out, gemv_config=cfg) for w in ws_]
            pro[lv] = replay_us(calls)
        pre = {}
        out1 = out.view(-1)
        work = torch.empty(4, n, device="cuda")
        for lv in (2, 1):  # the tiles swept for 2 levels; 1 level takes its best
            xq = tuple(t.cuda() for t in quantize_x(x.view(-1).cpu(), lv))
            best = (float("inf"), None)
            timed = []
            for cfg in configs(n, k, stationary) if lv == 2 else [pre[2][1]]:
                calls = [functools.partial(gemv_pre, xq, w, out1, work, cfg, lv) for w in ws_]
                try:
                    t = replay_us(calls, reps=10)
                except Exception as exc:  # out of resources
                    print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                    continue
                best = min(best, (t, cfg), key=lambda p: p[0])
                timed.append((t, cfg))
            pre[lv] = best
            if lv == 2 and persistent:  # the 3 best tiles, grid-strided over 1-8 waves
                pbest = (float("inf"), None)
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                for _, tile in sorted(timed, key=lambda p: p[0])[:3]:
                    for waves in (1, 2, 4, 8):
                        cfg = tile | {"PROGS": sms * waves}
                        calls = [functools.partial(gemv_pre, xq, w, out1, work, cfg, lv)
                                 for w in ws_]  # fmt: skip
                        t = replay_us(calls, reps=10)
                        pbest = min(pbest, (t, cfg), key=lambda p: p[0])
                pre["persistent"] = pbest
        row = (f"| {qtype.name} | {name} | {nbytes / 2**20:.2f} | {base:.2f} | {pro[1]:.2f} | "
               f"{pro[2]:.2f} | {pre[1][0]:.2f} | {pre[2][0]:.2f} | {base / pre[2][0]:.2f}x | "
               f"{pre[2][1]} |")  # fmt: skip
        if persistent:
            t, cfg = pre["persistent"]
            row += f" {t:.2f} | {cfg} |"
        print(row, flush=True)
        rows.append(row)
        del ws_
    return rows


def profile_launches(qtype: QuantType, shape: str, cfg: dict[str, int]) -> None:
    """Eager launches for a profiler (`ncu --kernel-name regex:gemv`): the float32-x GEMV,
    then the precomputed 2-level GEMV with `cfg`, 8 each over rotating copies."""
    name, n, k = next(s for s in SHAPES if s[0] == shape)
    ws_ = [random_weight(qtype, n, k, "cuda")[1] for _ in range(8)]
    x = torch.randn(1, k, device="cuda")
    out = torch.empty(1, n, device="cuda")
    xq = tuple(t.cuda() for t in quantize_x(x.view(-1).cpu(), 2))
    work = torch.empty(4, n, device="cuda")
    for w in ws_:
        qmatmul_with(x, w, out=out)
    torch.cuda.synchronize()
    for w in ws_:
        gemv_pre(xq, w, out.view(-1), work, cfg, 2)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q8_0")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="also grid-stride the best tiles over 1-8 waves of programs",
    )
    parser.add_argument("--profile", metavar="SHAPE", help="only eager launches for ncu")
    parser.add_argument("--chain", action="store_true", help="only the layer chains")
    parser.add_argument(
        "--stationary",
        action="store_true",
        help="sweep x-stationary tiles (BLOCK_B = 32 x num_warps) instead",
    )
    args = parser.parse_args()
    if args.profile:
        cfg = {"BLOCK_N": 16, "BLOCK_B": 16, "num_warps": 4, "SPLIT": 1}
        profile_launches(QuantType[args.types.split(",")[0]], args.profile, cfg)
        return
    device = "cpu" if INTERPRET else "cuda"
    types = [QuantType[t] for t in args.types.split(",")]
    for qtype in types:
        check(qtype, device)
    check_quantize(device)
    if args.check_only:
        return
    if args.chain:
        rows = layer_chain(types[0])
        print("\n| type | 16-layer chain of the 1B's four GEMVs | us a layer | vs now |")
        print("| --- | --- | ---: | ---: |")
        print("\n".join(rows))
        return
    rows = []
    for qtype in types:
        rows += bench(qtype, args.persistent, args.stationary)
    print(
        "\n| type | matrix | MiB | float32 x | int8 x, prologue, 1 / 2 levels | | "
        "precomputed codes, 1 level | 2 levels | float / 2 levels | best tile (2) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
