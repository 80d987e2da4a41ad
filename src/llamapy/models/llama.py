"""The llama family: Llama 2/3, SmolLM2, Mistral (SWA where the config gives it; llama.cpp's
GGUFs drop it), Qwen2 (QKV bias), Qwen3 (q/k norm), Phi-3 (fused qkv and gate_up, partial
rotary), and Gemma 3 on the same blocks. Checked against transformers from both file kinds
(tests/models/test_hf_archs.py).

The forward pass takes a flattened batch: `input_ids (T,)`, `positions (T,)` and the
`AttentionMetadata` that says where each sequence's tokens and KV blocks are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamapy.layers.activation import gelu_tanh_and_mul, silu_and_mul
from llamapy.layers.attention import AttentionMetadata, paged_attention, rope_and_write_kv
from llamapy.layers.linear import QLinear, embedding_lookup
from llamapy.layers.norm import add_rms_norm, rms_norm
from llamapy.layers.rotary import RotaryEmbedding
from llamapy.models.weights import Weights

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class BlockOptions:
    """What distinguishes one family's decoder block from another's."""

    activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = silu_and_mul
    post_norms: bool = False  # Gemma: norm the attention / MLP output before the residual


class Attention(torch.nn.Module):
    def __init__(self, w: Weights, il: int, rope: RotaryEmbedding, opts: BlockOptions) -> None:
        super().__init__()
        cfg = w.config
        p = f"blk.{il}."
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.v_head_dim = cfg.head_dim, cfg.v_head_dim or cfg.head_dim
        self.eps = cfg.norm_eps
        self.q_proj = self.k_proj = self.v_proj = None
        if w.has(p + "attn_qkv.weight"):  # Phi-3 fuses Q, K and V
            self.qkv = QLinear(w.q(p + "attn_qkv.weight"), w.f32_opt(p + "attn_qkv.bias"))
        else:
            # One matmul for the three when their types agree (fewer, larger calls).
            names = [p + f"attn_{x}" for x in "qkv"]
            weights = [w.q(n + ".weight") for n in names]
            biases = [w.f32_opt(n + ".bias") for n in names]
            self.qkv = QLinear.fused(weights, biases)
            if self.qkv is None:
                self.q_proj, self.k_proj, self.v_proj = (
                    QLinear(wt, b) for wt, b in zip(weights, biases, strict=True)
                )
        self.o_proj = QLinear(w.q(p + "attn_output.weight"), w.f32_opt(p + "attn_output.bias"))
        self.q_norm = w.f32_opt(p + "attn_q_norm.weight", norm=True)  # Qwen3, Gemma 3
        self.k_norm = w.f32_opt(p + "attn_k_norm.weight", norm=True)
        self.rope = rope
        self.scale = cfg.attention_scale or 1.0 / math.sqrt(self.head_dim)
        is_sliding = cfg.sliding_window is not None and cfg.sliding_layers[il]
        self.sliding_window = cfg.sliding_window if is_sliding else None
        self.softcap = cfg.attn_logit_softcap

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is not None:
            nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv(x).split([nq, nk, self.num_kv_heads * self.v_head_dim], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

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
        q = rope_and_write_kv(self.rope, q, k, v, cos_sin, kv_cache, meta.slot_mapping)
        out = paged_attention(
            q,
            *kv_cache,
            meta,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
        )
        return self.o_proj(out.reshape(T, -1))


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


class DecoderLayer(torch.nn.Module):
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


class LlamaForCausalLM(torch.nn.Module):
    """Decoder-only transformer over a paged KV cache."""

    block_options = BlockOptions()
    embedding_scale: float | None = None

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
    ) -> None:
        """Place the weights on `device` in the form its kernels read (once, after building).
        `cpu_kernels="reference"` keeps the CPU on the dequantize-per-call torch oracle.
        `release_pages`, called after each repacked matrix, lets the file's pages go as
        soon as they are copied, so they never all stay resident beside the copies."""
        device = torch.device(device)
        for module in self.modules():
            if isinstance(module, QLinear):
                module.prepare(device, cpu_kernels)
                if release_pages is not None:
                    release_pages()
            else:  # norm weights and other small float tensors held as plain attributes
                for name, value in list(vars(module).items()):
                    if isinstance(value, torch.Tensor):
                        setattr(module, name, value.to(device))
        self.embed = self.embed.to(device)
        for rope in self._ropes_by_kind.values():
            rope.inv_freq = rope.inv_freq.to(device)

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
        x = embedding_lookup(self.embed, input_ids, torch.float32)
        if self.embedding_scale is not None:
            x = x * self.embedding_scale
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
        cos_sin = {kind: rope.cos_sin(positions) for kind, rope in self._ropes_by_kind.items()}
        residual = None
        for il, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos_sin[self._is_sliding(il)], meta, kv_caches[il])
        return residual + x

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
