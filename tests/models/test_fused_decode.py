"""The fused decode layer (`DecoderLayer.forward_fused`: QKV and gate_up GEMVs with the
RMSNorm inside, o_proj and down adding into the residual stream, down computing the gated
activation) gives the logits of the unfused layer (norm kernels, activation kernel, plain
GEMVs) on a tiny random-weight llama, step after step over a paged KV cache.

On CUDA the model is prepared as the engine does; without a GPU the same Triton kernels run
in the interpreter (the QLinears packed for Triton on CPU tensors, attention and norms on
the torch path), so the fused layer's wiring is checked in CI too.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import llamapy.kernels.triton as kt
from llamapy.layers.attention import AttentionMetadata
from llamapy.models import llama

pytestmark = pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BLOCK = 4


def tiny_model(
    tmp_path,
    rng: np.random.Generator,
    qtype: gguf.GGMLQuantizationType,
    types: dict[str, gguf.GGMLQuantizationType] | None = None,
    widen: str = "off",
    monkeypatch: pytest.MonkeyPatch | None = None,
    twins: bool = False,
    **shape,
):
    from gguf_factory import write_tiny_llama
    from llamapy.formats import open_model_file
    from llamapy.kernels.triton.qmatmul import pack_weight
    from llamapy.layers.linear import QLinear
    from llamapy.models import build_causal_lm

    path = tmp_path / "tiny.gguf"
    if not path.exists():  # a second model of a test reads the first one's file
        shape = {"hidden": 64, "ffn": 96, **shape}
        write_tiny_llama(path, rng=rng, qtype=qtype, types=types,
                         matrix_scale=shape["hidden"] ** -0.5, **shape)  # fmt: skip
    model = build_causal_lm(open_model_file(path))
    if CUDA:
        if monkeypatch is not None:  # the tiny model is "small": prepare widens all or nothing
            assert widen != "projections", "a GPU prepare of the tiny model widens all or none"
            monkeypatch.setenv("LLAMAPY_GPU_WIDEN", "1" if widen == "all" else "0")
            monkeypatch.setenv("LLAMAPY_GPU_KQUANT_TWINS", "1" if twins else "0")
        model.prepare(DEVICE)  # plans the fused decode (and widens as the engine's would)
        return model
    model.widen(widen)  # as `prepare` does on a GPU
    for module in model.modules():  # the interpreter: Triton kernels on CPU tensors
        if isinstance(module, QLinear):
            w = module.weight
            module.legacy_twin = twins  # as `prepare` sets it on a GPU
            module.packed = pack_weight(w.data, w.qtype, w.shape, module.byte_twin, twins)
            module.kernel = "triton"
    model.plan_fused_decode()
    return model


class Runner:
    """Sequences appended step by step; each sequence's blocks scattered in the cache."""

    def __init__(self, model, num_seqs: int, max_len: int) -> None:
        from llamapy.engine.kv_cache import allocate_kv_cache

        per_seq = -(-max_len // BLOCK)
        self.model = model
        self.kv = allocate_kv_cache(model.config, num_seqs * per_seq, BLOCK, device=DEVICE)
        perm = torch.randperm(num_seqs * per_seq, dtype=torch.int32)
        self.tables = perm.view(num_seqs, per_seq)
        self.lens = [0] * num_seqs
        self.decode_splits: int | None = (
            None  # the CUDA decode kernel's key splits (None: its rule)
        )

    @torch.no_grad()
    def step(self, chunks: list[list[int]], advance: bool = True) -> torch.Tensor:
        """Every sequence's next tokens in one forward pass -> the logits (T, vocab)."""
        ids, pos, slots, lens, starts = [], [], [], [], [0]
        for s, toks in enumerate(chunks):
            first = self.lens[s]
            for p in range(first, first + len(toks)):
                slots.append(int(self.tables[s, p // BLOCK]) * BLOCK + p % BLOCK)
            ids += toks
            pos += range(first, first + len(toks))
            lens.append(first + len(toks))
            starts.append(starts[-1] + len(toks))
        if advance:
            self.lens = lens
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=DEVICE),
            block_tables=self.tables.to(DEVICE),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
            max_query_len=max(len(t) for t in chunks),
            max_seq_len=max(lens),
            seq_lens_host=tuple(lens),
            query_start_loc_host=tuple(starts),
            decode_splits=self.decode_splits,
        )
        ids_t, pos_t = torch.tensor(ids, device=DEVICE), torch.tensor(pos, device=DEVICE)
        hidden = self.model(ids_t, pos_t, meta, self.kv)
        return self.model.compute_logits(hidden)


def assert_same_logits(model, other, steps: list[list[list[int]]]) -> None:
    """`model` and `other` (the same weights in other forms) give the same logits, within
    float32 roundings, over the same steps of two sequences in the same cache blocks."""
    runners = Runner(model, num_seqs=2, max_len=8), Runner(other, num_seqs=2, max_len=8)
    runners[1].tables = runners[0].tables
    for chunks in steps:
        got, want = (r.step(chunks) for r in runners)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def set_fused(model, on: bool, monkeypatch) -> None:
    monkeypatch.setattr(llama, "FUSED_DECODE", on)
    model.plan_fused_decode()


Q = gguf.GGMLQuantizationType
# Q, K and V of another type than their neighbours (as Q4_K_M files give V more bits): layer
# 0's V (Q and K in one matmul, V in another), layer 1's Q (three matmuls)
MIXED = {"blk.0.attn_v.weight": Q.Q4_0, "blk.1.attn_q.weight": Q.Q4_0}
# the interpreter takes ~10 s per case here: three cases there, four on a GPU
CASES = [(Q.Q8_0, None, "off"), (Q.Q8_0, MIXED, "off"), (Q.Q8_0, MIXED, "all")]
CASES += [(Q.Q4_0, None, "off")] if CUDA else []


@pytest.mark.parametrize(
    ("qtype", "types", "widen"),
    CASES,
    ids=lambda c: "mixed" if isinstance(c, dict) else getattr(c, "name", c),
)
def test_fused_decode_matches_unfused(tmp_path, rng, qtype, types, widen, monkeypatch) -> None:
    model = tiny_model(tmp_path, rng, qtype, types, widen, monkeypatch)
    assert [layer.fused_activation for layer in model.layers] == ["silu"] * 2
    groups = [layer.attn.proj_widths for layer in model.layers]
    if types is None or widen == "all":
        assert groups == [[[64, 32, 32]]] * 2  # one QKV matmul a layer
    else:
        assert groups == [[[64, 32], [32]], [[64], [32], [32]]]
    runner = Runner(model, num_seqs=3, max_len=16)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (3, 2, 4)]
    runner.step(prompts)  # a prefill of 9 rows: the unfused layers (GEMM-sized batch)

    fused_calls = []
    forward_fused = llama.DecoderLayer.forward_fused

    def counting(self, *args):
        fused_calls.append(self)
        return forward_fused(self, *args)

    def no_add_rms_norm(*args, **kwargs):
        raise AssertionError("a residual add + norm kernel ran in the fused decode step")

    norms = []
    rms_norm = llama.rms_norm

    def counting_norm(*args, **kwargs):
        norms.append(args[0].shape)
        return rms_norm(*args, **kwargs)

    monkeypatch.setattr(llama.DecoderLayer, "forward_fused", counting)
    for _ in range(2):  # decode steps: one new token for each of the 3 sequences
        nxt = [[int(t)] for t in rng.integers(0, vocab, 3)]
        with monkeypatch.context() as m:
            m.setattr(llama, "add_rms_norm", no_add_rms_norm)
            m.setattr(llama, "rms_norm", counting_norm)
            fused = runner.step(nxt, advance=False)
        assert len(norms) == 1, "only the output norm (compute_logits) runs as a kernel"
        norms.clear()
        set_fused(model, False, monkeypatch)
        unfused = runner.step(nxt)  # rewrites the same K/V slots, then moves on
        set_fused(model, True, monkeypatch)
        assert not fused.isnan().any()
        scale = unfused.abs().max().item()
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5 * scale)
    assert len(fused_calls) == 2 * len(model.layers)


@pytest.mark.parametrize("bound", [8, 0], ids=["merged-by-o", "merge-kernel"])
def test_o_merges_the_attention_splits(tmp_path, rng, bound, monkeypatch) -> None:
    """The fused decode attention (rotary, cache write, key splits; in the interpreter on a
    CPU) leaves its splits for o_proj's GEMV to merge (`DecodeSplits`): no merge kernel runs,
    and the logits are the unfused layers' (and those of the merge kernel, bound 0)."""
    from llamapy.kernels.triton import INTERPRET, attention, qmatmul
    from llamapy.layers import attention as attention_layer

    if not (CUDA or INTERPRET):
        pytest.skip("the fused decode attention needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setattr(attention_layer, "TRITON_DECODE_ON_CPU", True)
    monkeypatch.setattr(attention, "MERGE_IN_GEMV_MAX_SPLITS", bound)
    monkeypatch.setattr(qmatmul, "MERGE_MIN_K", 0)  # the tiny o's K (128) merges too
    monkeypatch.setattr(qmatmul, "MERGE_MAX_ROWS", qmatmul.GEMV_MAX_M)  # and 3 sequences
    # heads of 32: whole 32-blocks of o_proj's K, which its GEMV's merge takes
    model = tiny_model(tmp_path, rng, Q.Q8_0, monkeypatch=monkeypatch, hidden=128, n_heads=4)
    merges = []
    combine = attention.combine_splits
    monkeypatch.setattr(attention, "combine_splits", lambda *a: merges.append(1) or combine(*a))
    runner = Runner(model, num_seqs=3, max_len=48)
    runner.decode_splits = 3  # of the interpreter's 16-key tiles: keys in every split
    vocab = model.config.vocab_size
    runner.step([rng.integers(0, vocab, n).tolist() for n in (40, 20, 33)])
    for _ in range(2):
        nxt = [[int(t)] for t in rng.integers(0, vocab, 3)]
        merges.clear()
        fused = runner.step(nxt, advance=False)
        assert len(merges) == (0 if bound else len(model.layers))
        set_fused(model, False, monkeypatch)
        unfused = runner.step(nxt)
        set_fused(model, True, monkeypatch)
        assert not fused.isnan().any()
        scale = unfused.abs().max().item()
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("widen", ["projections", "all"])
def test_widened_matrices_give_the_same_logits(tmp_path, rng, widen, monkeypatch) -> None:
    """Q4_0 matrices held as exact Q8_0 ones (the GPU's `gpu_widening`: every matrix of a
    small model, or a layer's mixed-type Q, K and V fused into one Q8_0 matmul) give the
    logits of the model that keeps them as they are, prefill and decode steps; a type
    without an exact Q8_0 form (Q4_1) keeps its layer's projections apart, and with every
    matrix widened its decode GEMV reads a byte twin of its quants."""
    if CUDA and widen == "projections":
        pytest.skip("a GPU prepare widens the tiny model whole; the interpreter checks this")
    types = {**MIXED, "blk.1.attn_k.weight": Q.Q4_1}  # layer 1: Q4_0 Q, Q4_1 K, Q8_0 V
    wide = tiny_model(tmp_path, rng, Q.Q8_0, types, widen, monkeypatch)
    apart = tiny_model(tmp_path, rng, Q.Q8_0, types, "off", monkeypatch)
    assert [layer.attn.proj_widths for layer in wide.layers] == [[[64, 32, 32]], [[64], [32], [32]]]
    assert [layer.attn.proj_widths for layer in apart.layers] == [
        [[64, 32], [32]],
        [[64], [32], [32]],
    ]
    wide_types = [linear.packed.qtype for layer in wide.layers for linear in layer.attn.proj]
    assert wide_types == [Q.Q8_0] + (
        [Q.Q8_0, Q.Q4_1, Q.Q8_0] if widen == "all" else [Q.Q4_0, Q.Q4_1, Q.Q8_0]
    )
    k_proj = wide.layers[1].attn.proj[1].packed
    assert ("q8" in k_proj.tensors) == (widen == "all")
    vocab = wide.config.vocab_size
    # On a GPU, 5 prefill rows would run GEMMs whose dots round their inputs to TF32 (the
    # widened Q8_0 and the Q4_0 matrices alike, but not the same products): 4 rows keep
    # both models on float32 GEMVs there (the kernel tests bound the GEMM), as in the twins'
    # test below; the interpreter's dots are float32, so 5 rows here.
    prompts = [rng.integers(0, vocab, n).tolist() for n in ((3, 1) if CUDA else (3, 2))]
    steps = [prompts] + [[[int(t)] for t in rng.integers(0, vocab, 2)] for _ in range(2)]
    assert_same_logits(wide, apart, steps)


@pytest.mark.parametrize("widen", ["off", "all"])
def test_kquant_twins_give_the_same_logits(tmp_path, rng, widen, monkeypatch) -> None:
    """Q4_K / Q5_K matrices held as the Q4_1 / Q5_1 blocks of their sub-blocks (the GPU's
    default, `models.llama.gpu_kquant_twins`; with every matrix widened, Q4_1 twins also
    get the byte twin the decode GEMV reads) give the logits of the model that keeps the
    K-quant blocks, prefill and decode steps; a Q6_K matrix (no legacy twin) stays."""
    types = {"attn_v.weight": Q.Q5_K, "ffn_down.weight": Q.Q6_K}
    shape = {"hidden": 256, "ffn": 256, "n_layers": 1}  # K-quant rows: multiples of 256
    twin = tiny_model(tmp_path, rng, Q.Q4_K, types, widen, monkeypatch, twins=True, **shape)
    kq = tiny_model(tmp_path, rng, Q.Q4_K, types, widen, monkeypatch, twins=False, **shape)
    layer = twin.layers[0]
    twin_types = [lin.packed.qtype for lin in layer.attn.proj] + [layer.mlp.down.packed.qtype]
    assert twin_types == [Q.Q4_1, Q.Q5_1, Q.Q6_K]  # Q and K in one matmul, V apart
    assert [lin.packed.qtype for lin in kq.layers[0].attn.proj] == [Q.Q4_K, Q.Q5_K]
    assert ("q8" in layer.attn.proj[0].packed.tensors) == (widen == "all")
    vocab = twin.config.vocab_size
    # On a GPU, 5 prefill rows would run the twins' GEMM, whose dots round their inputs to
    # TF32, against the K-quant kernels' float32: 4 rows keep both on float32 GEMVs there
    # (the kernel tests bound the GEMM); the interpreter's dots are float32, so 5 rows here.
    prompts = [rng.integers(0, vocab, n).tolist() for n in ((3, 1) if CUDA else (3, 2))]
    steps = [prompts, [[int(t)] for t in rng.integers(0, vocab, 2)]]  # prefill, decode
    assert_same_logits(twin, kq, steps)


def test_kquant_twins_need_spare_gpu_memory(tmp_path, rng, monkeypatch, caplog) -> None:
    """The GPU holds the twins only where their extra bytes fit in the memory free beside the
    model's blocks, its embedding and the engine's reservation (a card that fits the K-quant
    model need not fit its twins); LLAMAPY_GPU_KQUANT_TWINS=1 holds them regardless."""
    import logging

    from gguf_factory import write_tiny_llama
    from llamapy.formats import open_model_file
    from llamapy.models import build_causal_lm

    types = {"attn_v.weight": Q.Q5_K, "ffn_down.weight": Q.Q6_K}
    shape = {"hidden": 256, "ffn": 256, "n_layers": 1}
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, rng=rng, qtype=Q.Q4_K, types=types, **shape)
    model = build_causal_lm(open_model_file(path))
    # Q4_K: 0.75 bytes a weight as the twin, 144 / 256 as blocks; Q5_K 0.875 and 176 / 256
    q4k = 256 * (256 + 128) + 256 * 256 + 2 * 256 * 256 + 32 * 256  # QK, o, gate_up, lm_head
    extra = int(q4k * (0.75 - 144 / 256) + 128 * 256 * (0.875 - 176 / 256))  # + V (exact)
    placed = model.matrix_bytes() + model.embed.data.nbytes
    reserve = 5 << 20
    cuda = torch.device("cuda")
    monkeypatch.delenv("LLAMAPY_GPU_KQUANT_TWINS", raising=False)
    monkeypatch.setattr(llama, "KQUANT_TWINS", True)
    for free, fits in ((placed + reserve + extra, True), (placed + reserve + extra - 1, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (f, 1 << 40))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llamapy.models.llama"):
            assert model.kquant_twins_fit(cuda, reserve) is fits
        assert ("stay K-quant blocks" in caplog.text) is not fits
    monkeypatch.setenv("LLAMAPY_GPU_KQUANT_TWINS", "1")
    assert model.kquant_twins_fit(cuda, reserve) is True


def test_widening_policy(tmp_path, rng) -> None:
    """Small models widen every Q4_0 / Q5_0 matrix on the GPU, larger ones only mixed-type
    projections; LLAMAPY_GPU_WIDEN=0 none. A model's matrix bytes are the file's, counted
    without concatenating a fused layer's parts."""
    from gguf_factory import write_tiny_llama
    from llamapy.formats import open_model_file
    from llamapy.layers.linear import QLinear
    from llamapy.models import build_causal_lm

    path = write_tiny_llama(tmp_path / "t.gguf", rng=rng, qtype=Q.Q4_0, types=MIXED)
    model = build_causal_lm(open_model_file(path))
    reader = gguf.GGUFReader(path)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert model.matrix_bytes() == sum(int(t.n_bytes) for t in matrices)  # tied output
    assert all(
        m._parts is not None
        for m in model.modules()
        if isinstance(m, QLinear) and m.out_features > 96
    )
    small = llama.WIDEN_MAX_MODEL_BYTES
    assert llama.gpu_widening(small) == "all" and llama.gpu_widening(small, "1") == "all"
    assert llama.gpu_widening(small + 1) == "projections"
    assert llama.gpu_widening(small, "0") == llama.gpu_widening(small + 1, "0") == "off"
    assert llama.gpu_widening(small + 1, "all") == "all"  # forced, to measure larger models
    assert llama.gpu_widening(small, "projections") == "projections"
    assert llama.gpu_widening(small + 1, "2") == "projections"  # unknown: warned, ignored
    assert 150 << 20 <= small < 700 << 20, "the SmolLM2-shape files widened, not the 1B's"


def test_fusion_is_all_or_nothing(tmp_path, rng, monkeypatch) -> None:
    """A layer that cannot fuse (gate and up apart) keeps every layer on the unfused path;
    FUSED_DECODE off does too; a GEMM-sized batch never takes the fused form."""
    model = tiny_model(tmp_path, rng, gguf.GGMLQuantizationType.Q8_0)
    set_fused(model, False, monkeypatch)
    assert all(layer.fused_activation is None for layer in model.layers)
    set_fused(model, True, monkeypatch)
    mlp = model.layers[1].mlp
    mlp.gate, mlp.up = mlp.gate_up, mlp.gate_up  # stands in for two matrices
    model.plan_fused_decode()
    assert all(layer.fused_activation is None for layer in model.layers)
    assert llama.DecoderLayer.decode_fuses(torch.empty(4, 1), None)
    assert not llama.DecoderLayer.decode_fuses(torch.empty(5, 1), None)


def test_prologue_rule(monkeypatch) -> None:
    """Legacy types always take the norm / activation prologue; K-quant matrices only up to
    KQUANT_PROLOGUE_MAX_WEIGHTS (measured: SmolLM2's 576 x 1536 ffn_down gains, the 1B
    shape's 2048 x 8192 and 16384 x 2048 lose), or for one row on CUDA where x's codes take
    the weight (the quantizing kernel applies the prologue)."""
    from types import SimpleNamespace

    from llamapy.kernels.triton import xcodes
    from llamapy.quant.types import QuantType as Q

    def linear(qtype, n, k):
        return SimpleNamespace(packed=SimpleNamespace(qtype=qtype), out_features=n, in_features=k)

    monkeypatch.setattr(xcodes, "weight_takes", lambda w: False)
    for rows in (1, 4):
        assert llama._prologue_pays(linear(Q.Q4_0, 16384, 2048), rows)
        assert llama._prologue_pays(linear(Q.Q8_0, 576, 1536), rows)
        for q in (Q.Q4_K, Q.Q6_K):
            assert llama._prologue_pays(linear(q, 576, 1536), rows)
            assert not llama._prologue_pays(linear(q, 2048, 8192), rows)
            assert not llama._prologue_pays(linear(q, 16384, 2048), rows)
    monkeypatch.setattr(xcodes, "weight_takes", lambda w: w.qtype == Q.Q6_K)
    assert llama._prologue_pays(linear(Q.Q6_K, 2048, 8192), 1)  # over the codes
    assert not llama._prologue_pays(linear(Q.Q6_K, 2048, 8192), 2)
    assert not llama._prologue_pays(linear(Q.Q4_K, 2048, 8192), 1)  # not taken


def test_codes_take_the_large_q4_k_matrices_as_stored(monkeypatch) -> None:
    """With LLAMAPY_GPU_X_CODES_Q4K_PIPE on, `prepare` holds no legacy twin of a Q4_K matrix
    the one-row decode reads over x's codes as stored (the 1B's gate_up and ffn_down), and
    twins the others (smaller ones, Q5_K, or all of them with it off, the default, or the
    codes off)."""
    from types import SimpleNamespace

    from llamapy.kernels.triton import xcodes
    from llamapy.quant.types import QuantType as QT

    def linear(qtype, n, k):
        return SimpleNamespace(_weight=SimpleNamespace(qtype=qtype), out_features=n, in_features=k)

    monkeypatch.delenv("LLAMAPY_GPU_X_CODES", raising=False)
    assert xcodes._pipe_config(None, xcodes.Q4K_PIPE_DEFAULT) == {"short": None, "long": None}
    assert not llama._codes_take_blocks(linear(QT.Q4_K, 16384, 2048))  # off by default
    monkeypatch.setattr(xcodes, "_Q4K_PIPE", dict(xcodes.Q4K_PIPE_MEASURED))
    assert llama._codes_take_blocks(linear(QT.Q4_K, 16384, 2048))
    assert llama._codes_take_blocks(linear(QT.Q4_K, 2048, 8192))
    assert not llama._codes_take_blocks(linear(QT.Q4_K, 3072, 2048))  # qkv: below MIN_WEIGHTS
    assert not llama._codes_take_blocks(linear(QT.Q5_K, 16384, 2048))
    assert not llama._codes_take_blocks(linear(QT.Q4_K, 49152, 576))  # K below MIN_K
    monkeypatch.setenv("LLAMAPY_GPU_X_CODES", "0")
    assert not llama._codes_take_blocks(linear(QT.Q4_K, 16384, 2048))


def test_x_codes_give_the_same_logits(tmp_path, rng, monkeypatch) -> None:
    """One-row decode steps whose Q4_0 GEMVs and Q6_K / Q4_K ffn_down (as in Q4_K_M files,
    the Q4_K one as stored) take x's int8 codes (`kernels.triton.xcodes`, thresholds lowered
    to the tiny model: the norm and gating prologues, the residual adds and the output
    matrix all go through it) give the float32 GEMVs' logits, within the codes' error
    (~1.5e-5 of each 32-block's largest value, two levels)."""
    from llamapy.kernels.triton import xcodes

    monkeypatch.setattr(xcodes, "MIN_K", 32)
    monkeypatch.setattr(xcodes, "MIN_WEIGHTS", 1)
    monkeypatch.setattr(xcodes, "_Q4K_PIPE", dict(xcodes.Q4K_PIPE_MEASURED))  # opt-in
    calls = []
    real = xcodes.matmul
    monkeypatch.setattr(
        xcodes, "matmul", lambda x, w, *a, **kw: calls.append(w.qtype) or real(x, w, *a, **kw)
    )
    types = {"blk.0.ffn_down.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q4_K}  # K = ffn
    codes = tiny_model(tmp_path, rng, Q.Q4_0, types, "off", monkeypatch, ffn=256)
    plain = tiny_model(tmp_path, rng, Q.Q4_0, types, "off", monkeypatch, ffn=256)
    runners = Runner(codes, num_seqs=1, max_len=8), Runner(plain, num_seqs=1, max_len=8)
    runners[1].tables = runners[0].tables
    vocab = codes.config.vocab_size
    steps = [[rng.integers(0, vocab, 3).tolist()]] + [[[int(t)]] for t in rng.integers(0, vocab, 2)]
    for i, chunks in enumerate(steps):
        monkeypatch.setenv("LLAMAPY_GPU_X_CODES", "1")
        before = len(calls)
        got = runners[0].step(chunks)
        assert (len(calls) > before) == (i > 0)  # decode steps only (one row)
        monkeypatch.setenv("LLAMAPY_GPU_X_CODES", "0")
        want = runners[1].step(chunks)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=0, atol=5e-4 * want.abs().max().item())
    assert {int(Q.Q4_0), int(Q.Q6_K), int(Q.Q4_K)} == {int(t) for t in calls}  # downs too
