"""The native CPU decode step (models/cpu_step.py): each operation of its numba executor
against a float64 reference, then whole steps of real models against the eager step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from logit_checks import explained_picks

from llamapy.engine.llm_engine import EngineConfig, LLMEngine
from llamapy.formats import open_model_file
from llamapy.kernels.cpu import attention as cpu_attention
from llamapy.kernels.cpu import vnni as vnni_kernels
from llamapy.layers.attention import AttentionMetadata, paged_attention_reference
from llamapy.layers.rotary import RotaryEmbedding
from llamapy.models import cpu_step
from llamapy.sampling.params import SamplingParams
from llamapy.tokenizer import Tokenizer
from paged_tables import shuffled_block_tables

needs_numba = pytest.mark.skipif(
    not cpu_attention.available(), reason="the native step's executor needs numba"
)
needs_vnni = pytest.mark.skipif(
    not vnni_kernels.available(), reason="the native step needs the VNNI kernels (AVX512-VNNI)"
)


def _k():
    from llamapy.kernels.cpu import _step_numba

    return _step_numba


def _f32(v: float) -> int:
    return int(np.array(v, dtype=np.float32).view(np.int32))


def _run(ops: list[list[int]], rows: int, dyn: dict[int, int] | None = None) -> int:
    """Runs the table `ops` on `rows` rows, `dyn` setting entries of the step's dynamic
    array by index (DYN_*); returns the executor's code."""
    k = _k()
    table = np.zeros((len(ops), k.ROW), dtype=np.int64)
    for i, op in enumerate(ops):
        table[i, : len(op)] = op
    d = np.zeros(k.DYN_SIZE, dtype=np.int64)
    d[k.DYN_ROWS], d[k.DYN_THREADS] = rows, torch.get_num_threads()
    for index, value in (dyn or {}).items():
        d[index] = value
    return int(k.executor()(table, d))


def _gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


@needs_numba
@pytest.mark.parametrize("weighted", [True, False])
def test_norm_op(weighted, rng):
    """RMSNorm of each group of `width` floats in each row (rows at their strides; the q/k
    norms' per-head form), into another buffer and in place."""
    g = _gen(rng)
    rows, groups, width = 3, 4, 40
    src = torch.randn(rows, groups * width + 13, generator=g) * 3  # a row stride past the data
    dst = torch.full((rows, groups * width + 5), float("nan"))
    w = torch.randn(width, generator=g)
    eps = 1e-5
    k = _k()
    op = [k.OP_NORM, src.data_ptr(), 4 * src.shape[1], dst.data_ptr(), 4 * dst.shape[1]]
    op += [w.data_ptr() if weighted else 0, groups, width, _f32(eps)]
    assert _run([op], rows) == 0
    x = src[:, : groups * width].double().view(rows, groups, width)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weighted:
        ref = ref * w.double()
    torch.testing.assert_close(
        dst[:, : groups * width].double(), ref.flatten(1), rtol=2e-6, atol=2e-6
    )
    assert dst[:, groups * width :].isnan().all()  # nothing past the groups
    before = src.clone()
    in_place = [k.OP_NORM, src.data_ptr(), 4 * src.shape[1], src.data_ptr(), 4 * src.shape[1]]
    assert _run([in_place + op[5:]], rows) == 0
    torch.testing.assert_close(src[:, : groups * width], dst[:, : groups * width], rtol=0, atol=0)
    assert torch.equal(src[:, groups * width :], before[:, groups * width :])


@needs_numba
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rot_dim", [16, 10])  # whole heads; a partial rotation
def test_rope_op(interleaved, rot_dim, rng):
    """Rotary embedding of `heads` heads per row from the table the op names: to another
    buffer (the tail past rot_dim copied) and in place (the tail kept)."""
    g = _gen(rng)
    rows, heads, d = 3, 2, 16
    rope = RotaryEmbedding(rot_dim, 10_000.0, interleaved=interleaved)
    pos = torch.from_numpy(rng.integers(0, 5000, rows))
    other = RotaryEmbedding(rot_dim, 1_000_000.0, interleaved=interleaved)
    cos, sin = rope.cos_sin(pos)
    ocos, osin = other.cos_sin(pos)  # table 0: another base, must not be read
    src = torch.randn(rows, heads * d + 7, generator=g)
    dst = torch.full((rows, heads * d), float("nan"))
    k = _k()
    tail = [heads, d, rot_dim, int(interleaved), 1]  # table 1
    op = [k.OP_ROPE, src.data_ptr(), 4 * src.shape[1], dst.data_ptr(), 4 * heads * d, *tail]
    angles = [ocos, osin, cos, sin]
    dyn = {k.DYN_COS + i: t.data_ptr() for i, t in enumerate(angles)}
    assert _run([op], rows, dyn) == 0
    x = src[:, : heads * d].double().view(rows, heads, d)
    ref = rope(x, cos.double(), sin.double()).flatten(1)
    torch.testing.assert_close(dst.double(), ref, rtol=1e-6, atol=1e-6)
    before = src.clone()
    op = [k.OP_ROPE, src.data_ptr(), 4 * src.shape[1], src.data_ptr(), 4 * src.shape[1], *tail]
    assert _run([op], rows, dyn) == 0
    torch.testing.assert_close(src[:, : heads * d], dst, rtol=0, atol=0)
    assert torch.equal(src[:, heads * d :], before[:, heads * d :])


@needs_numba
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_act_op(kind, rng):
    """act(gate) * up from two strided sources into a packed buffer, over gates from -30 to
    30 (both tails of the exp) against float64."""
    g = _gen(rng)
    rows, width = 3, 300
    gate = torch.randn(rows, width + 4, generator=g) * 6
    gate[0, :61] = torch.linspace(-30, 30, 61)
    up = torch.randn(rows, 2 * width, generator=g)
    out = torch.full((rows, width), float("nan"))
    k = _k()
    code = {"silu": k.ACT_SILU, "gelu_tanh": k.ACT_GELU_TANH}[kind]
    op = [k.OP_ACT, gate.data_ptr(), 4 * gate.shape[1], up.data_ptr() + 4 * width]
    op += [4 * up.shape[1], out.data_ptr(), width, code]
    assert _run([op], rows) == 0
    x, u = gate[:, :width].double(), up[:, width:].double()
    if kind == "silu":
        ref = torch.nn.functional.silu(x) * u
    else:
        ref = torch.nn.functional.gelu(x, approximate="tanh") * u
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


@needs_numba
def test_add_and_bias_ops(rng):
    g = _gen(rng)
    rows, width = 3, 50
    dst = torch.randn(rows, width + 3, generator=g)
    src = torch.randn(rows, width + 9, generator=g)
    bias = torch.randn(width, generator=g)
    want = dst.clone()
    want[:, :width] += src[:, :width] + bias
    k = _k()
    ops = [
        [k.OP_ADD, dst.data_ptr(), 4 * dst.shape[1], src.data_ptr(), 4 * src.shape[1], width],
        [k.OP_BIAS, dst.data_ptr(), 4 * dst.shape[1], bias.data_ptr(), width],
    ]
    assert _run(ops, rows) == 0
    torch.testing.assert_close(dst, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(dst[:, width:], want[:, width:])


@needs_numba
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_kv_op_writes_the_slots_only(rng, cache_dtype):
    """K and V rows (strided sources) land at their slots of the (blocks, block_size, n_kv,
    d) caches (float16 ones: rounded as torch's cast rounds), a padding row's slot (-1) is
    skipped, nothing else is touched; a slot past the cache stops the step with ERR_SLOT
    naming the row."""
    g = _gen(rng)
    n_blocks, bs, n_kv, d = 6, 4, 2, 8
    kc, vc = (
        torch.randn(n_blocks, bs, n_kv, d, generator=g).to(cache_dtype),
        torch.randn(n_blocks, bs, n_kv, d, generator=g).to(cache_dtype),
    )
    k_before, v_before = kc.clone(), vc.clone()
    rows = 3
    src = torch.randn(rows, 3 * n_kv * d, generator=g)  # [k | v | more] a row
    slots = torch.tensor([int(rng.integers(0, 12)), -1, int(rng.integers(12, 24))])
    k = _k()
    row = n_kv * d
    op = [k.OP_KV, src.data_ptr(), 4 * src.shape[1], src.data_ptr() + 4 * row, 4 * src.shape[1]]
    op += [kc.data_ptr(), vc.data_ptr(), row, row, n_blocks * bs, kc.element_size()]
    assert _run([op], rows, {k.DYN_SLOTS: slots.data_ptr()}) == 0
    k_want, v_want = k_before.clone(), v_before.clone()
    for r, s in enumerate(slots.tolist()):
        if s >= 0:
            k_want.view(-1, n_kv, d)[s] = src[r, :row].view(n_kv, d).to(cache_dtype)
            v_want.view(-1, n_kv, d)[s] = src[r, row : 2 * row].view(n_kv, d).to(cache_dtype)
    assert torch.equal(kc, k_want) and torch.equal(vc, v_want)
    bad = torch.tensor([0, n_blocks * bs, 1])
    nothing = [k.OP_NORM, 0, 0, 0, 0, 0, 0, 0, 0]  # a first row that touches nothing (0 groups)
    assert _run([nothing, op], rows, {k.DYN_SLOTS: bad.data_ptr()}) == 16 * 2 + k.ERR_SLOT


@needs_numba
@pytest.mark.parametrize(
    ("n_heads", "n_kv", "window", "softcap"), [(4, 4, 0, 0.0), (6, 2, 0, 30.0), (4, 1, 9, 0.0)]
)
@pytest.mark.parametrize("min_keys", [0, 1 << 40])  # every sequence on all threads / on one
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_attention_op(n_heads, n_kv, window, softcap, min_keys, cache_dtype, rng):
    """Each sequence of the batch over its block-table row against the float64 paged
    reference (of the same float16 values, for float16 caches), sequences past and under
    the two-thread threshold."""
    g = _gen(rng)
    bs, d, n_blocks = 4, 16, 64
    seq_lens = [1, int(rng.integers(2, 30)), int(rng.integers(30, 90))]
    tables = shuffled_block_tables(rng, seq_lens, bs, n_blocks, width=25)
    kc, vc = (
        torch.randn(n_blocks, bs, n_kv, d, generator=g).to(cache_dtype),
        torch.randn(n_blocks, bs, n_kv, d, generator=g).to(cache_dtype),
    )
    q = torch.randn(3, n_heads, d, generator=g)
    out = torch.full((3, n_heads, d), float("nan"))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    k = _k()
    from llamapy.kernels.cpu import _attention_numba

    op = [k.OP_ATTN, q.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), n_heads, n_kv]
    es = kc.element_size()
    op += [d, n_blocks, bs, _f32(0.25), window, _f32(softcap), _attention_numba.worker_for(d, es)]
    op += [es]
    dyn = {
        k.DYN_TABLES: tables.data_ptr(),
        k.DYN_WIDTH: tables.shape[1],
        k.DYN_SEQ_LENS: lens.data_ptr(),
        k.DYN_ATTN_MIN_KEYS: min_keys,
    }
    assert _run([op], 3, dyn) == 0
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(3, dtype=torch.int64),
        block_tables=tables,
        seq_lens=lens,
        query_start_loc=torch.arange(4, dtype=torch.int32),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        seq_lens_host=tuple(seq_lens),
        query_start_loc_host=(0, 1, 2, 3),
    )
    ref = paged_attention_reference(
        q.double(), kc.double(), vc.double(), meta, scale=0.25,
        sliding_window=window or None, softcap=softcap or None,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    lens[2] = tables.shape[1] * bs + 1  # past its table: refused before any write
    assert _run([op], 3, dyn) == 16 + k.ERR_SEQ_LEN


# -- whole steps of real models ------------------------------------------------------------


def _engine(path, max_num_seqs: int = 4, max_model_len: int = 1024, **cfg) -> LLMEngine:
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, **cfg)
    return LLMEngine(open_model_file(path), Tokenizer.from_path(path), config)


@needs_vnni
@pytest.mark.parametrize(
    ("model", "kv_dtype"),
    [("smollm2", torch.float32), ("gemma3", torch.float32), ("smollm2", torch.float16)],
    ids=["smollm2", "gemma3", "smollm2-f16-cache"],
)
def test_native_decode_matches_eager(model, kv_dtype, request, rng, monkeypatch):
    """Every decode step of a batch of sequences of different lengths (block tables of
    different widths, contexts past the attention's two-thread threshold, then batches of
    2 and 1 as they finish), computed by the native step and eagerly on the same model and
    cache. Gemma 3 (its Q6_K matrices on the VNNI kernels, opt-in) with its sliding layers'
    window cut to 24 tokens so that windows matter here, besides its post norms, q/k norms,
    GELU gating and two rotary tables.

    The two paths differ in their norms' summation order, whose last-bit differences flip
    occasional int8 steps of the matmuls' quantized x (as the compiled step's do,
    tests/models/test_cpu_compile.py): measured on both models, the median row's relative
    hidden-state difference 0 to 1.1e-2, the largest 2.7e-2 (the compiled step: 0 to 8.8e-3,
    2.9e-2). The checks: the median row under 0.05 (a wrong op gives ~1), greedy picks
    differing only where the eager logits put the native pick within twice the step's
    largest logit difference of their maximum, and on at most a tenth of the rows."""
    if model == "gemma3":
        monkeypatch.setenv("LLAMAPY_CPU_VNNI_Q6K", "1")
    path = request.getfixturevalue(f"{model}_path")
    engine = _engine(path, kv_dtype=kv_dtype)
    assert engine.runner.kv_caches[0][0].dtype == kv_dtype
    model_ = engine.runner.model
    if model == "gemma3":
        sliding = [layer.attn for layer in model_.layers if layer.attn.sliding_window]
        assert sliding and len(sliding) < len(model_.layers)
        for attn in sliding:
            attn.sliding_window = 24
        model_.native_decode = cpu_step.NativeDecode.build(model_)
    native = model_.native_decode
    assert native is not None and model_.compiled_decode is None
    forward = model_.forward
    diffs: list[float] = []
    picks: list[tuple[bool, int, int]] = []

    def both(input_ids, positions, meta, kv_caches):
        if meta.max_query_len != 1:  # prompts: test_native_prefill_matches_eager
            return forward(input_ids, positions, meta, kv_caches)
        got = forward(input_ids, positions, meta, kv_caches)
        model_.native_decode = None  # eagerly; rewrites the same K/V slots
        try:
            ref = forward(input_ids, positions, meta, kv_caches)
        finally:
            model_.native_decode = native
        diffs.extend(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist())
        picks.append(explained_picks(model_.compute_logits(got), model_.compute_logits(ref)))
        return ref

    model_.forward = both
    vocab = engine.model_config.vocab_size
    lengths = [3, 40, 150]
    n_new = [30, 12, 21]
    for n, new in zip(lengths, n_new, strict=True):
        ids = [int(t) for t in rng.integers(100, min(vocab, 20000), size=n)]
        engine.add_request(ids, SamplingParams.greedy(max_tokens=new, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert len(diffs) == sum(n_new) - len(n_new)  # every decode row went through both
    diffs.sort()
    median = diffs[len(diffs) // 2]
    print(f"relative hidden-state difference: median {median:.2e}, max {diffs[-1]:.2e}")
    assert median < 0.05
    assert all(ok for ok, _, _ in picks)
    flips, rows = sum(f for _, f, _ in picks), sum(n for _, _, n in picks)
    print(f"greedy picks that differ: {flips} of {rows}")
    assert flips <= 0.1 * rows


def _meta(
    tables: torch.Tensor, seq_lens: list[int], slots: list[int], counts: list[int] | None = None
) -> AttentionMetadata:
    """A step appending counts[b] tokens (default one) to sequence b, which then holds
    seq_lens[b], the new tokens' K / V going to `slots`."""
    counts = counts or [1] * len(seq_lens)
    starts = [0, *np.cumsum(counts).tolist()]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=tables.contiguous(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(counts),
        max_seq_len=max(seq_lens),
        seq_lens_host=tuple(seq_lens),
        query_start_loc_host=tuple(starts),
    )


@needs_vnni
def test_batched_rows_equal_rows_alone(smollm2_path, rng):
    """A sequence's hidden state and cache writes from a batched step are those of the same
    sequence stepped alone, bit for bit (its attention's thread count follows its own
    length, not the batch's longest), with contexts on both sides of the two-thread
    threshold; the cache changes at the step's slots only."""
    engine = _engine(smollm2_path)
    model_, caches = engine.runner.model, engine.runner.kv_caches
    assert model_.native_decode is not None
    bs, n_blocks = caches[0][0].shape[1], caches[0][0].shape[0]
    gen = _gen(rng)
    for k, v in caches:
        k.normal_(generator=gen)
        v.normal_(generator=gen)
    threshold = model_.native_decode.attn_parallel_min_keys
    # 4 sequences within the engine's 64 blocks of 16 (at most 63 + 599 + 17 + 300 tokens)
    seq_lens = [int(rng.integers(1, threshold)), int(rng.integers(threshold, 600)), 17, 300]
    tables = shuffled_block_tables(rng, seq_lens, bs, n_blocks - 1)
    slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(seq_lens)]
    ids = torch.from_numpy(rng.integers(0, engine.model_config.vocab_size, len(seq_lens)))
    positions = torch.tensor([n - 1 for n in seq_lens])
    before = [(k.clone(), v.clone()) for k, v in caches]
    with torch.inference_mode():
        batched = model_(ids, positions, _meta(tables, seq_lens, slots), caches)
        written = [(k.clone(), v.clone()) for k, v in caches]
        for b in range(len(seq_lens)):
            one = model_(
                ids[b : b + 1], positions[b : b + 1],
                _meta(tables[b : b + 1], seq_lens[b : b + 1], slots[b : b + 1]), caches,
            )  # fmt: skip
            assert torch.equal(one[0], batched[b]), b
            assert torch.isfinite(one).all()
    for (k0, v0), (k1, v1), (k2, v2) in zip(before, written, caches, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)  # the rows alone wrote the same
        changed = (k0 != k1).any(-1).any(-1).flatten().nonzero().flatten().tolist()
        assert changed == sorted(slots)
        assert torch.equal(
            (v0 != v1).any(-1).any(-1).flatten().nonzero().flatten(), torch.tensor(sorted(slots))
        )


def _chunk_meta(tables, seq_lens: list[int], counts: list[int], bs: int):
    """`_meta` of a step appending counts[b] tokens to sequence b (ending at seq_lens[b]),
    their slots from the block tables, and those tokens' positions."""
    positions = [p for n, c in zip(seq_lens, counts, strict=True) for p in range(n - c, n)]
    owners = [b for b, c in enumerate(counts) for _ in range(c)]
    slots = [int(tables[b, p // bs]) * bs + p % bs for b, p in zip(owners, positions, strict=True)]
    return _meta(tables, seq_lens, slots, counts), torch.tensor(positions)


@needs_vnni
def test_native_prefill_matches_eager(smollm2_path, rng):
    """A step of several new tokens per sequence (a prompt of 9, a chunk of 40 after 35
    cached tokens, one decode row after 199) through the native step, a row a token,
    against the eager batched prefill on the same cache and slots, the cached prefixes
    written by an earlier (eager) prefill: the criteria of test_native_decode_matches_eager
    (median relative difference, explained picks); each sequence's rows equal the same
    tokens stepped alone, bit for bit; more than PREFILL_MAX_ROWS new tokens fall back to
    the batched prefill."""
    engine = _engine(smollm2_path)
    model_, caches = engine.runner.model, engine.runner.kv_caches
    native = model_.native_decode
    assert native is not None
    bs, n_blocks = caches[0][0].shape[1], caches[0][0].shape[0]
    # real text (peaked next-token distributions: few near-ties for the picks to flip at)
    text = (
        "The sky is blue because air scatters the short wavelengths of sunlight more than "
        "the long ones. Sunlight looks white, but it holds every colour of the rainbow. "
    )
    words = engine.tokenizer.encode(text * 8)
    seq_lens, counts = [9, 75, 200], [9, 40, 1]
    tables = shuffled_block_tables(rng, seq_lens, bs, n_blocks - 1)
    prefix = [n - c for n, c in zip(seq_lens, counts, strict=True)][1:]
    meta, positions = _chunk_meta(tables[1:], prefix, prefix, bs)
    assert not native.applies(meta)  # 234 tokens: the batched prefill
    with torch.inference_mode():
        model_(torch.tensor(words[:35] + words[:199]), positions, meta, caches)
    meta, positions = _chunk_meta(tables, seq_lens, counts, bs)
    assert native.applies(meta)
    ids = torch.tensor(words[:9] + words[35:75] + words[199:200])
    with torch.inference_mode():
        got = model_(ids, positions, meta, caches)
        starts = meta.query_start_loc_host
        for b in range(len(seq_lens)):  # each sequence alone, natively
            alone, pos = _chunk_meta(tables[b : b + 1], seq_lens[b : b + 1], counts[b : b + 1], bs)
            one = model_(ids[starts[b] : starts[b + 1]], pos, alone, caches)
            assert torch.equal(one, got[starts[b] : starts[b + 1]]), b
        model_.native_decode = None
        try:
            ref = model_(ids, positions, meta, caches)  # rewrites the same slots
        finally:
            model_.native_decode = native
        diffs = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).sort().values
        explained, flips, rows = explained_picks(
            model_.compute_logits(got), model_.compute_logits(ref)
        )
    print(f"median {diffs[len(diffs) // 2]:.2e}, max {diffs[-1]:.2e}; picks differing {flips}")
    assert diffs[len(diffs) // 2] < 0.05
    assert explained and flips <= 0.1 * rows
    too_many, _ = _chunk_meta(tables, seq_lens, [9, 40, cpu_step.PREFILL_MAX_ROWS - 48], bs)
    assert not native.applies(too_many)


@needs_vnni
def test_which_step_runs(smollm2_path, gemma3_path, monkeypatch):
    """The native step where every matmul takes the VNNI kernels, else the compiled one (or
    eager): LLAMAPY_CPU_NATIVE_STEP=0, enforce_eager, int4pack weights, Gemma 3's Q6_K
    matrices off the VNNI kernels (their default)."""
    assert _engine(smollm2_path, cpu_compile=False).runner.model.native_decode is not None
    eager = _engine(smollm2_path, cpu_compile=False, cpu_native_step=False).runner.model
    assert eager.native_decode is None and eager.compiled_decode is None
    gemma = _engine(gemma3_path, cpu_compile=False).runner.model
    assert gemma.native_decode is None  # Q6_K: int4pack unless LLAMAPY_CPU_VNNI_Q6K
    monkeypatch.setenv("LLAMAPY_CPU_NATIVE_STEP", "0")
    assert _engine(smollm2_path, cpu_compile=False).runner.model.native_decode is None
    monkeypatch.setenv("LLAMAPY_CPU_NATIVE_STEP", "1")
    monkeypatch.setenv("LLAMAPY_CPU_VNNI", "0")
    assert _engine(smollm2_path, cpu_compile=False).runner.model.native_decode is None


@needs_vnni
def test_bad_metadata_is_refused(smollm2_path):
    """Metadata the step cannot take is a ValueError naming the problem, before or instead
    of any out-of-range write."""
    engine = _engine(smollm2_path)
    model_, caches = engine.runner.model, engine.runner.kv_caches
    bs, n_blocks = caches[0][0].shape[1], caches[0][0].shape[0]
    tables = torch.tensor([[3, 4]], dtype=torch.int32)
    ids, pos = torch.tensor([5]), torch.tensor([20])
    with torch.inference_mode():
        with pytest.raises(ValueError, match="slot lies outside the KV cache"):
            model_(ids, pos, _meta(tables, [21], [n_blocks * bs + 3]), caches)
        with pytest.raises(ValueError, match="sequence length lies outside its block table"):
            model_(ids, pos, _meta(tables, [2 * bs + 1], [4 * bs]), caches)
        with pytest.raises(ValueError, match="block number lies outside the KV cache"):
            model_(
                ids,
                pos,
                _meta(torch.tensor([[3, n_blocks]], dtype=torch.int32), [21], [3 * bs]),
                caches,
            )
        with pytest.raises(ValueError, match="as many block-table rows"):
            model_(ids, pos, _meta(torch.cat([tables, tables]), [21, 21], [3 * bs, 3 * bs]), caches)
        with pytest.raises(ValueError, match="contiguous torch.int32 CPU metadata"):
            model_(ids, pos, _meta(tables.long(), [21], [3 * bs]), caches)
        with pytest.raises(ValueError, match="do not fit the sequence lengths"):
            two = _meta(tables, [1], [3 * bs, 3 * bs + 1], counts=[2])  # 2 new of 1 token
            model_(torch.tensor([5, 6]), torch.tensor([0, 1]), two, caches)
        out = model_(ids, pos, _meta(tables, [21], [4 * bs + 4]), caches)  # still fine after
    assert torch.isfinite(out).all()


@needs_vnni
@pytest.mark.parametrize(
    "arch", ["llama", "llama-rope-llama3", "mistral-swa", "qwen2", "qwen3", "phi3", "gemma3"]
)
def test_native_step_on_each_architecture(arch, tmp_path, rng):
    """Tiny random transformers models of each layer variant the step takes (HF folders:
    NEOX rotary for llama too; Llama 3 rope factors; every layer windowed; Qwen2's QKV
    biases; Qwen3's q/k norms and a head width that is not hidden / heads; Phi-3's fused
    QKV and gate_up and partial rotation; Gemma 3's post norms, GELU, window 4 and two
    rotary tables), quantized to Q8_0 as they load (so every matmul is on the VNNI
    kernels): decode steps of three sequences through the native step against the eager
    one, by the criteria of test_native_decode_matches_eager."""
    from tiny_models import VOCAB, save_folder, tiny_config, tiny_model

    from llamapy.convert.at_load import load_time_quantizer
    from llamapy.models import build_causal_lm

    folder = save_folder(tiny_model(tiny_config(arch), int(rng.integers(2**31))), tmp_path / arch)
    model_file = open_model_file(folder)
    model = build_causal_lm(model_file, load_time_quantizer(model_file, "Q8_0"))
    model.prepare("cpu", cpu_kernels="fast")
    _native_against_eager(model, VOCAB, rng, arch)


def _native_against_eager(model, vocab: int, rng, label: str) -> None:
    """Three prompts in one step (a row a token), then decode steps of the three sequences,
    through the native step against the eager one, by the criteria of
    test_native_decode_matches_eager."""
    from tiny_models import PagedRunner

    native = cpu_step.NativeDecode(model)  # raises Unsupported naming what it cannot take
    runner = PagedRunner(model, num_seqs=3, max_len=40)
    prompts = {s: rng.integers(0, vocab, n).tolist() for s, n in enumerate([1, 6, 13])}
    diffs, flips, rows = [], 0, 0
    steps = [prompts] + [{s: [int(rng.integers(0, vocab))] for s in prompts} for _ in range(20)]
    for ids in steps:  # the prompts (20 rows, a row a token), then decode steps
        lens = list(runner.lens)
        model.native_decode = native
        got = runner.step(ids)
        runner.lens = lens  # the same step again, eagerly: rewrites the same slots
        model.native_decode = None
        ref = runner.step(ids)
        for s in ids:
            for g, r in zip(got[s], ref[s], strict=True):  # (V,) a token
                diffs.append(float((g - r).norm() / r.norm()))
                explained, flipped, _ = explained_picks(g[None], r[None])
                assert explained, (label, s)
                flips += flipped
                rows += 1
    diffs.sort()
    print(f"{label}: logits' relative difference median {diffs[len(diffs) // 2]:.2e}, "
          f"max {diffs[-1]:.2e}; greedy picks differing {flips} of {rows}")  # fmt: skip
    assert diffs[len(diffs) // 2] < 0.05
    assert flips <= 0.1 * rows


@needs_vnni
def test_native_step_with_split_projections(tmp_path, rng):
    """Q, K and V in two matmuls (layer 0: V of another type, as Q4_K_M files give V more
    bits) and in three (layer 1: Q of another type) within one model: the step reads q, k
    and v at their offsets in each matmul's output."""
    import gguf

    from gguf_factory import write_tiny_llama
    from llamapy.models import build_causal_lm

    Q = gguf.GGMLQuantizationType
    types = {"blk.0.attn_v.weight": Q.Q4_0, "blk.1.attn_q.weight": Q.Q4_0}
    path = write_tiny_llama(tmp_path / "mixed.gguf", rng=rng, ffn=96, vocab=64, types=types)
    model = build_causal_lm(open_model_file(path))
    model.prepare("cpu", cpu_kernels="fast")
    assert [layer.attn.proj_widths for layer in model.layers] == [
        [[64, 32], [32]],
        [[64], [32], [32]],
    ]
    names = [
        [name for name, _, _ in spec.projections] for spec in cpu_step.NativeDecode(model)._layers
    ]
    assert names == [["qk", "v"], ["q", "k", "v"]]
    _native_against_eager(model, 64, rng, "mixed")


@needs_vnni
def test_other_caches(smollm2_path, rng):
    """Caches the step cannot take (bfloat16 here) leave a forward pass to the eager layers,
    with the same result; an engine whose cache is bfloat16 does not take the step at all
    (and generates). Switching between cache sets (float16, the default, and float32)
    re-plans without growing the scratch."""
    engine = _engine(smollm2_path)
    model_, caches = engine.runner.model, engine.runner.kv_caches
    native = model_.native_decode
    bs = caches[0][0].shape[1]
    tables = torch.tensor([[2, 5]], dtype=torch.int32)
    ids, pos = torch.tensor([7]), torch.tensor([bs + 2])
    meta = _meta(tables, [bs + 3], [5 * bs + 2])
    gen = _gen(rng)
    half = [
        (k.normal_(generator=gen).bfloat16(), v.normal_(generator=gen).bfloat16())
        for k, v in caches
    ]
    other = [(k.float(), v.float()) for k, v in half]
    with torch.inference_mode():
        assert native(*_native_args(model_, ids, pos, meta), half) is None
        got = model_(ids, pos, meta, half)  # falls back
        model_.native_decode = None
        want = model_(ids, pos, meta, [(k.clone(), v.clone()) for k, v in half])
        model_.native_decode = native
        assert torch.equal(got, want)
        rows = None
        for kv in (caches, other, caches, other):
            out = model_(ids, pos, meta, kv)
            assert torch.isfinite(out).all()
            rows = rows or native._buffers.rows
            assert native._buffers.rows == rows
    bf16 = _engine(smollm2_path, kv_dtype=torch.bfloat16)
    assert bf16.runner.model.native_decode is None
    bf16.add_request([1, 2, 3], SamplingParams.greedy(max_tokens=4, ignore_eos=True))
    while bf16.has_unfinished_requests():
        bf16.step()


def _native_args(model_, ids, pos, meta):
    x = model_.embed_tokens(ids)
    cos_sin = {kind: rope.cos_sin(pos) for kind, rope in model_._ropes_by_kind.items()}
    return x, cos_sin, meta
