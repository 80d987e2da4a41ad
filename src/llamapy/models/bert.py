"""BERT encoders (llama.cpp: llama_model_bert::graph), bidirectional, over a flattened batch.

The forward pass takes the same flattened batch as the decoders: `input_ids (T,)`,
`positions (T,)` (0-based within each sequence) and the `AttentionMetadata` of the batch's
sequences. No padding: every linear layer sees exactly the T real tokens; attention is
computed per sequence (torch SDPA on the CPU; on CUDA the Triton paged-attention kernels of
generation with `causal=False`, reading K/V from a scratch cache the caller provides).

File-kind differences: a HF `BertForSequenceClassification` keeps its pooler (dense + tanh,
`cls.*`) and classifier (`cls.output.*`); llama.cpp's converter drops the pooler. GELU is the
config's `hidden_act` for HF folders and ggml's tanh approximation for GGUF, as llama.cpp
computes it. Token types are used when given (a query/document pair); llama.cpp always
uses type 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llamapy.layers.attention import AttentionMetadata, paged_attention, write_kv
from llamapy.layers.linear import QLinear, embedding_lookup
from llamapy.layers.norm import layer_norm
from llamapy.models.weights import Weights

KVCache = tuple[torch.Tensor, torch.Tensor]

# HF `hidden_act` values whose GELU is the tanh approximation.
_TANH_GELUS = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh"})


def encoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
    *,
    scale: float,
) -> torch.Tensor:
    """Bidirectional attention within each sequence: q, k, v (T, n_heads, d) -> (T, n_heads,
    d). On CUDA, K/V go to the scratch cache and the generation kernels read them."""
    if q.is_cuda:
        if kv_cache is None:
            raise ValueError("encoder attention on CUDA needs a scratch KV cache")
        write_kv(*kv_cache, k, v, meta.slot_mapping)
        return paged_attention(q, *kv_cache, meta, scale=scale, causal=False)
    out = torch.empty_like(q)
    starts = meta.query_start_loc_host
    for b in range(meta.num_seqs):
        s, e = starts[b], starts[b + 1]
        # 4-D inputs: torch's CPU flash-attention kernel (3-D ones take the slower math path)
        out[s:e] = F.scaled_dot_product_attention(
            q[None, s:e].transpose(1, 2),  # (1, nh, L, d)
            k[None, s:e].transpose(1, 2),
            v[None, s:e].transpose(1, 2),
            scale=scale,
        )[0].transpose(0, 1)
    return out


class EncoderLayer(torch.nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, w: Weights, il: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        cfg = w.config
        p = f"blk.{il}."
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if w.has(p + "attn_qkv.weight"):
            self.qkv = QLinear(w.q(p + "attn_qkv.weight"), w.f32_opt(p + "attn_qkv.bias"))
        else:
            names = [p + f"attn_{x}" for x in "qkv"]
            weights = [w.q(n + ".weight") for n in names]
            biases = [w.f32_opt(n + ".bias") for n in names]
            fused = QLinear.fused(weights, biases)
            if fused is None:  # types differ: one matmul per projection, concatenated
                fused = _Concat([QLinear(wt, b) for wt, b in zip(weights, biases, strict=True)])
            self.qkv = fused
        self.o_proj = QLinear(w.q(p + "attn_output.weight"), w.f32_opt(p + "attn_output.bias"))
        self.attn_norm_w = w.f32(p + "attn_output_norm.weight")
        self.attn_norm_b = w.f32_opt(p + "attn_output_norm.bias")
        self.up = QLinear(w.q(p + "ffn_up.weight"), w.f32_opt(p + "ffn_up.bias"))
        self.down = QLinear(w.q(p + "ffn_down.weight"), w.f32_opt(p + "ffn_down.bias"))
        self.out_norm_w = w.f32(p + "layer_output_norm.weight")
        self.out_norm_b = w.f32_opt(p + "layer_output_norm.bias")
        self.activation = activation

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache | None):
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # (T, nh, hd)
        attn = encoder_attention(q, k, v, meta, kv_cache, scale=self.scale)
        h = self.o_proj(attn.reshape(T, -1))
        x = layer_norm(h + x, self.attn_norm_w, self.attn_norm_b, self.eps)
        h = self.down(self.activation(self.up(x)))
        return layer_norm(h + x, self.out_norm_w, self.out_norm_b, self.eps)


class _Concat(torch.nn.Module):
    """Several projections of one input, concatenated (when they cannot share a matmul)."""

    def __init__(self, parts: list[QLinear]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class BertModel(torch.nn.Module):
    """BERT: token + position + token-type embeddings, LayerNorm, post-norm encoder layers;
    an optional classification head (`cls` dense + tanh, `cls.output` projection)."""

    def __init__(self, weights: Weights) -> None:
        super().__init__()
        cfg = self.config = weights.config
        self.tok_embd = weights.q("token_embd.weight")
        self.pos_embd = weights.f32_opt("position_embd.weight")
        self.type_embd = weights.f32_opt("token_types.weight")
        self.embd_norm_w = weights.f32("token_embd_norm.weight")
        self.embd_norm_b = weights.f32_opt("token_embd_norm.bias")
        activation = _gelu(weights)
        self.layers = torch.nn.ModuleList(
            EncoderLayer(weights, il, activation) for il in range(cfg.num_layers)
        )
        self.cls = _linear_opt(weights, "cls")
        self.cls_out = _linear_opt(weights, "cls.output")

    @property
    def has_classifier(self) -> bool:
        return self.cls_out is not None or self.cls is not None

    @property
    def num_token_types(self) -> int:
        return 0 if self.type_embd is None else self.type_embd.shape[0]

    def prepare(
        self,
        device: torch.device | str,
        *,
        cpu_kernels: str = "fast",
        release_pages: Callable[[], None] | None = None,
    ) -> None:
        """Place the weights on `device` in the form its kernels read (as the decoders)."""
        device = torch.device(device)
        for module in self.modules():
            if isinstance(module, QLinear):
                module.prepare(device, cpu_kernels)
                if release_pages is not None:
                    release_pages()
            else:
                for name, value in list(vars(module).items()):
                    if isinstance(value, torch.Tensor):
                        setattr(module, name, value.to(device))
        self.tok_embd = self.tok_embd.to(device)

    def embed_tokens(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = embedding_lookup(self.tok_embd, input_ids, torch.float32)  # (T, D)
        if self.type_embd is not None:
            x = x + (
                self.type_embd[0] if token_type_ids is None else self.type_embd[token_type_ids]
            )
        if self.pos_embd is not None:
            x = x + self.pos_embd[positions]
        return layer_norm(x, self.embd_norm_w, self.embd_norm_b, self.config.norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) final hidden states. `kv_cache`: one scratch cache
        every layer reuses (needed on CUDA only)."""
        x = self.embed_tokens(input_ids, positions, token_type_ids)
        for layer in self.layers:
            x = layer(x, meta, kv_cache)
        return x

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, hidden) pooled states -> (B, n_labels) classifier outputs (llama.cpp's rank
        pooling head: dense + tanh where present, then the output projection)."""
        x = pooled
        if self.cls is not None:
            x = torch.tanh(self.cls(x))
        if self.cls_out is not None:
            x = self.cls_out(x)
        return x


def _linear_opt(w: Weights, name: str) -> QLinear | None:
    weight = w.q_opt(name + ".weight")
    return None if weight is None else QLinear(weight, w.f32_opt(name + ".bias"))


def _gelu(w: Weights) -> Callable[[torch.Tensor], torch.Tensor]:
    hidden_act = None if w.is_gguf else w.file.hf_config.get("hidden_act", "gelu")
    if hidden_act is None or hidden_act in _TANH_GELUS:  # GGUF: ggml_gelu is the tanh form
        return lambda x: F.gelu(x, approximate="tanh")
    if hidden_act != "gelu":
        from llamapy.errors import UnsupportedError

        raise UnsupportedError(f"BERT hidden_act {hidden_act!r} is not supported (gelu, gelu_new)")
    return F.gelu
