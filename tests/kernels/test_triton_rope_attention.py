"""The fused decode attention (`attention.rope_cache_attention_decode`: rotary embedding, cache
write and split-KV decode attention in one kernel) against the two-step reference: the
rotary reference (`rotary.rotary_and_cache_reference`) then the float64 attention reference,
and its cache writes against the reference's. Small shapes under TRITON_INTERPRET=1, real
shapes on CUDA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.kernels.test_triton_attention import (  # noqa: F401 (decode_products: fixture)
    DEVICE,
    ON_GPU,
    check_against_reference,
    decode_products,
    make_batch,
)
from tests.kernels.test_triton_fused_ops import rope64

from llamapy.kernels.triton import INTERPRET, attention, rotary
from llamapy.kernels.triton.attention import rope_cache_attention_decode
from llamapy.kernels.triton.decode_splits import DecodeSplits
from llamapy.layers import attention as attention_layer
from llamapy.layers.rotary import RotaryEmbedding

pytestmark = [
    pytest.mark.skipif(not (ON_GPU or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

# one ulp of the cache's type, relative: the rotated key is rounded to it once, by the kernel
# from float32 and by the reference from its own float32 rotation (near a midpoint the two
# roundings can land one ulp apart)
CACHE_ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture
def gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


@pytest.fixture(autouse=True)
def _poisoned(poisoned: None) -> None:
    """Every test here runs with conftest's NaN-poisoned torch.empty."""


# (seq_lens, n_heads, n_kv, head_dim, block_size, num_splits, rot_dim, options). Interpreter
# tiles are 16 keys: 17 and 33 put the new key first in a tile, 1 is the new key alone,
# 5 with 8 splits leaves 7 empty, and windows cut the cached keys.
CASES = {
    "one-split": ([5, 30, 47], 2, 2, 32, 16, 1, 32, {}),
    "splits3-gqa3": ([37, 1, 64], 3, 1, 64, 16, 3, 64, {}),
    "empty-splits": ([5, 17], 4, 1, 32, 16, 8, 32, {}),
    "tile-edges": ([17, 33, 16], 2, 1, 32, 16, 2, 32, {}),
    "window-partial-rot": ([70, 6, 33], 4, 1, 32, 16, 4, 16, {"sliding_window": 20}),
    "softcap-window-d80": ([45, 19], 6, 2, 80, 32, 3, 48, {"softcap": 4.0, "sliding_window": 17}),
    # as the decode graphs cut by length: a power-of-two split count, one tile a split or none
    "tile-a-split": ([61, 3, 33], 4, 2, 64, 16, 4, 64, {}),
}
if ON_GPU:
    CASES |= {
        "gpu-1b-long": ([4096, 129, 1000, 17], 32, 8, 64, 16, None, 64, {}),
        "gpu-smollm2": ([300, 1, 64], 9, 3, 64, 16, 32, 64, {}),
        "gpu-gemma3": ([4000, 3333], 4, 1, 256, 16, None, 256, {"sliding_window": 512}),
        "gpu-many-splits": ([2049, 5], 9, 3, 64, 32, 64, 64, {"softcap": 30.0}),
    }


def new_token_inputs(gen, meta, n_heads, n_kv, d, rot_dim, interleaved):
    """This step's q, k, v (float32, the model's dtype; views of one fused projection, as
    the QKV GEMV returns them), cos / sin of position seq_len - 1 and that position's slot."""
    batch = len(meta.seq_lens_host)
    qkv = torch.randn(batch, (n_heads + 2 * n_kv) * d, generator=gen).to(DEVICE)
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    q, k, v = q.view(batch, n_heads, d), k.view(batch, n_kv, d), v.view(batch, n_kv, d)
    rope = RotaryEmbedding(rot_dim, 10_000.0, interleaved=interleaved)
    positions = torch.tensor([max(n - 1, 0) for n in meta.seq_lens_host])
    cos, sin = (t.to(DEVICE) for t in rope.cos_sin(positions))
    return q, k, v, cos, sin, meta.block_tables.cpu().long()


def slots_of_last(tables: torch.Tensor, seq_lens: list[int], block_size: int) -> torch.Tensor:
    p = torch.tensor([max(n - 1, 0) for n in seq_lens])
    rows = torch.arange(len(seq_lens))
    return (tables[rows, p // block_size] * block_size + p % block_size).to(DEVICE)


def run_case(
    gen,
    case,
    cache_dtype,
    interleaved,
    seq_lens=None,
    slots=None,
    round_q=False,
    one_tile=False,
    tiles=None,
):
    lens, n_heads, n_kv, d, block_size, num_splits, rot, kw = CASES[case]
    lens = seq_lens or lens
    _, kc, vc, meta = make_batch(
        gen, [1] * len(lens), [max(n, 1) for n in lens], n_heads=n_heads, n_kv=n_kv,
        head_dim=d, block_size=block_size, dtype=cache_dtype,
    )  # fmt: skip
    q, k, v, cos, sin, tables = new_token_inputs(gen, meta, n_heads, n_kv, d, rot, interleaved)
    if slots is None:
        slots = slots_of_last(tables, lens, block_size)
    # the new token's slot holds no key yet: NaN there, as everywhere outside the sequences
    for cache in (kc, vc):
        live = slots[slots >= 0]
        cache.view(-1, n_kv, d)[live] = math.nan
    seq_lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    k_ref, v_ref = kc.clone(), vc.clone()
    q_ref = rotary.rotary_and_cache_reference(
        q, k, v, cos, sin, k_ref, v_ref, slots, interleaved=interleaved
    )
    before = [t.clone() for t in (q, k, v, kc, vc)]
    out = torch.full((len(lens), n_heads, d), math.nan, device=DEVICE)
    got = rope_cache_attention_decode(
        q, k, v, cos, sin, kc, vc, meta.block_tables, seq_lens_t, slots,
        interleaved=interleaved, scale=d**-0.5, num_splits=num_splits, out=out,
        round_q=round_q, one_tile=one_tile, tiles=tiles, **kw,
    )  # fmt: skip
    assert got is out
    for x, x0 in zip((q, k, v), before[:3], strict=True):
        assert torch.equal(x, x0), "inputs are left unchanged"
    # |x1| + |x2| of each rotated key element, for the bound on the key rows written
    keep = (slots >= 0).cpu()
    _, mag = rope64(k.cpu()[keep], cos.cpu()[keep], sin.cpu()[keep], interleaved)
    order = slots.cpu()[keep].argsort()  # check_caches reads the written rows in slot order
    mag = mag[order].double()
    return got, q_ref, (kc, vc), (k_ref, v_ref), before[3:], slots, meta, kw, d, mag


def check_caches(caches, refs, olds, slots, mag) -> None:
    """The new rows: k within one cache ulp of the reference's plus the float32 rotations'
    own differences (terms up to mag: FMA contraction on the GPU), v bit for bit; every
    other element as it was (NaN included)."""
    written = torch.zeros(caches[0].shape[0] * caches[0].shape[1], dtype=torch.bool)
    written[slots.cpu()[slots.cpu() >= 0]] = True
    for name, got, ref, old in zip(("k", "v"), caches, refs, olds, strict=True):
        flat, ref_flat, old_flat = (t.flatten(0, 1).cpu() for t in (got, ref, old))
        assert torch.equal(flat[~written].nan_to_num(7.0), old_flat[~written].nan_to_num(7.0)), (
            f"{name} cache: stray writes"
        )
        new, want = flat[written].double(), ref_flat[written].double()
        assert not new.isnan().any(), f"{name} cache: new rows not written"
        if name == "v":
            assert torch.equal(new, want)
        else:
            bound = CACHE_ULP[got.dtype] * want.abs() + 2.0**-21 * mag + 1e-30
            assert ((new - want).abs() <= bound).all(), (
                f"k cache: {((new - want).abs() - bound).max().item():.3g} past its bound"
            )


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "norm"])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("one_tile", [False, True], ids=["", "one-tile"])
@pytest.mark.usefixtures("decode_products")
def test_fused_decode_matches_rope_then_attention(gen, case, cache_dtype, interleaved, one_tile):
    """one_tile: the first tile of each split read before the kernel's PDL wait (the decode
    graphs cut by length); cases whose splits hold more tiles check that the hint costs no
    key."""
    got, q_ref, caches, refs, olds, slots, meta, kw, d, mag = run_case(
        gen, case, cache_dtype, interleaved, one_tile=one_tile
    )
    check_caches(caches, refs, olds, slots, mag)
    # the attention over the caches as written (the new key as the kernel rounded it) and
    # the reference's rotated q
    check_against_reference("fused decode", got, q_ref, *caches, meta, scale=d**-0.5, **kw)


@pytest.mark.parametrize("block_n", [32, 64])
@pytest.mark.parametrize("case", ["splits3-gqa3", "window-partial-rot", "one-split"])
@pytest.mark.usefixtures("decode_products")
def test_fused_decode_wide_tiles(gen, case, block_n):
    """Tiles of more keys than a cache block (`SPLIT_TILE`, the few-split rule's 64): each
    key's block looked up on its own, the new key's tile cut before it."""
    got, q_ref, caches, refs, olds, slots, meta, kw, d, mag = run_case(
        gen, case, torch.float16, False, tiles=(block_n, 4, 1)
    )
    check_caches(caches, refs, olds, slots, mag)
    check_against_reference("fused decode", got, q_ref, *caches, meta, scale=d**-0.5, **kw)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_decode_round_q(gen, cache_dtype):
    """round_q (decode batches of 16+ in the engine): the rotated float32 q is rounded to the
    cache's type for the dots; the output is the reference's for that rounded q within the
    16-bit bound."""
    got, q_ref, caches, refs, olds, slots, meta, kw, d, mag = run_case(
        gen, "softcap-window-d80", cache_dtype, False, round_q=True
    )
    check_caches(caches, refs, olds, slots, mag)
    check_against_reference(
        "fused decode, round_q", got, q_ref.to(cache_dtype), *caches, meta, scale=d**-0.5, **kw
    )


@pytest.mark.parametrize("one_tile", [False, True], ids=["", "one-tile"])
def test_fused_decode_padding_rows(gen, one_tile):
    """A slot < 0 stores nothing and the row still attends to its new key (a length-1 row:
    exactly its value, rounded to the cache's type); a row of length 0 stores nothing and
    gives zeros."""
    lens, n_heads, n_kv, d, block_size, num_splits, rot, kw = CASES["splits3-gqa3"]
    lens = [37, 1, 0]
    _, kc, vc, meta = make_batch(
        gen, [1] * 3, [37, 1, 1], n_heads=n_heads, n_kv=n_kv, head_dim=d,
        block_size=block_size, dtype=torch.float16,
    )  # fmt: skip
    q, k, v, cos, sin, tables = new_token_inputs(gen, meta, n_heads, n_kv, d, rot, False)
    slots = slots_of_last(tables, lens, block_size)
    slots[1] = -1
    kc.view(-1, n_kv, d)[slots[0]] = math.nan  # the new token's slot holds no key yet
    vc.view(-1, n_kv, d)[slots[0]] = math.nan
    olds = [kc.clone(), vc.clone()]
    got = rope_cache_attention_decode(
        q, k, v, cos, sin, kc, vc, meta.block_tables,
        torch.tensor(lens, dtype=torch.int32, device=DEVICE), slots,
        interleaved=False, scale=d**-0.5, num_splits=num_splits, one_tile=one_tile,
    )  # fmt: skip
    assert not got.isnan().any()
    assert (got[2] == 0).all(), "a length-0 row gives zeros"
    group = n_heads // n_kv
    want = v[1].to(torch.float16).float().repeat_interleave(group, dim=0)
    assert torch.equal(got[1], want), "a length-1 row is its new value"
    for cache, old in zip((kc, vc), olds, strict=True):  # only row 0's slot was written
        changed = (cache.nan_to_num(7.0) != old.nan_to_num(7.0)).flatten(0, 1).flatten(1)
        assert changed.any(-1).nonzero().flatten().tolist() == [int(slots[0])]


@pytest.mark.parametrize("case", ["splits3-gqa3", "empty-splits", "one-split"])
def test_deferred_merge_returns_the_splits(gen, case, monkeypatch):
    """defer_merge: with 2 to MERGE_IN_GEMV_MAX_SPLITS key splits the kernel's partials come
    back unmerged (`DecodeSplits`), and merging them gives the output of the call that merges
    itself, bit for bit; one split, or more than the bound, returns the output."""
    lens, n_heads, n_kv, d, block_size, num_splits, rot, kw = CASES[case]
    monkeypatch.setattr(attention, "MERGE_IN_GEMV_MAX_SPLITS", 8)
    outs = []
    for defer in (False, True, True):
        _, kc, vc, meta = make_batch(
            torch.Generator().manual_seed(7), [1] * len(lens), lens, n_heads=n_heads,
            n_kv=n_kv, head_dim=d, block_size=block_size, dtype=torch.float16,
        )  # fmt: skip
        q, k, v, cos, sin, tables = new_token_inputs(
            torch.Generator().manual_seed(8), meta, n_heads, n_kv, d, rot, False
        )
        slots = slots_of_last(tables, lens, block_size)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        if len(outs) == 2:  # past the bound: merged in the attention's own launch
            monkeypatch.setattr(attention, "MERGE_IN_GEMV_MAX_SPLITS", num_splits - 1)
        got = rope_cache_attention_decode(
            q, k, v, cos, sin, kc, vc, meta.block_tables, seq_lens, slots, interleaved=False,
            scale=d**-0.5, num_splits=num_splits, defer_merge=defer, **kw,
        )  # fmt: skip
        if defer and len(outs) == 1 and num_splits > 1:
            assert isinstance(got, DecodeSplits)
            assert got.part_o.shape == (len(lens), n_heads, num_splits, d)
            assert got.part_lse.shape == (len(lens), n_heads, num_splits)
            assert got.shape == (len(lens), n_heads * d) and got.dtype == q.dtype
            got = got.merged()
        assert isinstance(got, torch.Tensor)
        outs.append(got)
    assert not outs[0].isnan().any()
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


@pytest.mark.parametrize(
    "heads", [{}, (1, 1), (2, 1), (1, 2), (2, 2)] if ON_GPU else [{}, (1, 1), (2, 1)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("one_tile", [False, True], ids=["", "one-tile"])
@pytest.mark.parametrize(
    "case", ["splits3-gqa3", "empty-splits", "window-partial-rot", "softcap-window-d80",
             "tile-a-split"] + (["gpu-1b-long", "gpu-smollm2"] if ON_GPU else []),
)  # fmt: skip
@pytest.mark.usefixtures("decode_products")
def test_fused_decode_heads(gen, case, one_tile, heads, monkeypatch):
    """`LLAMAPY_GPU_DECODE_HEADS`: programs of one or two query heads (the GQA cases: each
    KV head's rows read by each of its programs, the new key stored once; a group that two
    does not divide keeps one program), and off ({}: one program a KV head, its heads the
    rows of one tile), against the same reference; and their partials, merged by the combine
    kernel, where every head's split rows land."""
    monkeypatch.setattr(attention, "DECODE_HEADS", heads)
    got, q_ref, caches, refs, olds, slots, meta, kw, d, mag = run_case(
        gen, case, torch.float16, False, one_tile=one_tile
    )
    check_caches(caches, refs, olds, slots, mag)
    check_against_reference("decode by heads", got, q_ref, *caches, meta, scale=d**-0.5, **kw)


def test_decode_heads_setting(monkeypatch, caplog):
    """LLAMAPY_GPU_DECODE_HEADS: unset is the measured default by group, off none, "HEADS,
    WARPS" (1, 2 or 4 each) a pair for every group it divides, anything else the default
    with a warning naming the variable."""
    parse = attention._decode_heads
    assert parse(None) == parse("") == attention.DECODE_HEADS_DEFAULT
    assert parse("off") == parse("0") == {}
    assert [parse(v) for v in ("1,1", "2, 4", " 4,2 ")] == [(1, 1), (2, 4), (4, 2)]
    assert not caplog.records
    for bad in ("3,1", "1", "1,8", "fast", "-1,1", "1,1,1"):
        caplog.clear()
        assert parse(bad) == attention.DECODE_HEADS_DEFAULT
        assert f"LLAMAPY_GPU_DECODE_HEADS={bad!r}" in caplog.text
    monkeypatch.setattr(attention, "DECODE_HEADS", parse(None))
    assert [attention._program_heads(g, 64) for g in (1, 2, 3, 4, 8)] == [
        None, None, (1, 1), (2, 1), None
    ]  # fmt: skip
    assert attention._program_heads(4, 128) is None, "the default: measured heads of 64"
    monkeypatch.setattr(attention, "DECODE_HEADS", (2, 1))
    assert [attention._program_heads(g, 128) for g in (1, 2, 3, 4, 8)] == [
        None, None, None, (2, 1), (2, 1)
    ]  # fmt: skip


def test_merge_in_gemv_setting(caplog):
    """LLAMAPY_GPU_MERGE_IN_GEMV: off values merge in the attention's launch always, a number
    is the bound, anything else keeps the default with a warning naming the variable."""
    parse = attention._merge_in_gemv_max
    default = parse(None)
    assert default >= 2 and parse("") == default
    assert parse("0") == parse("off") == parse(" No ") == 0
    assert parse("16") == 16
    assert not caplog.records
    assert parse("fast") == default
    assert "LLAMAPY_GPU_MERGE_IN_GEMV='fast'" in caplog.text


def test_split_tile_rule(monkeypatch):
    """The decode kernel's keys a tile when no tile is given: `SPLIT_TILE` (16) at 16+
    splits, 64 below; heads over 128 wide 16 always."""
    monkeypatch.setattr(attention, "INTERPRET", False)  # the rule the GPU runs
    assert attention._decode_block_n(64, 16) == attention.SPLIT_TILE == 16
    assert attention._decode_block_n(128, 256) == 16
    assert attention._decode_block_n(256, 32) == 16
    assert attention._decode_block_n(256, 4) == 16
    assert attention._decode_block_n(64, 8) == 64
    assert attention._decode_block_n(128, 1) == 64


def layer_decode_batch(gen, lens, n_heads, n_kv, d, **meta_options):
    """A decode batch for `rope_kv_attention`: this step's q, k, v, cos, sin, float16
    caches, the layer's AttentionMetadata (with `meta_options`) and a NEOX rope of d."""
    _, kc, vc, meta = make_batch(
        gen, [1] * len(lens), lens, n_heads=n_heads, n_kv=n_kv, head_dim=d, block_size=16,
        dtype=torch.float16,
    )  # fmt: skip
    q, k, v, cos, sin, tables = new_token_inputs(gen, meta, n_heads, n_kv, d, d, False)
    meta = attention_layer.AttentionMetadata(
        slots_of_last(tables, lens, 16), meta.block_tables, meta.seq_lens, meta.query_start_loc,
        1, max(lens), meta.seq_lens_host, meta.query_start_loc_host, **meta_options,
    )  # fmt: skip
    return q, k, v, cos, sin, kc, vc, meta, RotaryEmbedding(d, 10_000.0, interleaved=False)


@pytest.mark.skipif(not ON_GPU, reason="the layer dispatches to the fused kernel on CUDA only")
@pytest.mark.parametrize("window", [None, 24])
def test_layer_dispatch_fused_equals_two_steps(gen, window, monkeypatch):
    """`rope_kv_attention` on a CUDA decode batch: fused and two-step give the same caches
    (within one ulp) and outputs within the attention bound."""
    d = 64
    q, k, v, cos, sin, kc, vc, meta, rope = layer_decode_batch(gen, [40, 7, 129], 8, 2, d)
    outs, caches = [], []
    for fused in (True, False):
        monkeypatch.setattr(attention_layer, "FUSED_ROPE_DECODE", fused)
        cache = (kc.clone(), vc.clone())
        outs.append(
            attention_layer.rope_kv_attention(
                rope, q, k, v, (cos, sin), cache, meta, scale=d**-0.5, sliding_window=window
            )
        )
        caches.append(cache)
    for a, b in zip(*caches, strict=True):
        torch.testing.assert_close(a, b, rtol=2.0**-10, atol=0, equal_nan=True)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decode_tile", [None, 16])
def test_layer_passes_the_one_tile_hint(gen, decode_tile, monkeypatch):
    """A decode batch whose graph cut its splits by length (`AttentionMetadata.decode_tile`
    set) asks the fused kernel for the early tile (`one_tile`); any other gets the plain
    kernel; both give the two-step result."""
    q, k, v, cos, sin, kc, vc, meta, rope = layer_decode_batch(
        gen, [40, 7], 4, 2, 32, decode_splits=4, decode_tile=decode_tile
    )
    monkeypatch.setattr(attention_layer, "TRITON_DECODE_ON_CPU", True)
    hints = []
    fused_call = attention.rope_cache_attention_decode

    def spy(*args, **kwargs):
        hints.append(kwargs["one_tile"])
        return fused_call(*args, **kwargs)

    monkeypatch.setattr(attention, "rope_cache_attention_decode", spy)
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(attention_layer, "FUSED_ROPE_DECODE", fused)
        cache = (kc.clone(), vc.clone())
        outs.append(
            attention_layer.rope_kv_attention(rope, q, k, v, (cos, sin), cache, meta, scale=0.2)
        )
    assert hints == [decode_tile is not None]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_rejects_bad_inputs(gen):
    _, kc, vc, meta = make_batch(
        gen, [1, 1], [5, 9], n_heads=2, n_kv=1, head_dim=32, block_size=16, dtype=torch.float16
    )
    q, k, v, cos, sin, tables = new_token_inputs(gen, meta, 2, 1, 32, 32, False)
    slots = slots_of_last(tables, [5, 9], 16)
    args = (kc, vc, meta.block_tables, meta.seq_lens, slots)
    kw = {"interleaved": False, "scale": 0.1}
    with pytest.raises(ValueError, match="cos"):
        rope_cache_attention_decode(q, k, v, cos[:1], sin[:1], *args, **kw)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_cache_attention_decode(q, k, v, cos, sin, *args[:4], slots[:1], **kw)
    with pytest.raises(ValueError, match="one row per sequence"):
        rope_cache_attention_decode(q[:1], k[:1], v[:1], cos[:1], sin[:1], *args[:4], slots[:1],
                                    **kw)  # fmt: skip
