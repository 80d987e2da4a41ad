"""Triton paged attention (varlen prefill, split-KV decode) against the torch reference
`paged_attention` of `llamapy.layers.attention`, run in float64 as the oracle.

Fresh random inputs each run: shuffled, non-contiguous block tables whose unused entries
point at real blocks, cache slots past each sequence's end (and unused blocks) hold NaN so
that a key read past the end shows up, outputs come out of NaN-poisoned buffers. Real
shapes on CUDA, small ones under TRITON_INTERPRET=1.

Error bound, elementwise, with p the softmax weights and S = sum_k p_k |v_k| (the reference
run on |v|): the kernel rounds p to the operand dtype once (relative u) and the output once
(u |out|); logits, sums and products stay in fp32. So |kernel - exact| <= u (S + |exact|)
plus fp32 noise, where u is the unit roundoff of the dtype (2^-8 for bf16: the interpreter
truncates instead of rounding), doubled for margin. fp32 gets U32_ATTN: its logits carry
fp32 dot-product error (~sqrt(d) 2^-24 sum|q k|) and exp2 runs at ~2 ulp.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llamapy.kernels.triton import INTERPRET
from llamapy.kernels.triton.attention import (
    default_num_splits,
    paged_attention,
    paged_attention_decode,
    paged_attention_prefill,
)
from llamapy.layers import attention as attention_layer
from llamapy.layers.attention import AttentionMetadata

# The torch reference (on CUDA `layers.attention.paged_attention` itself may dispatch here).
reference = getattr(attention_layer, "paged_attention_reference", attention_layer.paged_attention)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [
    pytest.mark.skipif(not (ON_GPU or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32_ATTN = 2.0**-18


@pytest.fixture
def gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, math.nan)


@pytest.fixture(autouse=True)
def _poisoned(poisoned: None) -> None:
    """Every test here runs with conftest's NaN-poisoned torch.empty."""


def make_batch(
    gen: torch.Generator,
    q_lens: list[int],
    seq_lens: list[int],
    *,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    spare_blocks: int = 3,
    extra_table_cols: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """q (T, n_heads, d), caches with NaN outside the sequences' tokens, metadata with
    shuffled block tables padded by ids of real blocks."""
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_seq) + extra_table_cols
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen)
    shape = (num_blocks, block_size, n_kv, head_dim)
    k_cache = torch.full(shape, math.nan)
    v_cache = torch.full(shape, math.nan)
    used = 0
    for b, (n, seq_len) in enumerate(zip(blocks_per_seq, seq_lens, strict=True)):
        tables[b, :n] = perm[used : used + n]
        used += n
        slots = (tables[b, :n, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]
        k_cache.view(-1, n_kv, head_dim)[slots] = torch.randn(
            seq_len, n_kv, head_dim, generator=gen
        )
        v_cache.view(-1, n_kv, head_dim)[slots] = torch.randn(
            seq_len, n_kv, head_dim, generator=gen
        )
    starts = np.concatenate([[0], np.cumsum(q_lens)]).tolist()
    q = torch.randn(starts[-1], n_heads, head_dim, generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=DEVICE),  # unused here
        block_tables=tables.to(torch.int32).to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        seq_lens_host=tuple(seq_lens),
        query_start_loc_host=tuple(starts),
    )
    as_dev = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return as_dev(q), as_dev(k_cache), as_dev(v_cache), meta


def exact_and_bound(q, k_cache, v_cache, meta, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference output and the elementwise error bound of the module doc."""
    f64 = [t.double() for t in (q, k_cache, v_cache)]
    exact = reference(*f64, meta, **kw)
    abs_v = reference(f64[0], f64[1], f64[2].abs(), meta, **kw)  # S = sum p |v|
    if q.dtype == torch.float32:
        bound = 2 * U32_ATTN * (abs_v + exact.abs()) + 1e-7
    else:
        bound = 2 * UNIT_ROUNDOFF[q.dtype] * (abs_v + exact.abs()) + 1e-6
    return exact, bound


def assert_within(name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor):
    """|got - want| <= bound elementwise, no NaN in got."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not got.isnan().any(), f"{name}: {int(got.isnan().sum())} NaN"
    err = (got.double() - want.double()).abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        pytest.fail(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements beyond bound; worst at flat {i}: "
            f"got {got.flatten()[i].item()!r} want {want.flatten()[i].item()!r} "
            f"err {err.flatten()[i].item():.3g} bound {bound.flatten()[i].item():.3g}"
        )


def check_against_reference(name, got, q, k_cache, v_cache, meta, **kw) -> None:
    exact, bound = exact_and_bound(q, k_cache, v_cache, meta, **kw)
    assert_within(f"{name} vs float64", got, exact, bound)
    if q.dtype == torch.float32:  # the reference in the same dtype is as accurate
        same = reference(q, k_cache, v_cache, meta, **kw)
        assert_within(f"{name} vs fp32 reference", got, same, 2 * bound)


# ---------------------------------------------------------------- prefill

# (q_lens, seq_lens, n_heads, n_kv, head_dim, block_size, options): mixed batches, some with
# a cached prefix, query lengths 1..N, GQA 1/3/4, both block sizes, masked head dims.
PREFILL_CASES = {
    "plain": ([5, 1, 20, 3], [5, 30, 20, 40], 2, 2, 32, 16, {}),
    "gqa3-window": ([17, 9], [17, 41], 3, 1, 64, 16, {"sliding_window": 7}),
    "gqa4-softcap": ([12, 2, 19], [33, 2, 19], 4, 1, 32, 32, {"softcap": 3.0}),
    "noncausal": ([6, 14], [6, 14], 3, 1, 32, 16, {"causal": False}),
    "noncausal-window": ([11, 4], [11, 20], 2, 1, 32, 32, {"causal": False, "sliding_window": 5}),
    "window-softcap-d80": ([21, 3], [40, 25], 4, 2, 80, 16, {"sliding_window": 9, "softcap": 5.0}),
}
if ON_GPU:  # longer sequences cross many tiles; d 128 and 256
    PREFILL_CASES |= {
        "gpu-long": ([512, 1, 300], [512, 700, 1500], 32, 8, 64, 16, {}),
        "gpu-d128": ([200, 77], [1000, 77], 8, 8, 128, 32, {"sliding_window": 256}),
        "gpu-d256": ([512, 129], [512, 4000], 4, 1, 256, 16, {"sliding_window": 512}),
        "gpu-d256-noncausal": ([64, 100], [64, 100], 4, 1, 256, 16, {"causal": False}),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(case: str, dtype: torch.dtype, gen: torch.Generator):
    q_lens, seq_lens, n_heads, n_kv, d, block_size, kw = PREFILL_CASES[case]
    q, kc, vc, meta = make_batch(
        gen,
        q_lens,
        seq_lens,
        n_heads=n_heads,
        n_kv=n_kv,
        head_dim=d,
        block_size=block_size,
        dtype=dtype,
    )
    out = _nan_like(q)
    got = paged_attention_prefill(
        q,
        kc,
        vc,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        scale=d**-0.5,
        out=out,
        **kw,
    )
    assert got is out
    check_against_reference("prefill", got, q, kc, vc, meta, scale=d**-0.5, **kw)


def test_prefill_strided_q_and_out(gen: torch.Generator):
    """q and out may be views with row strides (e.g. slices of a fused QKV projection)."""
    q, kc, vc, meta = make_batch(
        gen, [7, 3], [7, 19], n_heads=4, n_kv=2, head_dim=32, block_size=16, dtype=torch.float16
    )
    qkv = torch.randn(q.shape[0], 8, 32, generator=gen).to(q.dtype).to(DEVICE)
    qkv[:, 2:6] = q
    out_wide = torch.full((q.shape[0], 6, 32), math.nan, dtype=q.dtype, device=DEVICE)
    got = paged_attention_prefill(
        qkv[:, 2:6],
        kc,
        vc,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        scale=0.2,
        out=out_wide[:, 1:5],
    )
    check_against_reference("strided prefill", got, q, kc, vc, meta, scale=0.2)
    assert out_wide[:, [0, 5]].isnan().all(), "wrote outside the out view"


# ---------------------------------------------------------------- decode

# (seq_lens, n_heads, n_kv, head_dim, block_size, num_splits, options). Interpreter tiles
# are 16 keys: seq 5 with 8 splits leaves 7 empty; 0 is a padded (CUDA-graph) slot.
DECODE_CASES = {
    "one-split": ([5, 30, 47], 2, 2, 32, 16, 1, {}),
    "splits3-gqa3": ([37, 1, 64], 3, 1, 64, 16, 3, {}),
    "empty-splits": ([5, 17], 4, 1, 32, 16, 8, {}),
    "default-splits-gqa4": ([50, 33], 8, 2, 32, 32, None, {}),
    "window": ([70, 6, 33], 4, 1, 32, 16, 4, {"sliding_window": 20}),
    "softcap-window-d80": ([45, 19], 6, 2, 80, 32, 3, {"softcap": 4.0, "sliding_window": 17}),
}
if ON_GPU:
    DECODE_CASES |= {
        "gpu-long": ([4096, 129, 1000, 17], 32, 8, 64, 16, None, {}),
        "gpu-d256": ([4000, 3333], 4, 1, 256, 16, None, {"sliding_window": 512}),
        "gpu-many-splits": ([2049, 5], 9, 3, 64, 32, 64, {"softcap": 30.0}),
    }


@pytest.fixture(params=["fma", "dot"])
def decode_products(request, monkeypatch) -> str:
    """Both forms of the decode kernel's products: broadcast multiplies over the program's
    few query heads (the default for small tiles) and `tl.dot` (rows padded to 16)."""
    from llamapy.kernels.triton import attention

    if request.param == "dot":
        monkeypatch.setattr(attention, "DECODE_FMA_MAX", 0)
    return request.param


def test_decode_rows_rule():
    from llamapy.kernels.triton.attention import DECODE_FMA_MAX, _decode_rows

    assert DECODE_FMA_MAX >= 4 * 16 * 64, "SmolLM2 / Llama 3.2 decode heads take the FMA form"
    assert _decode_rows(3, 16, 64, False) == (4, False)
    assert _decode_rows(1, 16, 32, False) == (1, False)
    assert _decode_rows(3, 16, 64, True) == (16, True), "round_q keeps tl.dot"
    assert _decode_rows(4, 16, 256, False) == (16, True), "a wide tile keeps tl.dot"
    assert _decode_rows(32, 16, 64, False) == (32, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_reference(
    case: str, dtype: torch.dtype, gen: torch.Generator, decode_products: str
):
    seq_lens, n_heads, n_kv, d, block_size, num_splits, kw = DECODE_CASES[case]
    q, kc, vc, meta = make_batch(
        gen,
        [1] * len(seq_lens),
        seq_lens,
        n_heads=n_heads,
        n_kv=n_kv,
        head_dim=d,
        block_size=block_size,
        dtype=dtype,
    )
    got = paged_attention_decode(
        q,
        kc,
        vc,
        meta.block_tables,
        meta.seq_lens,
        scale=d**-0.5,
        num_splits=num_splits,
        out=_nan_like(q),
        **kw,
    )
    check_against_reference("decode", got, q, kc, vc, meta, scale=d**-0.5, **kw)


def test_decode_padded_slot_is_zero(gen: torch.Generator):
    """A sequence of length 0 (a padded CUDA-graph slot) gives zeros, not NaN."""
    q, kc, vc, meta = make_batch(
        gen, [1, 1], [9, 1], n_heads=2, n_kv=1, head_dim=32, block_size=16, dtype=torch.float16
    )
    seq_lens = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 3):
        got = paged_attention_decode(
            q, kc, vc, meta.block_tables, seq_lens, scale=0.1, num_splits=num_splits
        )
        assert not got.isnan().any()
        assert (got[1] == 0).all()
        check_against_reference("decode", got[:1], q[:1], kc, vc, _first(meta), scale=0.1)


@pytest.mark.parametrize("pad", [-1, 1 << 20])
def test_decode_tables_padded_with_anything(pad: int, gen: torch.Generator):
    """Block-table entries past a sequence's blocks may hold anything (here -1 or a block
    far outside the cache): no split reads them, whatever the split count."""
    seq_lens = [5, 40, 1]
    q, kc, vc, meta = make_batch(
        gen, [1] * 3, seq_lens, n_heads=4, n_kv=2, head_dim=32, block_size=16,
        dtype=torch.float16, extra_table_cols=3,
    )  # fmt: skip
    for b, n in enumerate(seq_lens):
        meta.block_tables[b, -(-n // 16) :] = pad
    for num_splits in (2, 8):
        got = paged_attention_decode(
            q, kc, vc, meta.block_tables, meta.seq_lens, scale=0.2, num_splits=num_splits,
            out=_nan_like(q),
        )  # fmt: skip
        check_against_reference(f"decode pad {pad} splits {num_splits}", got, q, kc, vc, meta,
                                scale=0.2)  # fmt: skip


def _first(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(
        meta.slot_mapping[:1],
        meta.block_tables[:1],
        meta.seq_lens[:1],
        meta.query_start_loc[:2],
        1,
        meta.seq_lens_host[0],
        meta.seq_lens_host[:1],
        meta.query_start_loc_host[:2],
    )


def _with_seq_lens(meta: AttentionMetadata, seq_lens: list[int]) -> AttentionMetadata:
    starts = tuple(range(len(seq_lens) + 1))
    return AttentionMetadata(
        meta.slot_mapping,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        1,
        max(seq_lens),
        tuple(seq_lens),
        starts,
    )


@pytest.mark.parametrize("window", [None, 24])
def test_decode_replay_with_new_seq_lens(window, gen: torch.Generator):
    """Same q, tables, seq_lens and out tensors, new lengths written in place: what a CUDA
    graph replay does. On CUDA the launch is captured in a graph and replayed."""
    q, kc, vc, meta = make_batch(
        gen,
        [1, 1, 1],
        [60, 60, 60],
        n_heads=4,
        n_kv=1,
        head_dim=64,
        block_size=16,
        dtype=torch.float16,
        extra_table_cols=0,
    )
    kw = {"scale": 0.125, "sliding_window": window}
    out = _nan_like(q)
    run = lambda: paged_attention_decode(  # noqa: E731
        q, kc, vc, meta.block_tables, meta.seq_lens, num_splits=4, out=out, **kw
    )
    graph = None
    if ON_GPU:
        run()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
    for lens in ([60, 33, 48], [3, 1, 17], [57, 33, 16], [60, 60, 60]):
        meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        out.fill_(math.nan)
        graph.replay() if graph is not None else run()
        check_against_reference(
            f"decode replay {lens}", out, q, kc, vc, _with_seq_lens(meta, lens), **kw
        )


def test_default_num_splits_depends_on_shapes_only():
    dev = torch.device(DEVICE)
    splits = default_num_splits(1, 8, 256, 16, 64, dev)
    assert splits >= 1
    assert default_num_splits(1, 8, 256, 16, 64, dev) == splits
    assert default_num_splits(1, 8, 1, 16, 64, dev) == 1  # one tile of capacity
    assert default_num_splits(4096, 8, 256, 16, 64, dev) == 1  # batch fills the GPU


# ---------------------------------------------------------------- dispatch and checks


@pytest.mark.parametrize("is_decode", [True, False])
def test_paged_attention_dispatch(is_decode: bool, gen: torch.Generator):
    q_lens = [1, 1, 1] if is_decode else [4, 1, 9]
    q, kc, vc, meta = make_batch(
        gen,
        q_lens,
        [23, 40, 9],
        n_heads=6,
        n_kv=2,
        head_dim=32,
        block_size=16,
        dtype=torch.bfloat16,
    )
    kw = {"scale": 0.17, "sliding_window": 16, "softcap": 8.0}
    got = paged_attention(q, kc, vc, meta, **kw)
    check_against_reference("paged_attention", got, q, kc, vc, meta, **kw)


def test_rejects_bad_inputs(gen: torch.Generator):
    q, kc, vc, meta = make_batch(
        gen, [1, 1], [5, 9], n_heads=4, n_kv=2, head_dim=32, block_size=16, dtype=torch.float16
    )
    bt, sl = meta.block_tables, meta.seq_lens
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, kc, vc, bt.long(), sl, scale=1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention_decode(q, kc, vc, bt, sl.long(), scale=1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_decode(q[:, :3], kc, vc, bt, sl, scale=1.0)
    with pytest.raises(ValueError, match="caches"):
        paged_attention_decode(q, kc, vc[..., :16], bt, sl, scale=1.0)
    with pytest.raises(ValueError, match="head dims"):
        paged_attention_decode(q[..., :16], kc, vc, bt, sl, scale=1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention_decode(q, kc, vc, bt, sl, scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="out"):
        paged_attention_decode(q, kc, vc, bt, sl, scale=1.0, out=q.float())


# ---------------------------------------------------------------- real shapes (CUDA)

# (n_heads, n_kv, head_dim): SmolLM2-135M, Llama-3.2-1B, Gemma 3 270M
MODEL_HEADS = {"smollm2": (9, 3, 64), "llama1b": (32, 8, 64), "gemma3": (4, 1, 256)}


@pytest.mark.skipif(not ON_GPU, reason="real shapes need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("model", list(MODEL_HEADS))
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_decode_real_shapes(batch: int, model: str, dtype: torch.dtype, gen: torch.Generator):
    n_heads, n_kv, d = MODEL_HEADS[model]
    seq_lens = torch.randint(128, 4097, (batch,), generator=gen).tolist()
    q, kc, vc, meta = make_batch(
        gen,
        [1] * batch,
        seq_lens,
        n_heads=n_heads,
        n_kv=n_kv,
        head_dim=d,
        block_size=16,
        dtype=dtype,
        extra_table_cols=4096 // 16 - max(seq_lens) // 16,
    )
    kw = {"scale": d**-0.5, "sliding_window": 512 if model == "gemma3" else None}
    got = paged_attention(q, kc, vc, meta, **kw)
    check_against_reference("decode", got, q, kc, vc, meta, **kw)


@pytest.mark.skipif(not ON_GPU, reason="real shapes need CUDA")
@pytest.mark.parametrize("model", list(MODEL_HEADS))
def test_prefill_real_shapes(model: str, gen: torch.Generator):
    n_heads, n_kv, d = MODEL_HEADS[model]
    q_lens = [512, 37, 1, 250]
    seq_lens = [512, 1061, 4096, 250]  # cached prefixes of 1024 and 4095 tokens
    q, kc, vc, meta = make_batch(
        gen,
        q_lens,
        seq_lens,
        n_heads=n_heads,
        n_kv=n_kv,
        head_dim=d,
        block_size=32,
        dtype=torch.bfloat16,
    )
    kw = {"scale": d**-0.5, "sliding_window": 512 if model == "gemma3" else None}
    got = paged_attention(q, kc, vc, meta, **kw)
    check_against_reference("prefill", got, q, kc, vc, meta, **kw)


# ---------------------------------------------------------------- float32 q over a 16-bit cache


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_round_q_is_the_reference_of_the_rounded_q(kind, cache_dtype, gen: torch.Generator):
    """round_q: a float32 q is rounded to the cache's type for the dots; the output (float32)
    is the reference's for that rounded q within the 16-bit bound."""
    q_lens = [1, 1, 1] if kind == "decode" else [5, 1, 20]
    seq_lens = [37, 5, 64] if kind == "decode" else [37, 5, 64]
    q16, kc, vc, meta = make_batch(
        gen, q_lens, seq_lens, n_heads=4, n_kv=2, head_dim=32, block_size=16, dtype=cache_dtype
    )
    q32 = (q16.float() + 1e-3 * torch.randn(q16.shape, generator=gen).to(DEVICE)).contiguous()
    kw = {"scale": 32**-0.5, "out": _nan_like(q32), "round_q": True}
    if kind == "decode":
        got = paged_attention_decode(q32, kc, vc, meta.block_tables, meta.seq_lens, **kw)
    else:
        got = paged_attention_prefill(
            q32, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, **kw,
        )  # fmt: skip
    assert got.dtype == torch.float32
    check_against_reference(kind, got, q32.to(cache_dtype), kc, vc, meta, scale=32**-0.5)


def test_decode_dispatch_rounds_q_from_the_batch_threshold(gen: torch.Generator, monkeypatch):
    """`paged_attention` rounds float32 queries for batches of ROUND_Q_MIN_BATCH and more
    (bit for bit the explicit call), not below; float32 caches never."""
    from llamapy.kernels.triton import attention as attn

    monkeypatch.setattr(attn, "ROUND_Q_MIN_BATCH", 3)
    for batch, rounds in ((3, True), (2, False)):
        q16, kc, vc, meta = make_batch(
            gen, [1] * batch, [9 + b for b in range(batch)], n_heads=2, n_kv=1, head_dim=32,
            block_size=16, dtype=torch.float16,
        )  # fmt: skip
        q32 = q16.float() + 1e-3 * torch.randn(q16.shape, generator=gen).to(DEVICE)
        got = paged_attention(q32, kc, vc, meta, scale=0.2)
        want = paged_attention_decode(
            q32, kc, vc, meta.block_tables, meta.seq_lens, scale=0.2, round_q=rounds,
            num_splits=meta.decode_splits,
        )  # fmt: skip
        assert torch.equal(got, want), f"batch {batch}"
