"""RMSNorm [arXiv:1910.07467] in one pass over each row, optionally fused with the residual add
that precedes it. float32 math as ggml_rms_norm; the torch references are the oracle and the
CPU path.

Launchers take any leading dims whose strides collapse to two levels, e.g. a (T, heads, d)
view of a fused qkv output (row stride != heads * d) for Qwen3 / Gemma 3 q/k norms; the last
dim must be contiguous. Outputs are new contiguous tensors; `fused_add_rms_norm` also
updates the residual in place.
"""

from __future__ import annotations

import torch

from llamapy.kernels.triton import HAS_TRITON, pdl, triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 65536  # a row is held in registers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in float32 (ggml_rms_norm then
    ggml_mul); returns x.dtype."""
    return _rms_norm_f32(x.float(), weight, eps).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (float32 add rounded once to residual.dtype), IN PLACE; returns
    (rms_norm(residual) in x.dtype, residual)."""
    residual.copy_(residual.float() + x.float())
    return _rms_norm_f32(residual.float(), weight, eps).to(x.dtype), residual


def _rms_norm_f32(x32: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.float() if weight is not None else y


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """All on one device that Triton can run on (CUDA, or anything under the interpreter)."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"{op}: tensors on different devices: {[str(t.device) for t in tensors]}")
    if not triton_usable(device):
        raise ValueError(f"{op}: needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def row_strides(op: str, name: str, x: torch.Tensor) -> tuple[int, int, int]:
    """(inner, stride_outer, stride_inner): row r of `x` (all dims but the last) starts at
    (r // inner) * stride_outer + (r % inner) * stride_inner. Raises ValueError when the last
    dim is strided or the leading dims do not collapse to two levels."""
    if x.dim() == 0:
        raise ValueError(f"{op}: {name} must have at least one dim")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{op}: {name}'s last dim must be contiguous, strides {x.stride()}")
    if x.dim() == 1 or x.numel() == 0:  # one row, or none
        return 1, 0, 0
    inner = x.shape[-2]
    try:
        outer = x.view(-1, inner, x.shape[-1])  # (A, B, D), a view: no copy
    except RuntimeError:
        raise ValueError(
            f"{op}: {name}'s leading dims {tuple(x.shape[:-1])} with strides {x.stride()[:-1]} "
            "do not collapse to (rows, inner); pass a contiguous tensor"
        ) from None
    return inner, outer.stride(0), outer.stride(1)


def _check_norm(op: str, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> None:
    check_float(op, "x", x)
    d = x.shape[-1] if x.dim() else 0
    if not 0 < d <= MAX_DIM:
        raise ValueError(f"{op}: last dim must be in 1..{MAX_DIM}, got shape {tuple(x.shape)}")
    if weight is not None:
        check_float(op, "weight", weight)
        if weight.shape != (d,) or (d > 1 and weight.stride(0) != 1):
            raise ValueError(
                f"{op}: weight must be a contiguous ({d},) tensor, got shape {tuple(weight.shape)}"
            )
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _launch(op: str, x, residual, weight, out, eps: float) -> None:
    d = x.shape[-1]
    n_rows = x.numel() // d
    if n_rows == 0:
        return
    inner, sxa, sxb = row_strides(op, "x", x)
    r_inner, sra, srb = (inner, 0, 0)
    if residual is not None:
        r_inner, sra, srb = row_strides(op, "residual", residual)
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(16, 2048 // block_d))  # short rows (per-head norms): several per program
    num_warps = min(16, max(4, rows * block_d // 1024))
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, residual if residual is not None else x, weight if weight is not None else x, out,
        n_rows, inner, sxa, sxb, r_inner, sra, srb, d, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        ROWS=rows, BLOCK_D=block_d, **pdl.launch_options(pdl.pdl_enabled(x.device)),
        num_warps=num_warps,
    )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x` (any leading dims, fp32/fp16/bf16) with a float
    `weight` (D,); float32 math; returns a new contiguous tensor of x's shape and dtype."""
    check_device("rms_norm", x, *([weight] if weight is not None else []))
    _check_norm("rms_norm", x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch("rms_norm", x, None, weight, out, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x IN PLACE (float32 add, rounded once to residual.dtype), then RMSNorm of
    the new residual. Returns (normed in x.dtype, residual), one read of x and residual and
    one write of each output."""
    tensors = [x, residual, *([weight] if weight is not None else [])]
    check_device("fused_add_rms_norm", *tensors)
    _check_norm("fused_add_rms_norm", x, weight, eps)
    check_float("fused_add_rms_norm", "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(
            f"fused_add_rms_norm: residual shape {tuple(residual.shape)} != x shape "
            f"{tuple(x.shape)}"
        )
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch("fused_add_rms_norm", x, residual, weight, out, eps)
    return out, residual


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr,
        n_rows, x_inner, sxa, sxb, r_inner, sra, srb, D, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = (rows < n_rows)[:, None] & col_ok[None, :]  # (ROWS, BLOCK_D)
        x_row = (rows // x_inner) * sxa + (rows % x_inner) * sxb
        x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r_ptrs = res_ptr + ((rows // r_inner) * sra + (rows % r_inner) * srb)[:, None]
            r_ptrs += cols[None, :]
            r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) + x
            r = r.to(res_ptr.dtype.element_ty)  # the stored residual is what gets normed
            tl.store(r_ptrs, r, mask=mask)
            x = r.to(tl.float32)
        mean_sq = tl.sum(x * x, axis=1) / D  # (ROWS,)
        y = x * tl.rsqrt(mean_sq + eps)[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * D + cols[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
