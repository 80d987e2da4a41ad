"""Rotary position embedding [arXiv:2104.09864] for q and k in one launch, optionally writing
the rotated keys and the values into the paged KV cache in the same kernel.

Layouts as `layers.rotary.RotaryEmbedding`: `interleaved=True` rotates pairs (x[2i], x[2i+1])
(ggml's GGML_ROPE_TYPE_NORM, llama GGUFs); False rotates (x[i], x[i + rot_dim/2])
(GGML_ROPE_TYPE_NEOX). Only the first rot_dim = 2 * cos.shape[1] features of a head turn.

The kernels compute in float32 and round once to the output dtype; the references follow
`RotaryEmbedding.__call__` (math in x.dtype), so for fp16/bf16 inputs the two agree to a few
units in the last place, and the kernels are the closer of the two to exact arithmetic.

q, k, v may be (T, heads, d) views with any token and head strides (e.g. split from a fused
qkv projection output); their last dim must be contiguous. Caches are
(num_blocks, block_size, n_kv, d) with a contiguous last dim and slots laid out uniformly
(block stride == block_size * slot stride).
"""

from __future__ import annotations

import torch

from llamapy.kernels.triton import HAS_TRITON, pdl
from llamapy.kernels.triton.norm import check_device, check_float

if HAS_TRITON:
    import triton
    import triton.language as tl


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (T, nh, d) and k (T, nkv, d) IN PLACE by cos/sin (T, rot_dim/2); returns
    (q, k)."""
    rot_dim = 2 * cos.shape[-1]
    q[..., :rot_dim] = _rotate_reference(q[..., :rot_dim], cos, sin, interleaved)
    k[..., :rot_dim] = _rotate_reference(k[..., :rot_dim], cos, sin, interleaved)
    return q, k


def _rotate_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """RotaryEmbedding.__call__ on the rotated part x (T, h, rot_dim), math in x.dtype."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, rot/2)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rotary_and_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    interleaved: bool,
) -> torch.Tensor:
    """Returns rotated q as a new contiguous tensor; stores rotated k and v at `slot_mapping`
    of the caches (cast to their dtype; tokens with slot < 0 are not stored). q, k, v are
    left unchanged."""
    q_out = q.clone(memory_format=torch.contiguous_format)
    k_rot = k.clone(memory_format=torch.contiguous_format)
    apply_rotary_reference(q_out, k_rot, cos, sin, interleaved=interleaved)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    # as attention.write_kv, minus the padding tokens
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k_rot[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
    return q_out


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first rot_dim = 2 * cos.shape[1] features of every head of q (T, nh, d)
    and k (T, nkv, d) IN PLACE, one launch for both; cos/sin (T, rot_dim/2) as
    `RotaryEmbedding.cos_sin(positions)` gives them. Returns (q, k)."""
    rot_dim = check_rope("apply_rotary", q, k, cos, sin)
    check_device("apply_rotary", q, k, cos, sin)
    if q.shape[0] == 0:
        return q, k
    _launch(q, k, None, cos, sin, q, k, None, None, rot_dim, interleaved)
    return q, k


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    interleaved: bool,
) -> torch.Tensor:
    """One kernel: rotate q and k, store rotated k and v (T, nkv, dv) into the paged caches
    (num_blocks, block_size, nkv, d / dv) at `slot_mapping` (T,) (cast to the cache dtype;
    tokens with slot < 0, e.g. CUDA-graph padding, are skipped). Slots must be distinct and
    in range (not checked: that would sync). Returns rotated q as a new contiguous
    (T, nh, d) tensor; q, k, v are not modified."""
    op = "rotary_and_cache"
    rot_dim = check_rope(op, q, k, cos, sin)
    check_device(op, q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    check_cache(op, k, v, k_cache, v_cache, slot_mapping)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return q_out
    k_dst = k_cache.view(-1, *k_cache.shape[2:])  # (slots, nkv, d)
    v_dst = v_cache.view(-1, *v_cache.shape[2:])  # (slots, nkv, dv)
    _launch(q, k, v, cos, sin, q_out, k_dst, v_dst, slot_mapping, rot_dim, interleaved)
    return q_out


def check_rope(op: str, q, k, cos, sin) -> int:
    for name, t in (("q", q), ("k", k)):
        check_float(op, name, t)
        if t.dim() != 3 or (t.stride(-1) != 1 and t.shape[-1] > 1):
            raise ValueError(
                f"{op}: {name} must be (T, heads, head_dim) with a contiguous last dim, "
                f"got shape {tuple(t.shape)} strides {t.stride()}"
            )
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must share T and head_dim"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        check_float(op, name, t)
        if t.dim() != 2 or t.shape[0] != q.shape[0] or (t.stride(-1) != 1 and t.shape[-1] > 1):
            raise ValueError(
                f"{op}: {name} must be (T={q.shape[0]}, rot_dim/2) with a contiguous last dim, "
                f"got shape {tuple(t.shape)} strides {t.stride()}"
            )
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    rot_dim = 2 * cos.shape[1]
    if not 0 < rot_dim <= q.shape[2]:
        raise ValueError(f"{op}: rot_dim {rot_dim} must be in 2..head_dim ({q.shape[2]})")
    return rot_dim


def check_cache(op: str, k, v, k_cache, v_cache, slot_mapping) -> None:
    check_float(op, "v", v)
    if v.dim() != 3 or v.shape[:2] != k.shape[:2] or (v.stride(-1) != 1 and v.shape[-1] > 1):
        raise ValueError(
            f"{op}: v must be (T, n_kv, dv) matching k {tuple(k.shape)} with a contiguous last "
            f"dim, got shape {tuple(v.shape)} strides {v.stride()}"
        )
    for name, cache, x in (("k_cache", k_cache, k), ("v_cache", v_cache, v)):
        check_float(op, name, cache)
        if cache.dim() != 4 or cache.shape[2:] != x.shape[1:]:
            raise ValueError(
                f"{op}: {name} must be (num_blocks, block_size, {x.shape[1]}, {x.shape[2]}), "
                f"got {tuple(cache.shape)}"
            )
        if cache.shape[:2] != k_cache.shape[:2]:
            raise ValueError(f"{op}: k_cache and v_cache differ in (num_blocks, block_size)")
        try:
            cache.view(-1, *cache.shape[2:])
        except RuntimeError:
            raise ValueError(f"{op}: {name}'s slots are not uniformly strided") from None
        if cache.stride(-1) != 1 and cache.shape[-1] > 1:
            raise ValueError(f"{op}: {name}'s last dim must be contiguous")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{op}: slot_mapping must be int64 or int32 of shape ({k.shape[0]},), got "
            f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )


def _launch(q, k, v, cos, sin, q_out, k_out, v_out, slot_mapping, rot_dim, interleaved):
    """One launch over (token, head block): the first q_blocks programs of a token rotate q
    heads, the rest rotate k heads (and copy v heads when writing the cache)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    write_cache = slot_mapping is not None
    block_d = triton.next_power_of_2(head_dim)
    heads = max(1, min(16, 2048 // block_d, triton.next_power_of_2(max(num_heads, num_kv))))
    q_blocks, kv_blocks = triton.cdiv(num_heads, heads), triton.cdiv(num_kv, heads)
    if write_cache:
        v_args = (v, v_out, v.stride(0), v.stride(1), v_out.stride(0), v_out.stride(1), v.shape[2])
    else:
        v_args = (k, k, 0, 0, 0, 0, 1)  # unused
    _rope_kernel[(num_tokens, q_blocks + kv_blocks)](
        q, k, cos, sin, q_out, k_out, slot_mapping if write_cache else cos,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        *v_args, num_heads, num_kv, head_dim, q_blocks,
        ROT_HALF=rot_dim // 2, INTERLEAVED=interleaved, WRITE_CACHE=write_cache,
        COPY_REST=write_cache and rot_dim < head_dim, HEADS=heads,
        BLOCK_HALF=triton.next_power_of_2(rot_dim // 2), BLOCK_D=block_d,
        BLOCK_DV=triton.next_power_of_2(v.shape[2]) if write_cache else 1,
        **pdl.launch_options(pdl.pdl_enabled(q.device)), num_warps=4,
    )  # fmt: skip


if HAS_TRITON:

    @triton.jit
    def _rope_heads(
        src_ptr, dst_ptr, cos, sin, heads, head_ok, s_sh, s_dh, D,
        ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr,
        HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Rotates HEADS heads (rows) of one token: src_ptr/dst_ptr point at the token."""
        src = src_ptr + heads[:, None] * s_sh
        dst = dst_ptr + heads[:, None] * s_dh
        out_ty = dst_ptr.dtype.element_ty
        if INTERLEAVED:  # pairs (x[2i], x[2i+1]): one contiguous tile, split in registers
            c = tl.arange(0, 2 * BLOCK_HALF)
            mask = head_ok[:, None] & (c < 2 * ROT_HALF)[None, :]  # (HEADS, 2 * BLOCK_HALF)
            x = tl.load(src + c[None, :], mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (HEADS, BLOCK_HALF, 2)))  # (HEADS, BLOCK_HALF)
            out = tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos)  # (HEADS, BLOCK_HALF, 2)
            out = tl.reshape(out, (HEADS, 2 * BLOCK_HALF))
            tl.store(dst + c[None, :], out.to(out_ty), mask=mask)
        else:  # pairs (x[i], x[i + rot/2])
            i = tl.arange(0, BLOCK_HALF)
            mask = head_ok[:, None] & (i < ROT_HALF)[None, :]  # (HEADS, BLOCK_HALF)
            x1 = tl.load(src + i[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + ROT_HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dst + i[None, :], (x1 * cos - x2 * sin).to(out_ty), mask=mask)
            tl.store(dst + ROT_HALF + i[None, :], (x1 * sin + x2 * cos).to(out_ty), mask=mask)
        if COPY_REST:  # features past rot_dim pass through
            c = tl.arange(0, BLOCK_D)
            rest = head_ok[:, None] & ((c >= 2 * ROT_HALF) & (c < D))[None, :]
            x = tl.load(src + c[None, :], mask=rest, other=0.0)
            tl.store(dst + c[None, :], x.to(out_ty), mask=rest)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, slot_ptr,
        s_qt, s_qh, s_kt, s_kh, s_cos, s_sin, s_qot, s_qoh, s_kot, s_koh,
        v_ptr, v_out_ptr, s_vt, s_vh, s_vot, s_voh, DV,
        num_heads, num_kv, D, q_blocks,
        ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, WRITE_CACHE: tl.constexpr,
        COPY_REST: tl.constexpr, HEADS: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        i = tl.arange(0, BLOCK_HALF)
        cos = tl.load(cos_ptr + t * s_cos + i, mask=i < ROT_HALF, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t * s_sin + i, mask=i < ROT_HALF, other=0.0).to(tl.float32)
        cos, sin = cos[None, :], sin[None, :]  # (1, BLOCK_HALF)
        if hb < q_blocks:
            heads = hb * HEADS + tl.arange(0, HEADS)
            _rope_heads(
                q_ptr + t * s_qt, q_out_ptr + t * s_qot, cos, sin, heads, heads < num_heads,
                s_qh, s_qoh, D, ROT_HALF, INTERLEAVED, COPY_REST, HEADS, BLOCK_HALF, BLOCK_D,
            )  # fmt: skip
        else:
            heads = (hb - q_blocks) * HEADS + tl.arange(0, HEADS)
            head_ok = heads < num_kv
            dst_row = t
            if WRITE_CACHE:
                dst_row = tl.load(slot_ptr + t).to(tl.int64)
                head_ok = head_ok & (dst_row >= 0)  # padding tokens are not stored
            _rope_heads(
                k_ptr + t * s_kt, k_out_ptr + dst_row * s_kot, cos, sin, heads, head_ok,
                s_kh, s_koh, D, ROT_HALF, INTERLEAVED, COPY_REST, HEADS, BLOCK_HALF, BLOCK_D,
            )  # fmt: skip
            if WRITE_CACHE:
                c = tl.arange(0, BLOCK_DV)
                m = head_ok[:, None] & (c < DV)[None, :]
                x = tl.load(v_ptr + t * s_vt + heads[:, None] * s_vh + c[None, :], mask=m)
                v_dst = v_out_ptr + dst_row * s_vot + heads[:, None] * s_voh + c[None, :]
                tl.store(v_dst, x.to(v_out_ptr.dtype.element_ty), mask=m)
