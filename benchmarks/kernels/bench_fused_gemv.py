"""Fused decode GEMVs vs the unfused kernel sequence, on a GPU, at the decode shapes of
SmolLM2-135M and Llama-3.2-1B.

Per matrix: QKV / gate_up: RMSNorm kernel + GEMV vs the GEMV with the norm inside; o_proj:
GEMV + residual add vs the GEMV adding into the residual; down: activation kernel + GEMV +
add vs the GEMV with both. Per layer: the model's unfused sequence (add + norm, QKV, o_proj,
add + norm, gate_up, activation, down) vs the four fused GEMVs (attention excluded: the same
in both). Timed as tune_decode.py does: CUDA-graph replays over rotating weight copies (more
bytes than L2 holds), float32 activations as the model runs.

    python benchmarks/kernels/bench_fused_gemv.py [--types Q4_0,Q4_K] [--rows 1]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tune_decode import graph_time, random_packed  # noqa: E402

from llamapy.kernels.triton import activation, norm, qmatmul_kquants  # noqa: E402
from llamapy.kernels.triton.qmatmul import qmatmul_with  # noqa: E402
from llamapy.quant.types import QuantType, row_nbytes  # noqa: E402

# (model, hidden, intermediate, q + k + v rows)
MODELS = [("smol", 576, 1536, 960), ("1b", 2048, 8192, 3072)]
EPS = 1e-5
DEVICE = "cuda"


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil((256 << 20) / nbytes)))


def bench_model(name: str, h: int, inter: int, nqkv: int, qtype: QuantType, m: int) -> None:
    if qtype in qmatmul_kquants.TYPES and (h % 256 or inter % 256):
        print(f"| {name} | - | {qtype.name} | (K not a multiple of 256: skipped) |")
        return
    dev, f32 = DEVICE, torch.float32
    shapes = {"qkv": (nqkv, h), "o": (h, h), "gate_up": (2 * inter, h), "down": (h, inter)}
    layer_bytes = sum(n * row_nbytes(qtype, k) for n, k in shapes.values())
    copies = copies_for(layer_bytes)
    ws = {op: random_packed(qtype, n, k, copies) for op, (n, k) in shapes.items()}
    res = torch.randn(m, h, device=dev)
    x = torch.randn(m, h, device=dev)  # an attention output / the previous layer's h
    g = torch.rand(h, device=dev) + 0.5
    gu = torch.randn(m, 2 * inter, device=dev)
    attn = torch.randn(m, h, device=dev)
    outs = {op: torch.empty(m, n, device=dev, dtype=f32) for op, (n, _) in shapes.items()}

    def gemv(op, w, xin, **kw):
        return qmatmul_with(xin, w, out=outs[op] if "residual" not in kw else None, **kw)

    def unfused_norm(op, w):
        gemv(op, w, norm.rms_norm(res, g, EPS))

    def fused_norm(op, w):
        qmatmul_with(res, w, norm_weight=g, eps=EPS, out=outs[op])

    def unfused_res(w):
        res.add_(gemv("o", w, attn))

    def fused_res(w):
        qmatmul_with(attn, w, residual=res)

    def unfused_down(w):
        res.add_(gemv("down", w, activation.silu_and_mul_fused(gu)))

    def fused_down(w):
        qmatmul_with(gu, w, act="silu", residual=res)

    rows = [
        ("qkv norm", [functools.partial(unfused_norm, "qkv", w) for w in ws["qkv"]],
         [functools.partial(fused_norm, "qkv", w) for w in ws["qkv"]]),
        ("o +res", [functools.partial(unfused_res, w) for w in ws["o"]],
         [functools.partial(fused_res, w) for w in ws["o"]]),
        ("gate_up norm", [functools.partial(unfused_norm, "gate_up", w) for w in ws["gate_up"]],
         [functools.partial(fused_norm, "gate_up", w) for w in ws["gate_up"]]),
        ("down act+res", [functools.partial(unfused_down, w) for w in ws["down"]],
         [functools.partial(fused_down, w) for w in ws["down"]]),
    ]  # fmt: skip

    def unfused_layer(i):  # the model's sequence before this change
        xn, _ = norm.fused_add_rms_norm(x, res, g, EPS)
        gemv("qkv", ws["qkv"][i], xn)
        hh = gemv("o", ws["o"][i], attn)
        xn, _ = norm.fused_add_rms_norm(hh, res, g, EPS)
        a = activation.silu_and_mul_fused(gemv("gate_up", ws["gate_up"][i], xn))
        gemv("down", ws["down"][i], a)

    def fused_layer(i):
        qmatmul_with(res, ws["qkv"][i], norm_weight=g, eps=EPS, out=outs["qkv"])
        qmatmul_with(attn, ws["o"][i], residual=res)
        qmatmul_with(res, ws["gate_up"][i], norm_weight=g, eps=EPS, out=outs["gate_up"])
        qmatmul_with(gu, ws["down"][i], act="silu", residual=res)

    idx = range(copies)
    rows.append(("layer (4 GEMVs)", [functools.partial(unfused_layer, i) for i in idx],
                 [functools.partial(fused_layer, i) for i in idx]))  # fmt: skip
    for op, unfused, fused in rows:
        shape = shapes.get(op.split()[0])
        label = f"{shape[0]}x{shape[1]}" if shape else f"{layer_bytes / 2**20:.1f} MiB"
        t_u, t_f = graph_time(unfused), graph_time(fused)
        print(f"| {name} {op} | {label} | {qtype.name} | {t_u:.2f} | {t_f:.2f} | "
              f"{t_u / t_f:.2f}x |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q4_K,Q8_0,Q6_K")
    parser.add_argument("--rows", type=int, default=1, help="decode batch rows (<= 4)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {args.rows} row(s), float32 activations")
    print("| matrix | shape | type | unfused us | fused us | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tname in args.types.split(","):
        for model in MODELS:
            bench_model(*model, QuantType[tname], args.rows)


if __name__ == "__main__":
    main()
