"""The llama family: Llama 2/3, SmolLM2, Mistral (SWA where the config gives it; llama.cpp's
GGUFs drop it), Qwen2 (QKV bias), Qwen3 (q/k norm), Phi-3 (fused qkv and gate_up, partial
rotary), and Gemma 3 on the same blocks. Checked against transformers from both file kinds
(tests/models/test_hf_archs.py).

The forward pass takes a flattened batch: `input_ids (T,)`, `positions (T,)` and the
`AttentionMetadata` that says where each sequence's tokens and KV blocks are.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamapy.layers.activation import gelu_tanh_and_mul, silu_and_mul
from llamapy.layers.attention import (
    AttentionMetadata,
    decode_attention_dense,
    rope_kv_attention,
)
from llamapy.layers.linear import QLinear, embedding_lookup
from llamapy.layers.norm import add_rms_norm, rms_norm
from llamapy.layers.rotary import RotaryEmbedding
from llamapy.models.cpu_compile import CompiledDecode
from llamapy.models.cpu_step import NativeDecode
from llamapy.models.weights import Weights
from llamapy.quant.legacy import WIDENS_TO_Q8_0, widen_to_q8_0
from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class BlockOptions:
    """What distinguishes one family's decoder block from another's."""

    activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = silu_and_mul
    post_norms: bool = False  # Gemma: norm the attention / MLP output before the residual


def group_projections(
    weights: list[QTensor],
    biases: list[torch.Tensor | None],
    widths: list[int],
    widen: bool = False,
) -> list[tuple[QLinear, list[int]]]:
    """Projections of one input (Q, K, V) as few matmuls as their types allow, in order, each
    with its outputs' widths: all in one; with `widen`, all in one Q8_0 matmul when the types
    differ but each has an exact Q8_0 form (`quant.legacy.widen_to_q8_0`: Q4_0, Q5_0); else
    the first two in one (Q4_K_M files give V more bits than Q and K: a Q6_K or Q8_0 V
    beside Q4_K or Q5_0 ones) and the last alone; else one each. Fewer, larger calls: a
    decode GEMV launch less on the GPU."""
    whole = QLinear.fused(weights, biases)
    if whole is not None:
        return [(whole, widths)]
    types = {w.qtype for w in weights}
    if widen and len(types) > 1 and types <= WIDENS_TO_Q8_0:
        wide = [QTensor(widen_to_q8_0(w.data, w.qtype), QuantType.Q8_0, w.shape) for w in weights]
        return group_projections(wide, biases, widths)
    head = QLinear.fused(weights[:2], biases[:2])
    if head is not None:
        return [(head, widths[:2]), (QLinear(weights[2], biases[2]), widths[2:])]
    return [(QLinear(wt, b), [n]) for wt, b, n in zip(weights, biases, widths, strict=True)]


class Attention(torch.nn.Module):
    def __init__(self, w: Weights, il: int, rope: RotaryEmbedding, opts: BlockOptions) -> None:
        super().__init__()
        cfg = w.config
        p = f"blk.{il}."
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.v_head_dim = cfg.head_dim, cfg.v_head_dim or cfg.head_dim
        self.eps = cfg.norm_eps
        widths = [
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.v_head_dim,
        ]
        if w.has(p + "attn_qkv.weight"):  # Phi-3 fuses Q, K and V
            qkv = QLinear(w.q(p + "attn_qkv.weight"), w.f32_opt(p + "attn_qkv.bias"))
            groups = [(qkv, widths)]
        else:
            names = [p + f"attn_{x}" for x in "qkv"]
            weights = [w.q(n + ".weight") for n in names]
            biases = [w.f32_opt(n + ".bias") for n in names]
            groups = group_projections(weights, biases, widths)
            if len(groups) > 1:  # `widen_projections` may still fuse them for the GPU
                self._sources = (weights, biases, widths)
        # Q, K and V in as few matmuls as their types allow, and each one's output widths
        self.proj = torch.nn.ModuleList([linear for linear, _ in groups])
        self.proj_widths = [list(ws) for _, ws in groups]
        self.o_proj = QLinear(w.q(p + "attn_output.weight"), w.f32_opt(p + "attn_output.bias"))
        self.q_norm = w.f32_opt(p + "attn_q_norm.weight", norm=True)  # Qwen3, Gemma 3
        self.k_norm = w.f32_opt(p + "attn_k_norm.weight", norm=True)
        self.rope = rope
        self.scale = cfg.attention_scale or 1.0 / math.sqrt(self.head_dim)
        is_sliding = cfg.sliding_window is not None and cfg.sliding_layers[il]
        self.sliding_window = cfg.sliding_window if is_sliding else None
        self.softcap = cfg.attn_logit_softcap

    _sources: tuple[list[QTensor], list[torch.Tensor | None], list[int]] | None = None

    def widen_projections(self, widen: bool) -> None:
        """Before `prepare`: with `widen` (the GPU, `gpu_widening`), Q, K and V as one Q8_0
        matmul where their types kept them apart but each widens to Q8_0 exactly. Either way
        the source blocks are let go."""
        sources, self._sources = self._sources, None
        if sources is None or not widen:
            return
        groups = group_projections(*sources, widen=True)
        if len(groups) < len(self.proj):
            self.proj = torch.nn.ModuleList([linear for linear, _ in groups])
            self.proj_widths = [list(ws) for _, ws in groups]

    def projections(self) -> list[tuple[QLinear, list[int]]]:
        """The matmuls producing q, k and v, in that order, each with its outputs' widths."""
        return list(zip(self.proj, self.proj_widths, strict=True))

    def _project(
        self, x: torch.Tensor, **fused: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v of x (T, hidden), each (T, width); `fused` goes to every matmul (the
        CUDA decode step's norm prologue)."""
        parts: list[torch.Tensor] = []
        for linear, widths in self.projections():
            y = linear(x, **fused)
            parts += y.split(widths, dim=-1) if len(widths) > 1 else [y]
        q, k, v = parts
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self._project(x)
        q = q.view(T, self.num_heads, self.head_dim)  # (T, nh, hd)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = v.view(T, self.num_kv_heads, self.v_head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm, self.eps)
        if meta.dense_decode:  # the CPU's compiled decode step (models/cpu_compile.py)
            q, k = self.rope.apply_pair(q, k, *cos_sin)
            out = decode_attention_dense(
                q,
                k,
                v,
                *kv_cache,
                meta,
                scale=self.scale,
                sliding_window=self.sliding_window,
                softcap=self.softcap,
            )
            return self.o_proj(out.reshape(T, -1))
        out = rope_kv_attention(
            self.rope,
            q,
            k,
            v,
            cos_sin,
            kv_cache,
            meta,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
        )
        return self.o_proj(out.reshape(T, -1))

    def forward_fused(
        self,
        stream: torch.Tensor,
        norm: tuple[torch.Tensor, float],
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> None:
        """CUDA decode (`DecoderLayer.forward_fused`): as `forward` of rms_norm(stream), the
        norm computed by the QKV GEMVs, the output projection added into `stream` in place."""
        T = stream.shape[0]
        q, k, v = self._project(stream, norm_weight=norm[0], eps=norm[1])
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.v_head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm, self.eps)
        out = rope_kv_attention(
            self.rope,
            q,
            k,
            v,
            cos_sin,
            kv_cache,
            meta,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            defer_merge=self.o_proj.kernel == "triton",  # its GEMV merges the key splits
        )
        self.o_proj(out if not isinstance(out, torch.Tensor) else out.reshape(T, -1),
                    residual=stream)  # fmt: skip


class MLP(torch.nn.Module):
    def __init__(self, w: Weights, il: int, opts: BlockOptions) -> None:
        super().__init__()
        p = f"blk.{il}."
        self.down = QLinear(w.q(p + "ffn_down.weight"), w.f32_opt(p + "ffn_down.bias"))
        up, up_bias = w.q(p + "ffn_up.weight"), w.f32_opt(p + "ffn_up.bias")
        gate = w.q_opt(p + "ffn_gate.weight")
        self.gate = None
        if gate is None:  # Phi-3 stores gate and up as one matrix (gate first)
            self.gate_up = QLinear(up, up_bias)
        else:
            gate_bias = w.f32_opt(p + "ffn_gate.bias")
            self.gate_up = QLinear.fused([gate, up], [gate_bias, up_bias])
            if self.gate_up is None:
                self.gate, self.up = QLinear(gate, gate_bias), QLinear(up, up_bias)
        self.activation = opts.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(self.activation(gate, up))


# The gated activations the down GEMV can compute from the gate_up output (CUDA decode).
_FUSED_ACTIVATIONS = {silu_and_mul: "silu", gelu_tanh_and_mul: "gelu_tanh"}
# CUDA decode runs each layer as four fused GEMVs (DecoderLayer.forward_fused); tests and
# benchmarks switch it off to compare (read by LlamaForCausalLM.plan_fused_decode).
FUSED_DECODE = True
# On the GPU, Q4_0 and Q5_0 matrices can be held as their exact Q8_0 twins (`quant.legacy.
# widen_to_q8_0`: the same weights, ~1.5-1.9x the bytes), whose decode GEMV does less work a
# weight. `gpu_widening` says where (LLAMAPY_GPU_WIDEN=0: nowhere):
# - "all": a model whose matrices take at most WIDEN_MAX_MODEL_BYTES, where decode is bound
#   by launches and per-weight work, not bytes. SmolLM2-135M shape, tg128, H200 (run103):
#   Q4_0 1912 -> 2042 t/s; Q4_K_M (mostly Q5_0: its 576-wide rows fall back from the
#   K-quants) 1587 -> 1786; its 74 MB of Q4_0 matrices take ~140 MB. Q4_1 matrices (no
#   exact Q8_0 form) keep their blocks and add their quants one a byte, which the decode
#   GEMV reads (`qmatmul.BYTE_TWIN_TYPES`; about 2.6x the matrices' bytes on the GPU).
# - "projections" (larger models): only a layer's Q, K and V whose types kept them apart
#   (llama.cpp's Q4_K_M recipe where widths are not multiples of 256: Q5_0 Q and K beside a
#   Q8_0 V) become one Q8_0 matmul: one GEMV launch a layer less (the same SmolLM2 file
#   with only this: 1587 -> 1654).
WIDEN_MAX_MODEL_BYTES = 256 << 20
# On the GPU, Q4_K and Q5_K matrices can be held as the Q4_1 / Q5_1 blocks their 32-weight
# sub-blocks are (`qmatmul.LEGACY_TWINS`: the same values, float32 scales and offsets, 6 and
# 7 bits a weight instead of 4.5 and 5.5), which the legacy kernels read: the decode GEMV
# with its fused norm and activation prologues (the K-quant GEMV runs separate norm /
# activation kernels at the larger shapes) and Q4_1's tuned tiles, the fp16-tile GEMM from
# 16 rows. Written for Q4_K_M files, whose K-quant GEMVs were the slowest decode path. On
# by default (LLAMAPY_GPU_KQUANT_TWINS=0 turns it off): H200, benchmarks/gpu_ab.py,
# alternating, 1B Q4_K_M tg128 898.7 -> 1059.2 t/s (+18%), B=64 +4.5%, pp512 -7% (the
# fp16 tiles' float32 scales); SmolLM2 Q4_K_M tg128 +6%. The price is GPU memory: Q4_K /
# Q5_K matrices take a third / a quarter more bytes there than in the file, so a model whose
# twins would not fit beside it and what the engine reserves keeps its K-quant blocks.
# Where LLAMAPY_GPU_X_CODES_Q4K_PIPE turns that on (off by default: no faster), Q4_K
# matrices the one-row decode then reads over x's codes as stored (`xcodes.takes_native`:
# the 1B's gate_up and ffn_down; `_codes_take_blocks`) get no twin.
KQUANT_TWINS = True


def gpu_kquant_twins(
    env: str | None = None, extra_bytes: int = 0, spare_bytes: int | None = None
) -> bool:
    """Whether the GPU holds Q4_K / Q5_K matrices as their legacy twins (see above): env
    (LLAMAPY_GPU_KQUANT_TWINS) "0" no, "1" yes; else KQUANT_TWINS, unless the twins'
    `extra_bytes` exceed `spare_bytes`, the GPU memory left once the model's blocks and the
    engine's reservation are placed (None: not checked)."""
    if env in ("0", "1"):
        return env == "1"
    if env:
        logger.warning("LLAMAPY_GPU_KQUANT_TWINS=%r is not 0 or 1: ignored", env)
    if KQUANT_TWINS and spare_bytes is not None and extra_bytes > spare_bytes:
        logger.info(
            "Q4_K / Q5_K matrices stay K-quant blocks on the GPU: their Q4_1 / Q5_1 twins "
            "(faster decode) need %d MiB more and %d MiB are spare",
            extra_bytes >> 20,
            max(spare_bytes, 0) >> 20,
        )
        return False
    return KQUANT_TWINS


def gpu_widening(matrix_bytes: int, env: str | None = None) -> str:
    """Which matrices a model whose quantized matrices take `matrix_bytes` in the file
    widens on the GPU (see above): "all", "projections" or, where env (LLAMAPY_GPU_WIDEN) is
    "0", "off"; env "all" / "projections" forces that level whatever the size (to measure
    it on larger models)."""
    if env == "0":
        return "off"
    if env in ("all", "projections"):
        return env
    if env and env != "1":
        logger.warning("LLAMAPY_GPU_WIDEN=%r is not 0, all or projections: ignored", env)
    return "all" if matrix_bytes <= WIDEN_MAX_MODEL_BYTES else "projections"


class DecoderLayer(torch.nn.Module):
    fused_activation: str | None = None  # set by LlamaForCausalLM.plan_fused_decode

    def __init__(self, w: Weights, il: int, rope: RotaryEmbedding, opts: BlockOptions) -> None:
        super().__init__()
        p = f"blk.{il}."
        self.eps = w.config.norm_eps
        self.attn_norm = w.f32(p + "attn_norm.weight", norm=True)
        self.ffn_norm = w.f32(p + "ffn_norm.weight", norm=True)
        self.attn = Attention(w, il, rope, opts)
        self.mlp = MLP(w, il, opts)
        self.attn_post_norm = self.ffn_post_norm = None
        if opts.post_norms:
            self.attn_post_norm = w.f32(p + "post_attention_norm.weight", norm=True)
            self.ffn_post_norm = w.f32(p + "post_ffw_norm.weight", norm=True)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the previous layer's output h, the residual stream before it) -> the same pair
        for this layer: the residual add is fused with the norm that follows it."""
        if self.fused_activation is not None and self.decode_fuses(h, residual):
            return self.forward_fused(h, residual, cos_sin, meta, kv_cache)
        if residual is None:  # first layer: h is the embedding
            residual, x = h, rms_norm(h, self.attn_norm, self.eps)
        else:
            x, residual = add_rms_norm(h, residual, self.attn_norm, self.eps)
        h = self.attn(x, cos_sin, meta, kv_cache)
        if self.attn_post_norm is not None:
            h = rms_norm(h, self.attn_post_norm, self.eps)
        x, residual = add_rms_norm(h, residual, self.ffn_norm, self.eps)
        h = self.mlp(x)
        if self.ffn_post_norm is not None:
            h = rms_norm(h, self.ffn_post_norm, self.eps)
        return h, residual

    def fusable_activation(self) -> str | None:
        """Whether this layer can run as fused GEMVs (Triton kernels, no post norms, gate and
        up in one matrix): the name of its gated activation, or None."""
        mlp = self.mlp
        if self.attn_post_norm is not None or mlp.gate is not None:
            return None
        linears = [self.attn.o_proj, mlp.gate_up, mlp.down]
        linears += list(self.attn.proj)
        if any(lin.kernel != "triton" for lin in linears):
            return None
        return _FUSED_ACTIVATIONS.get(mlp.activation)

    @staticmethod
    def decode_fuses(h: torch.Tensor | None, residual: torch.Tensor | None) -> bool:
        """A batch the GEMVs take (the decode step: at most GEMV_MAX_M rows). The answer is
        the same for every layer of a forward pass (all or none fuse: a fused layer hands on
        its output already added to the residual stream, h None)."""
        from llamapy.kernels.triton.qmatmul import GEMV_MAX_M

        return h is None or h.shape[0] <= GEMV_MAX_M

    def forward_fused(
        self,
        h: torch.Tensor | None,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> tuple[None, torch.Tensor]:
        """CUDA decode: `forward` in four GEMVs and no norm or activation kernel: QKV from
        the residual stream with the attention norm inside, the output projection added into
        the stream in place, gate_up with the FFN norm inside, down with the gated activation
        inside, added into the stream (one row of large Q4 matrices: `qmatmul` routes them
        over int8 codes of x, `kernels.triton.xcodes`). Returns (None, the stream): h is
        already added."""
        if residual is None:  # first layer: the embedding (a fresh tensor) becomes the stream
            residual = h
        elif h is not None:
            residual = residual + h
        self.attn.forward_fused(residual, (self.attn_norm, self.eps), cos_sin, meta, kv_cache)
        mlp = self.mlp
        rows = residual.shape[0]
        if _prologue_pays(mlp.gate_up, rows):
            gate_up = mlp.gate_up(residual, norm_weight=self.ffn_norm, eps=self.eps)
        else:
            gate_up = mlp.gate_up(rms_norm(residual, self.ffn_norm, self.eps))
        if _prologue_pays(mlp.down, rows):
            mlp.down(gate_up, act=self.fused_activation, residual=residual)
        else:
            mlp.down(mlp.activation(*gate_up.chunk(2, dim=-1)), residual=residual)
        return None, residual


# K-quant matrices up to this many weights take the prologue all the same: there the launch
# it saves costs more than the re-reads (H200, SmolLM2-135M Q4_K_M from `llamapy quantize`,
# whose Q4_K / Q6_K ffn_down is 576 x 1536: tg128 1210.9 -> 1228.8 / 1227.2 t/s with it;
# the 1B shape's 2048 x 8192 and 16384 x 2048: 859-860 -> 747-748, `.gpu/run69.sh`).
KQUANT_PROLOGUE_MAX_WEIGHTS = 1 << 20


def _prologue_pays(linear: QLinear, rows: int) -> bool:
    """Whether the norm / activation prologue speeds this wide GEMV of `rows` rows up.
    Measured on an H100 / H200 (benchmarks/kernels/bench_fused_gemv.py, Llama-3.2-1B
    shapes): 1.01-1.05x for Q4_0, 1.10-1.24x for Q8_0, but 0.68-0.89x for Q4_K and Q6_K
    gate_up / down, whose one-row single-warp programs each re-read the whole input row
    (and gain registers): the K-quant family keeps a separate norm / activation kernel
    there, except for small matrices (KQUANT_PROLOGUE_MAX_WEIGHTS) and one row over x's
    codes (`xcodes.weight_takes`, a CUDA decode's: the quantizing kernel applies the
    prologue)."""
    from llamapy.kernels.triton import xcodes
    from llamapy.kernels.triton.qmatmul import _KQUANT_TYPES

    if linear.packed.qtype not in _KQUANT_TYPES:
        return True
    if rows == 1 and xcodes.weight_takes(linear.packed):
        return True
    return linear.out_features * linear.in_features <= KQUANT_PROLOGUE_MAX_WEIGHTS


def _codes_take_blocks(linear: QLinear) -> bool:
    """Whether the decode step's one-row product reads this K-quant matrix's blocks as they
    are over x's codes (`xcodes.takes_native`: Q4_K at 4.6 bits a weight against its Q4_1
    twin's 6), so that the GPU holds no legacy twin of it."""
    from llamapy.kernels.triton import HAS_TRITON

    if not HAS_TRITON:
        return False
    from llamapy.kernels.triton import xcodes

    return xcodes.takes_native(linear._weight.qtype, linear.out_features, linear.in_features)


class LlamaForCausalLM(torch.nn.Module):
    """Decoder-only transformer over a paged KV cache."""

    block_options = BlockOptions()
    embedding_scale: float | None = None
    # CPU decode steps as one numba call (models/cpu_step.py), else through torch.compile
    # (models/cpu_compile.py); set by the engine
    native_decode: NativeDecode | None = None
    compiled_decode: CompiledDecode | None = None
    # CPU: called after each embedding lookup (set by `prepare`, see there)
    release_embedding_pages: Callable[[], None] | None = None

    def __init__(self, weights: Weights) -> None:
        super().__init__()
        cfg = self.config = weights.config
        self.embed = weights.q("token_embd.weight")
        self.lm_head = QLinear(weights.q_opt("output.weight") or self.embed)
        self.norm = weights.f32("output_norm.weight", norm=True)
        ropes = self._ropes(weights)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(weights, il, ropes[self._is_sliding(il)], self.block_options)
            for il in range(cfg.num_layers)
        )
        self._ropes_by_kind = ropes

    def prepare(
        self,
        device: torch.device | str,
        *,
        cpu_kernels: str = "fast",
        release_pages: Callable[[], None] | None = None,
        gpu_reserve_bytes: int = 0,
    ) -> None:
        """Place the weights on `device` in the form its kernels read (once, after building).
        `cpu_kernels="reference"` keeps the CPU on the dequantize-per-call torch oracle.
        `release_pages`, called after each repacked matrix, lets the file's pages go as
        soon as they are copied, so they never all stay resident beside the copies; on the
        CPU it is called after each embedding lookup too.
        `gpu_reserve_bytes`: GPU memory the caller will need after this (its KV cache and
        working buffers), which the optional larger forms of the weights must leave free."""
        device = torch.device(device)
        widening = "off"
        if device.type == "cuda":
            widening = gpu_widening(self.matrix_bytes(), os.environ.get("LLAMAPY_GPU_WIDEN"))
        self.widen(widening)
        twins = device.type == "cuda" and self.kquant_twins_fit(device, gpu_reserve_bytes)
        if release_pages is not None:  # the pages building read (small tensors it copied)
            release_pages()
        for module in self.modules():
            if isinstance(module, QLinear):
                module.legacy_twin = twins and not _codes_take_blocks(module)
                module.prepare(device, cpu_kernels)
                if release_pages is not None:
                    release_pages()
            else:  # norm weights and other small float tensors held as plain attributes
                for name, value in list(vars(module).items()):
                    if isinstance(value, torch.Tensor):
                        setattr(module, name, value.to(device))
        self.embed = self.embed.to(device)
        # On the CPU the embedding table stays in the mapped file, and a lookup maps its
        # rows' pages (2 MiB at a time where the page cache holds large folios): let them go
        # after each lookup, or over a generation the table grows resident beside the
        # repacked copies (a second copy of a tied output matrix; Gemma 3's is 70% of its file)
        self.release_embedding_pages = release_pages if device.type == "cpu" else None
        for rope in self._ropes_by_kind.values():
            rope.inv_freq = rope.inv_freq.to(device)
        if device.type == "cuda":
            self.plan_fused_decode()

    def build_rope_tables(self, n_positions: int) -> None:
        """Keep each rope kind's cos / sin of positions [0, n_positions) on the model's device
        (`RotaryEmbedding.build_table`), gathered by steps whose positions stay below it."""
        for rope in {id(r): r for r in self._ropes_by_kind.values()}.values():
            rope.build_table(n_positions, rope.inv_freq.device)

    def kquant_twins_fit(self, device: torch.device, gpu_reserve_bytes: int = 0) -> bool:
        """Whether `prepare` on the GPU `device` holds Q4_K / Q5_K matrices as their legacy
        twins (`gpu_kquant_twins`): the twins' extra bytes against the memory free now less
        the model's blocks, its embedding and `gpu_reserve_bytes`."""
        extra = sum(
            m.legacy_twin_extra_nbytes()
            for m in self.modules()
            if isinstance(m, QLinear) and not _codes_take_blocks(m)
        )
        spare = None
        if extra:
            free = torch.cuda.mem_get_info(device)[0]
            spare = free - self.matrix_bytes() - self.embed.data.nbytes - gpu_reserve_bytes
        return gpu_kquant_twins(os.environ.get("LLAMAPY_GPU_KQUANT_TWINS"), extra, spare)

    def matrix_bytes(self) -> int:
        """Bytes of the model's matrices as the file holds them (before `prepare`)."""
        return sum(m.file_nbytes for m in self.modules() if isinstance(m, QLinear))

    def widen(self, widening: str) -> None:
        """Before `prepare`: hold Q4_0 / Q5_0 matrices as exact Q8_0 ones, all of them
        ("all") or a layer's Q, K and V where that lets them run as one matmul
        ("projections"); "off": neither. The projections' source blocks are let go."""
        for layer in self.layers:
            layer.attn.widen_projections(widening != "off")
        if widening == "all":
            for module in self.modules():
                if isinstance(module, QLinear):
                    module.widen_to_q8_0()

    def plan_fused_decode(self) -> None:
        """CUDA: decode batches run every layer as fused GEMVs (`DecoderLayer.forward_fused`)
        when every layer can (all or none) and FUSED_DECODE is on."""
        acts = [layer.fusable_activation() for layer in self.layers]
        on = FUSED_DECODE and all(a is not None for a in acts)
        for layer, act in zip(self.layers, acts, strict=True):
            layer.fused_activation = act if on else None

    def _is_sliding(self, il: int) -> bool:
        return self.config.sliding_window is not None and self.config.sliding_layers[il]

    def _ropes(self, w: Weights) -> dict[bool, RotaryEmbedding]:
        cfg = w.config
        rot_dim = cfg.rope_dim or cfg.head_dim
        freq_factors = w.f32_opt("rope_freqs.weight")

        def make(base: float, scaling) -> RotaryEmbedding:
            return RotaryEmbedding(
                rot_dim,
                base,
                interleaved=w.rope_interleaved,
                scaling=scaling,
                freq_factors=freq_factors,
            )

        global_rope = make(cfg.rope_theta or 10_000.0, cfg.rope_scaling)
        # Gemma 3's sliding layers use their own base and no scaling.
        local_rope = make(cfg.rope_theta_swa, None) if cfg.rope_theta_swa else global_rope
        return {False: global_rope, True: local_rope}

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = embedding_lookup(self.embed, input_ids, torch.float32, self.embedding_scale)
        if self.release_embedding_pages is not None:
            self.release_embedding_pages()
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) final hidden states (before the output norm)."""
        x = self.embed_tokens(input_ids)
        cos_sin, by_rope = {}, {}  # a model of one rope kind holds one object under both keys
        for kind, rope in self._ropes_by_kind.items():
            if id(rope) not in by_rope:
                by_rope[id(rope)] = rope.cos_sin(positions, meta.max_seq_len)
            cos_sin[kind] = by_rope[id(rope)]
        if self.native_decode is not None and self.native_decode.applies(meta):
            hidden = self.native_decode(x, cos_sin, meta, kv_caches)
            if hidden is not None:
                return hidden
        if self.compiled_decode is not None and self.compiled_decode.applies(meta):
            per_layer = [cos_sin[self._is_sliding(il)] for il in range(len(self.layers))]
            hidden = self.compiled_decode(self.layers, x, per_layer, meta, kv_caches)
            if hidden is not None:
                return hidden
        residual = None
        for il, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos_sin[self._is_sliding(il)], meta, kv_caches[il])
        return residual if x is None else residual + x  # x None: fused layers added it

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(rms_norm(hidden, self.norm, self.config.norm_eps))
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3: GELU-tanh gating, pre and post norms, q/k norms, sqrt(d)-scaled embeddings,
    interleaved sliding-window layers with their own rope base (llama.cpp: llm_build_gemma3)."""

    block_options = BlockOptions(activation=gelu_tanh_and_mul, post_norms=True)

    def __init__(self, weights: Weights) -> None:
        super().__init__(weights)
        self.embedding_scale = math.sqrt(self.config.hidden_size)
