"""The CPU decode step as one numba call (where every matmul of the model takes the VNNI
kernels): a table of operations built once per model, run by `_step_numba.executor()`.

Why: through `torch.compile` (models/cpu_compile.py) a SmolLM2-135M token still paid ~2 ms
of dispatch between its ~6 ms of kernels: 121 matmul ops through torch's dispatcher and
their Python (~4 us each), 30 compiled layer calls (AOTAutograd's wrappers, Inductor's
Python wrapper launching its C++ loops). Here the step's host work is one Python call: the
same VNNI matmul workers, the same attention kernel (`_attention_numba`), and plain loops
for the norms, rotary embedding, KV-cache write, activation and residual adds between them
(benchmarks/RESULTS.md, fifteenth session, for the figures).

What it runs is `DecoderLayer.forward` of the llama family and Gemma 3 (biases, q/k norms,
post norms, SiLU or GELU-tanh gating, sliding windows, soft-capped scores) over a float32
(or float16: `-ctk f16`) paged KV cache, for decode batches (one new token per sequence) and
for batches of up to PREFILL_MAX_ROWS new tokens in all (short prompts, chat turns): each
token is a row with its sequence's block table and its own visible length (its position +
1), and every row's key and value are written before any row attends, so a prompt's rows
attend causally (measured 2-2.6x faster than the batched prefill at 8-64 tokens; past ~200
tokens the batched prefill's GEMMs win: benchmarks/RESULTS.md, sixteenth session);
`NativeDecode.build` returns None (and the engine keeps the compiled step) for anything
else: a matmul on another kernel (int4pack hosts without AVX512-VNNI, Q6_K unless
LLAMAPY_CPU_VNNI_Q6K, float weights), another layer class, caches other than float32 or
float16 (a call given such caches returns None, and the model runs that step eagerly).
`LLAMAPY_CPU_NATIVE_STEP=0` turns it off.

Numerics: the matmuls are the compiled and eager steps' VNNI kernels, bit for bit given the
same inputs; the attention is the kernel the compiled step takes past 256 tokens (below
that, the compiled step's Inductor loops and the eager torch ops sum in another order); the
norms sum in float64 as ggml does; the activations use a polynomial exp within a few
float32 ulps. A token's hidden state therefore differs from the compiled or eager step's in
its last bits, and, through the matmuls' 8-bit quantization of x, by an occasional int8
step (tests/models/test_cpu_step.py bounds both).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from llamapy.layers.activation import gelu_tanh_and_mul, silu_and_mul
from llamapy.layers.attention import AttentionMetadata
from llamapy.switches import switched_off

log = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]

# A sequence's attention over fewer visible keys than this runs on one thread (the fork,
# barriers and merge of the two-thread kernel cost about what they save there). Per
# sequence, so that its result does not depend on what it is batched with. SmolLM2-135M
# step, one thread / two (bench_cpu_decode_step.py --variants native-t1,native-t2), ms min:
# 2.97 / 2.99 at 16 keys, 2.90 / 2.94 at 32, 3.01 / 2.98 at 64, 3.32 / 3.24 at 128, 4.43 /
# 3.95 at 512.
ATTN_PARALLEL_MIN_KEYS = 64


def enabled() -> bool:
    """`LLAMAPY_CPU_NATIVE_STEP` (default on) and the kernels it runs (numba, VNNI)."""
    if switched_off("LLAMAPY_CPU_NATIVE_STEP"):
        return False
    from llamapy.kernels.cpu import attention as cpu_attention
    from llamapy.kernels.cpu import vnni

    return vnni.available() and cpu_attention.available()


class Unsupported(Exception):
    """Why a model cannot take the native step (logged at debug level by `build`)."""


def _vnni_weight(linear) -> tuple[int, torch.Tensor, int, int]:
    """(worker address, tiles, N, K) of a QLinear on the VNNI kernels."""
    from llamapy.kernels.cpu import _vnni_numba

    packed = getattr(linear, "packed", None)
    if linear.kernel != "cpu" or getattr(packed, "method", None) != "vnni":
        raise Unsupported(f"a matmul runs on {linear.kernel}/{getattr(packed, 'method', None)}")
    (tiles,) = packed.tensors
    return _vnni_numba._worker(int(packed.qtype)), tiles, packed.n, packed.k


def _padded(n: int) -> int:
    from llamapy.kernels.cpu.vnni import TILE_N

    return -(-n // TILE_N) * TILE_N


class _Buffers:
    """The step's float32 scratch, `rows` rows each, shared by all layers."""

    def __init__(self, rows: int, widths: dict[str, int]) -> None:
        self.rows = rows
        self.tensors = {
            name: torch.zeros(rows, w, dtype=torch.float32) for name, w in widths.items()
        }

    def ptr(self, name: str) -> int:
        return self.tensors[name].data_ptr()

    def stride(self, name: str) -> int:
        return 4 * self.tensors[name].shape[1]


# Batches of up to this many new tokens (prompt chunks included) take the step, a row each.
PREFILL_MAX_ROWS = 128


class NativeDecode:
    """Runs a decoder's layers for a decode batch, or a batch of few new tokens (prompt
    chunks included, a row each), as one numba call."""

    def __init__(self, model: torch.nn.Module) -> None:
        from llamapy.kernels.cpu import _step_numba

        self._k = _step_numba
        self._run = _step_numba.executor()
        self._layers = _describe_layers(model)
        self._widths = _buffer_widths(self._layers, model.config.hidden_size)
        self._buffers: _Buffers | None = None
        self._ops: np.ndarray | None = None
        self._caches_key: tuple = ()
        self._dyn = np.zeros(_step_numba.DYN_SIZE, dtype=np.int64)
        self.attn_parallel_min_keys = ATTN_PARALLEL_MIN_KEYS

    @classmethod
    def build(
        cls, model: torch.nn.Module, kv_caches: list[KVCache] | None = None
    ) -> NativeDecode | None:
        """The native step for `model` (and `kv_caches`, when given), or None where it cannot
        run (see the module doc)."""
        if not enabled():
            return None
        try:
            step = cls(model)
        except Unsupported as e:
            log.debug("CPU decode: the compiled step (%s)", e)
            return None
        if kv_caches is not None and not step.takes(kv_caches):
            log.debug("CPU decode: the compiled step (KV caches the native step cannot read)")
            return None
        return step

    def takes(self, kv_caches: list[KVCache]) -> bool:
        """Whether the step can read and write these caches: one (K, V) pair per layer,
        contiguous float32 or float16 CPU tensors of shape (blocks, block_size, kv heads,
        head dim)."""
        if len(kv_caches) != len(self._layers):
            return False
        for spec, (kc, vc) in zip(self._layers, kv_caches, strict=True):
            if not (
                kc.dtype == vc.dtype
                and kc.dtype in (torch.float32, torch.float16)
                and kc.device.type == vc.device.type == "cpu"
                and kc.dim() == 4
                and kc.shape == vc.shape
                and tuple(kc.shape[2:]) == (spec.n_kv, spec.head_dim)
                and kc.is_contiguous()
                and vc.is_contiguous()
            ):
                return False
        return True

    @staticmethod
    def applies(meta: AttentionMetadata) -> bool:
        """A decode batch, or at most PREFILL_MAX_ROWS new tokens whose sequences' lengths
        and query offsets are known on the host."""
        if meta.max_query_len == 1:
            return True
        starts = meta.query_start_loc_host
        return (
            len(starts) >= 2
            and len(meta.seq_lens_host) == len(starts) - 1
            and starts[-1] <= PREFILL_MAX_ROWS
        )

    def __call__(
        self,
        x: torch.Tensor,
        cos_sin: dict[bool, tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
    ) -> torch.Tensor | None:
        """The final hidden states (T, hidden) of the layers from the embeddings x (T,
        hidden) of the batch's new tokens (one per sequence, or a few per sequence within
        `applies`' bound), writing each layer's K and V at the slots; None (nothing run) for
        caches the step cannot take (`takes`: the caller runs the step another way)."""
        rows = x.shape[0]
        caches_key = tuple((k.data_ptr(), v.data_ptr(), k.shape, v.shape) for k, v in kv_caches)
        if caches_key != self._caches_key:
            if not self.takes(kv_caches):
                return None
            self._caches_key, self._ops = caches_key, None
        if self._buffers is None or rows > self._buffers.rows:
            grown = 2 * self._buffers.rows if self._buffers is not None else 1
            self._buffers, self._ops = _Buffers(max(rows, grown), self._widths), None
        if self._ops is None:
            self._ops = self._plan(self._buffers, kv_caches)
        bufs, k = self._buffers, self._k
        residual = bufs.tensors["residual"]
        residual[:rows].copy_(x)
        if meta.max_query_len == 1:
            tables = _contiguous(meta.block_tables, torch.int32)
            seq_lens = _contiguous(meta.seq_lens, torch.int32)
        else:
            tables, seq_lens = _rows_of(meta)
        slots = _contiguous(meta.slot_mapping, torch.int64)
        if not (tables.shape[0] == seq_lens.shape[0] == slots.shape[0] == rows):
            raise ValueError(
                f"a step of {rows} rows needs as many block-table rows, sequence "
                f"lengths and slots, got {tables.shape[0]}, {seq_lens.shape[0]}, "
                f"{slots.shape[0]}"
            )
        threads = torch.get_num_threads()
        angles = [cos_sin[False], cos_sin.get(True, cos_sin[False])]
        angles = [tuple(_contiguous(t, torch.float32) for t in pair) for pair in angles]
        if any(t.dim() != 2 or t.shape[0] != rows for pair in angles for t in pair):
            raise ValueError(f"a decode step of {rows} rows needs rotary angles for {rows} rows")
        dyn = self._dyn
        dyn[k.DYN_ROWS] = rows
        dyn[k.DYN_THREADS] = threads
        dyn[k.DYN_ATTN_MIN_KEYS] = self.attn_parallel_min_keys
        dyn[k.DYN_TABLES] = tables.data_ptr()
        dyn[k.DYN_WIDTH] = tables.shape[1]
        dyn[k.DYN_SEQ_LENS] = seq_lens.data_ptr()
        dyn[k.DYN_SLOTS] = slots.data_ptr()
        for t, (cos, sin) in enumerate(angles):
            dyn[k.DYN_COS + 2 * t] = cos.data_ptr()
            dyn[k.DYN_COS + 2 * t + 1] = sin.data_ptr()
        err = self._run(self._ops, dyn)
        if err:
            raise ValueError(self._describe_error(err))
        return residual[:rows].clone()

    def _describe_error(self, err: int) -> str:
        k = self._k
        what = {
            k.ERR_SEQ_LEN: "a sequence length lies outside its block table",
            k.ERR_BLOCK: "a block number lies outside the KV cache",
            k.ERR_SLOT: "a slot lies outside the KV cache",
        }.get(err % 16, f"error {err % 16}")
        return f"decode step: {what} (operation {err // 16 - 1}); nothing after it ran"

    def _plan(self, b: _Buffers, kv_caches: list[KVCache]) -> np.ndarray:
        """The table of operations of one step over scratch `b` and these caches (see
        `_step_numba` for each operation's arguments)."""
        k = self._k
        rows: list[list[int]] = []

        def op(code: int, *args: int) -> None:
            rows.append([code, *args])

        def f32(v: float) -> int:
            return int(np.array(v, dtype=np.float32).view(np.int32))

        def matmul(m: _Matmul, x: int, out: str) -> tuple[int, int]:
            y, ys = b.ptr(out), b.stride(out)
            op(k.OP_MATMUL, m.worker, m.tiles.data_ptr(), m.tiles.shape[0], x, m.k, y)
            if m.bias is not None:
                op(k.OP_BIAS, y, ys, m.bias.data_ptr(), m.n)
            return y, ys

        hidden = self._widths["residual"]
        res, xn = (b.ptr("residual"), b.stride("residual")), (b.ptr("xn"), b.stride("xn"))
        for spec, (kc, vc) in zip(self._layers, kv_caches, strict=True):
            eps = f32(spec.eps)

            def norm(src, dst, weight, groups=1, width=hidden, eps=eps) -> None:
                op(k.OP_NORM, *src, *dst, weight.data_ptr(), groups, width, eps)

            norm(res, xn, spec.attn_norm)
            parts = []  # q, k and v: (address, row stride) in the matmuls' outputs
            for name, m, widths in spec.projections:
                y, ys = matmul(m, xn[0], name)
                offsets = np.cumsum([0, *widths[:-1]]) * 4
                parts += [(y + int(offset), ys) for offset in offsets]
            q, kp, v = parts
            if spec.q_norm is not None:
                norm(q, q, spec.q_norm, spec.n_heads, spec.head_dim)
            if spec.k_norm is not None:
                norm(kp, kp, spec.k_norm, spec.n_kv, spec.head_dim)
            qb = (b.ptr("qrot"), b.stride("qrot"))
            rope = (spec.head_dim, spec.rot_dim, int(spec.interleaved), spec.table)
            op(k.OP_ROPE, *q, *qb, spec.n_heads, *rope)
            op(k.OP_ROPE, *kp, *kp, spec.n_kv, *rope)
            n_blocks, block_size = kc.shape[0], kc.shape[1]
            row = spec.n_kv * spec.head_dim
            caches = (kc.data_ptr(), vc.data_ptr())
            es = kc.element_size()
            op(k.OP_KV, *kp, *v, *caches, row, row, n_blocks * block_size, es)
            attn = b.ptr("attn")
            op(
                k.OP_ATTN, qb[0], *caches, attn, spec.n_heads, spec.n_kv, spec.head_dim,
                n_blocks, block_size, f32(spec.scale), spec.window, f32(spec.softcap),
                k._attention_numba.worker_for(spec.head_dim, es), es,
            )  # fmt: skip
            out = matmul(spec.o, attn, "o")
            if spec.attn_post_norm is not None:
                norm(out, out, spec.attn_post_norm)
            op(k.OP_ADD, *res, *out, hidden)
            norm(res, xn, spec.ffn_norm)
            inter = spec.intermediate
            if spec.gate_up is not None:
                y, ys = matmul(spec.gate_up, xn[0], "gate_up")
                gate, up = (y, ys), (y + 4 * inter, ys)
            else:
                gate, up = (
                    matmul(m, xn[0], name)
                    for m, name in zip(spec.gate_up_parts, ("g", "u"), strict=True)
                )
            op(k.OP_ACT, *gate, *up, b.ptr("act"), inter, spec.act)
            out = matmul(spec.down, b.ptr("act"), "down")
            if spec.ffn_post_norm is not None:
                norm(out, out, spec.ffn_post_norm)
            op(k.OP_ADD, *res, *out, hidden)
        table = np.zeros((len(rows), k.ROW), dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        return table


def _rows_of(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of several new tokens per sequence as one row per token: each row's block
    table (its sequence's) and visible length (its position + 1: the keys up to itself)."""
    starts, lens = meta.query_start_loc_host, meta.seq_lens_host
    counts = [starts[i + 1] - starts[i] for i in range(len(lens))]
    if any(c < 0 for c in counts) or any(c > n for c, n in zip(counts, lens, strict=True)):
        raise ValueError(f"query offsets {starts} do not fit the sequence lengths {lens}")
    owner = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(counts))
    tables = _contiguous(meta.block_tables, torch.int32)[owner].contiguous()
    visible = [n - c + 1 + j for c, n in zip(counts, lens, strict=True) for j in range(c)]
    return tables, torch.tensor(visible, dtype=torch.int32)


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(
            f"the native decode step needs contiguous {dtype} CPU metadata, got {t.dtype} "
            f"on {t.device} (contiguous: {t.is_contiguous()})"
        )
    return t


class _Matmul:
    def __init__(self, linear) -> None:
        self.worker, self.tiles, self.n, self.k = _vnni_weight(linear)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias = self.bias.float().contiguous()


class _LayerSpec:
    """What the plan reads of one DecoderLayer."""

    def __init__(self, layer, table: int) -> None:
        from llamapy.kernels.cpu import _attention_numba
        from llamapy.models.llama import DecoderLayer

        if type(layer) is not DecoderLayer:
            raise Unsupported(f"layer class {type(layer).__name__}")
        attn, mlp = layer.attn, layer.mlp
        self.eps = layer.eps
        self.n_heads, self.n_kv, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        if attn.v_head_dim != attn.head_dim:
            raise Unsupported("value heads of another width than key heads")
        self.attn_norm, self.ffn_norm = _vec(layer.attn_norm), _vec(layer.ffn_norm)
        self.attn_post_norm = _vec(layer.attn_post_norm)
        self.ffn_post_norm = _vec(layer.ffn_post_norm)
        self.q_norm, self.k_norm = _vec(attn.q_norm), _vec(attn.k_norm)
        # (name, matmul, output widths) of the matmuls giving q, k and v (one to three):
        # "qkv", or "qk" and "v", or "q", "k" and "v"
        self.projections: list[tuple[str, _Matmul, list[int]]] = []
        first = 0
        for linear, widths in attn.projections():
            name = "qkv"[first : first + len(widths)]
            self.projections.append((name, _Matmul(linear), list(widths)))
            first += len(widths)
        self.o = _Matmul(attn.o_proj)
        rope = attn.rope
        self.rot_dim, self.interleaved, self.table = rope.rot_dim, rope.interleaved, table
        if self.rot_dim > self.head_dim:
            raise Unsupported("a rotary dimension past the head")
        self.scale = float(attn.scale)
        self.window = int(attn.sliding_window or 0)
        self.softcap = float(attn.softcap or 0.0)
        for elem_bytes in (2, 4):  # float16 and float32 caches: loaded or compiled now
            _attention_numba.worker_for(self.head_dim, elem_bytes)
        self.gate_up = _Matmul(mlp.gate_up) if mlp.gate is None else None
        self.gate_up_parts = [_Matmul(mlp.gate), _Matmul(mlp.up)] if mlp.gate is not None else None
        self.down = _Matmul(mlp.down)
        self.intermediate = self.down.k
        acts = {silu_and_mul: 0, gelu_tanh_and_mul: 1}
        if mlp.activation not in acts:
            raise Unsupported(f"activation {getattr(mlp.activation, '__name__', mlp.activation)}")
        self.act = acts[mlp.activation]
        if self.gate_up is not None and self.gate_up.n != 2 * self.intermediate:
            raise Unsupported("a gate_up matmul of another width than twice the FFN's")
        for name, m, widths in self.projections:
            if m.n != sum(widths):
                raise Unsupported(f"a {name} matmul of another width than the heads'")

    def matmuls(self) -> list[tuple[str, _Matmul]]:
        named = [("o", self.o), ("down", self.down)]
        named += [(name, m) for name, m, _ in self.projections]
        if self.gate_up is not None:
            named.append(("gate_up", self.gate_up))
        else:
            named += list(zip(("g", "u"), self.gate_up_parts, strict=True))
        return named


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise Unsupported(f"a norm weight of {t.dtype} on {t.device}")
    return t


def _describe_layers(model: torch.nn.Module) -> list[_LayerSpec]:
    ropes = model._ropes_by_kind
    if set(ropes) - {False, True}:
        raise Unsupported("rotary tables other than global / sliding")
    specs = []
    for il, layer in enumerate(model.layers):
        sliding = model._is_sliding(il)
        table = 1 if sliding and ropes.get(True) is not ropes[False] else 0
        if layer.attn.rope is not ropes[sliding]:
            raise Unsupported("a layer's rotary embedding is not its model's")
        specs.append(_LayerSpec(layer, table))
    return specs


def _buffer_widths(layers: list[_LayerSpec], hidden: int) -> dict[str, int]:
    """Each buffer's row width in floats. The kernels take rows at fixed strides (x: K
    floats, a matmul's output: its padded N), so every layer must have the same shapes."""
    found: dict[str, set[int]] = {"residual": {hidden}, "xn": {hidden}}
    for spec in layers:
        width = spec.n_heads * spec.head_dim
        inputs = {"o": width, "down": spec.intermediate}
        for name, m in spec.matmuls():
            found.setdefault(name, set()).add(_padded(m.n))
            if m.k != inputs.get(name, hidden):
                raise Unsupported(f"a {name} matmul of input width {m.k}")
        found.setdefault("qrot", set()).add(width)
        found.setdefault("attn", set()).add(width)
        found.setdefault("act", set()).add(spec.intermediate)
    uneven = sorted(name for name, ws in found.items() if len(ws) > 1)
    if uneven:
        raise Unsupported(f"layers of different shapes ({', '.join(uneven)})")
    return {name: ws.pop() for name, ws in found.items()}
