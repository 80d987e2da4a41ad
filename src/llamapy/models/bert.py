"""BERT-family encoders (llama.cpp: llama_model_bert::graph), bidirectional, over a flattened
batch: `bert`, `nomic-bert` and `jina-bert-v2`.

The forward pass takes the same flattened batch as the decoders: `input_ids (T,)`,
`positions (T,)` (0-based within each sequence) and the `AttentionMetadata` of the batch's
sequences. No padding: every linear layer sees exactly the T real tokens; attention is
computed per sequence (torch SDPA on the CPU; on CUDA the Triton paged-attention kernels of
generation with `causal=False`, reading K/V from a scratch cache the caller provides).

The three architectures share the post-norm block and differ where llama.cpp's graph does:
- bert: learned absolute positions, FFN down(gelu(up(x)));
- nomic-bert: no position embeddings, NEOX rotary on Q and K, SwiGLU FFN
  down(silu(gate(x)) * up(x)) (nomic's fc12 is the gate, fc11 the value), no biases;
- jina-bert-v2: ALiBi instead of positions (ggml_soft_max_ext's slopes with max_bias 8 times
  -|i - j|; on CUDA too this runs as SDPA with that bias, the paged kernels have no ALiBi),
  GEGLU FFN (`ffn_up` holding [gate; value] rows, or a separate `ffn_gate`), optional
  LayerNorms of Q and K over the whole projection, and (jina-v2-code) a second attention
  norm `attn_norm_2` applied to `attn_out + input` once more.

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

from llamapy.errors import ModelFormatError, UnsupportedError
from llamapy.layers.attention import AttentionMetadata, paged_attention, write_kv
from llamapy.layers.linear import QLinear, embedding_lookup
from llamapy.layers.norm import layer_norm
from llamapy.layers.rotary import RotaryEmbedding
from llamapy.models.weights import Weights
from llamapy.quant.qtensor import QTensor

KVCache = tuple[torch.Tensor, torch.Tensor]
Activation = Callable[[torch.Tensor], torch.Tensor]
CosSin = tuple[torch.Tensor, torch.Tensor]

# HF `hidden_act` values whose GELU is the tanh approximation.
_TANH_GELUS = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh"})
# llama_model_jina_bert_v2::load_arch_hparams: f_max_alibi_bias = 8.0
JINA_MAX_ALIBI_BIAS = 8.0
# The largest ALiBi bias block built at once (float32 elements: 64 MiB), queries chunked to fit.
_ALIBI_BIAS_ELEMENTS = 1 << 24


def alibi_slopes(num_heads: int, max_bias: float = JINA_MAX_ALIBI_BIAS) -> torch.Tensor:
    """Per-head ALiBi slopes (num_heads,) float32, as ggml_compute_forward_soft_max_f32:
    m0 = 2^(-max_bias / n), m1 = 2^(-max_bias / 2 / n) for n the largest power of two <=
    num_heads; head h < n gets m0^(h + 1), the others m1^(2 (h - n) + 1) [arXiv:2108.12409]."""
    n = 1 << int(math.floor(math.log2(num_heads)))
    m0 = torch.tensor(2.0, dtype=torch.float32) ** (-max_bias / n)
    m1 = torch.tensor(2.0, dtype=torch.float32) ** (-max_bias / 2.0 / n)
    h = torch.arange(num_heads, dtype=torch.float32)
    return torch.where(h < n, m0 ** (h + 1), m1 ** (2 * (h - n) + 1))


def alibi_bias(slopes: torch.Tensor, length: int, rows: range | None = None) -> torch.Tensor:
    """(1, nh, R, L) additive attention bias of queries `rows` (default all L) of one
    sequence: -slope * |i - j| (llama.cpp's non-causal kq_mask holds -|p0 - p1|, and
    soft_max_ext scales it by the head's slope)."""
    rows = rows if rows is not None else range(length)
    q_pos = torch.arange(rows.start, rows.stop, device=slopes.device, dtype=torch.float32)
    k_pos = torch.arange(length, device=slopes.device, dtype=torch.float32)
    dist = -(k_pos[None, :] - q_pos[:, None]).abs()  # (R, L)
    return (slopes[:, None, None] * dist)[None]


def encoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
    *,
    scale: float,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional attention within each sequence: q, k, v (T, n_heads, d) -> (T, n_heads,
    d). On CUDA without ALiBi, K/V go to the scratch cache and the generation kernels read
    them; with ALiBi slopes (n_heads,), every device runs SDPA per sequence with the bias."""
    if q.is_cuda and alibi is None:
        if kv_cache is None:
            raise ValueError("encoder attention on CUDA needs a scratch KV cache")
        write_kv(*kv_cache, k, v, meta.slot_mapping)
        return paged_attention(q, *kv_cache, meta, scale=scale, causal=False)
    out = torch.empty_like(q)
    starts = meta.query_start_loc_host
    for b in range(meta.num_seqs):
        s, e = starts[b], starts[b + 1]
        keys = k[None, s:e].transpose(1, 2)  # (1, nh, L, d)
        values = v[None, s:e].transpose(1, 2)
        # ALiBi: the (nh, rows, L) bias in query chunks of bounded size
        step = (e - s) if alibi is None else max(1, _ALIBI_BIAS_ELEMENTS // (q.shape[1] * (e - s)))
        for r in range(s, e, step):
            rows = range(r - s, min(r + step, e) - s)
            bias = None if alibi is None else alibi_bias(alibi, e - s, rows).to(q.dtype)
            # 4-D inputs: torch's CPU flash-attention kernel (3-D ones take the math path)
            out[r : r + len(rows)] = F.scaled_dot_product_attention(
                q[None, r : r + len(rows)].transpose(1, 2),  # (1, nh, R, d)
                keys,
                values,
                attn_mask=bias,
                scale=scale,
            )[0].transpose(0, 1)
    return out


class FeedForward(torch.nn.Module):
    """The three FFNs of llama.cpp's BERT graph:
    - bert: down(act(up(x))) (LLM_FFN_SEQ);
    - nomic-bert: down(act(gate(x)) * up(x)) (LLM_FFN_PAR; gate and up share one matmul
      when their types match);
    - jina-bert-v2: the same with a separate `ffn_gate`, or down(act(g) * u) with [g; u] =
      up(x) when `ffn_up` holds 2 * n_ff rows (ggml_geglu activates the first half), or
      down(act(up(x))) when it holds n_ff rows and there is no gate."""

    def __init__(self, w: Weights, il: int, activation: Activation) -> None:
        super().__init__()
        cfg, p = w.config, f"blk.{il}."
        n_ff, d = cfg.ffn_size, cfg.hidden_size
        self.n_ff, self.activation = n_ff, activation
        up = w.q(p + "ffn_up.weight")
        up_b = w.f32_opt(p + "ffn_up.bias")
        gate = None
        if cfg.arch == "nomic-bert":
            gate = w.q(p + "ffn_gate.weight")
        elif cfg.arch == "jina-bert-v2":
            gate = w.q_opt(p + "ffn_gate.weight")
        self.fused_gate = cfg.arch == "jina-bert-v2" and gate is None and up.shape[0] == 2 * n_ff
        _check_shape(w, p + "ffn_up.weight", up, (2 * n_ff if self.fused_gate else n_ff, d))
        self.gate_up = self.gate = None
        if gate is not None:
            _check_shape(w, p + "ffn_gate.weight", gate, (n_ff, d))
            self.gate_up = QLinear.fused([gate, up], [None, up_b])
            if self.gate_up is None:  # types differ: two matmuls
                self.gate = QLinear(gate)
        self.up = None if self.gate_up is not None else QLinear(up, up_b)
        down = w.q(p + "ffn_down.weight")
        _check_shape(w, p + "ffn_down.weight", down, (d, n_ff))
        down_b = p + "ffn_down.bias"
        self.down = QLinear(
            down, w.f32(down_b) if cfg.arch == "jina-bert-v2" else w.f32_opt(down_b)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            g, u = self.gate_up(x).split(self.n_ff, dim=-1)  # (T, n_ff) each
            h = self.activation(g) * u
        elif self.gate is not None:
            h = self.activation(self.gate(x)) * self.up(x)
        elif self.fused_gate:
            g, u = self.up(x).split(self.n_ff, dim=-1)  # (T, n_ff) each
            h = self.activation(g) * u
        else:
            h = self.activation(self.up(x))
        return self.down(h)


class EncoderLayer(torch.nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, w: Weights, il: int, ffn: FeedForward) -> None:
        super().__init__()
        cfg = w.config
        p = f"blk.{il}."
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        self.scale = 1.0 / math.sqrt(self.head_dim)
        strict = cfg.arch != "bert"  # the biases llama.cpp requires of nomic / jina
        width = cfg.num_heads * cfg.head_dim
        if w.has(p + "attn_qkv.weight"):
            weight = w.q(p + "attn_qkv.weight")
            _check_shape(w, p + "attn_qkv.weight", weight, (3 * width, cfg.hidden_size))
            self.qkv = QLinear(weight, _qkv_bias(w, p))
        else:
            names = [p + f"attn_{x}" for x in "qkv"]
            weights = [w.q(n + ".weight") for n in names]
            for n, wt in zip(names, weights, strict=True):
                _check_shape(w, n + ".weight", wt, (width, cfg.hidden_size))
            biases = [w.f32_opt(n + ".bias") for n in names]
            fused = QLinear.fused(weights, biases)
            if fused is None:  # types differ: one matmul per projection, concatenated
                fused = _Concat([QLinear(wt, b) for wt, b in zip(weights, biases, strict=True)])
            self.qkv = fused
        self.q_norm = _norm_opt(w, p + "attn_q_norm")
        self.k_norm = _norm_opt(w, p + "attn_k_norm")
        out_b = p + "attn_output.bias"  # required of jina-bert-v2 only
        self.o_proj = QLinear(
            w.q(p + "attn_output.weight"),
            w.f32(out_b) if cfg.arch == "jina-bert-v2" else w.f32_opt(out_b),
        )
        self.attn_norm = _norm(w, p + "attn_output_norm", strict)
        self.attn_norm_2 = _norm_opt(w, p + "attn_norm_2")
        self.ffn = ffn
        self.out_norm = _norm(w, p + "layer_output_norm", strict)

    def forward(
        self,
        x: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache | None,
        rope: tuple[RotaryEmbedding, CosSin] | None = None,
        alibi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, -1).unbind(1)  # (T, nh * hd) each
        if self.q_norm is not None:
            q = layer_norm(q, *self.q_norm, self.eps)
        if self.k_norm is not None:
            k = layer_norm(k, *self.k_norm, self.eps)
        q, k, v = (t.reshape(T, self.num_heads, self.head_dim) for t in (q, k, v))
        if rope is not None:
            rotary, (cos, sin) = rope
            q, k = rotary.apply_pair(q, k, cos, sin)
        attn = encoder_attention(q, k, v, meta, kv_cache, scale=self.scale, alibi=alibi)
        h = self.o_proj(attn.reshape(T, -1))
        h = layer_norm(h + x, *self.attn_norm, self.eps)
        if self.attn_norm_2 is not None:  # jina-v2-code: the layer input is added again
            h = layer_norm(h + x, *self.attn_norm_2, self.eps)
        return layer_norm(self.ffn(h) + h, *self.out_norm, self.eps)


class _Concat(torch.nn.Module):
    """Several projections of one input, concatenated (when they cannot share a matmul)."""

    def __init__(self, parts: list[QLinear]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class BertModel(torch.nn.Module):
    """A BERT-family encoder: token (+ position) + token-type embeddings, LayerNorm,
    post-norm encoder layers; an optional classification head (`cls` dense + tanh,
    `cls.output` projection)."""

    release_embedding_pages: Callable[[], None] | None = None  # set by `prepare`

    def __init__(self, weights: Weights) -> None:
        super().__init__()
        cfg = self.config = weights.config
        arch = cfg.arch
        self.tok_embd = weights.q("token_embd.weight")
        _check_shape(weights, "token_embd.weight", self.tok_embd, (None, cfg.hidden_size))
        self.pos_embd = weights.f32_opt("position_embd.weight") if arch == "bert" else None
        self.type_embd = (
            weights.f32("token_types.weight")
            if arch == "jina-bert-v2"
            else weights.f32_opt("token_types.weight")
        )
        self.embd_norm_w, self.embd_norm_b = _norm(weights, "token_embd_norm", arch != "bert")
        self.rotary = _rotary(weights) if arch == "nomic-bert" else None
        self.alibi = alibi_slopes(cfg.num_heads) if arch == "jina-bert-v2" else None
        activation = _activation(weights)
        self.layers = torch.nn.ModuleList(
            EncoderLayer(weights, il, FeedForward(weights, il, activation))
            for il in range(cfg.num_layers)
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
        if release_pages is not None:  # the pages building read (small tensors it copied)
            release_pages()
        for module in self.modules():
            if isinstance(module, QLinear):
                module.prepare(device, cpu_kernels)
                if release_pages is not None:
                    release_pages()
            else:
                for name, value in list(vars(module).items()):
                    if isinstance(value, torch.Tensor):
                        setattr(module, name, value.to(device))
                    elif isinstance(value, tuple) and all(
                        isinstance(t, torch.Tensor | None) for t in value
                    ):  # (weight, bias) norms
                        setattr(module, name, tuple(_to(t, device) for t in value))
        self.tok_embd = self.tok_embd.to(device)
        # the table stays in the mapped file on the CPU: its looked-up pages go after each
        # lookup (as the decoders' `prepare`)
        self.release_embedding_pages = release_pages if device.type == "cpu" else None
        if self.rotary is not None:
            self.rotary.inv_freq = self.rotary.inv_freq.to(device)

    def embed_tokens(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = embedding_lookup(self.tok_embd, input_ids, torch.float32)  # (T, D)
        if self.release_embedding_pages is not None:
            self.release_embedding_pages()
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
        every layer reuses (needed on CUDA only, and not for ALiBi models)."""
        x = self.embed_tokens(input_ids, positions, token_type_ids)
        rope = None
        if self.rotary is not None:
            rope = (self.rotary, self.rotary.cos_sin(positions))
        for layer in self.layers:
            x = layer(x, meta, kv_cache, rope, self.alibi)
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


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _check_shape(w: Weights, name: str, t: QTensor, expected: tuple[int | None, ...]) -> None:
    """ModelFormatError unless `t` has `expected` shape (torch order; None: any size)."""
    ok = len(t.shape) == len(expected) and all(
        e is None or s == e for s, e in zip(t.shape, expected, strict=True)
    )
    if not ok:
        want = "x".join("?" if e is None else str(e) for e in expected)
        raise ModelFormatError(
            f"{w.file.path.name}: tensor {name!r} has shape {tuple(t.shape)}, expected {want} "
            f"for this {w.config.arch} configuration"
        )


def _norm(w: Weights, name: str, needs_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = w.f32(name + ".weight")
    bias = w.f32(name + ".bias") if needs_bias else w.f32_opt(name + ".bias")
    for t, part in ((weight, "weight"), (bias, "bias")):
        if t is not None and tuple(t.shape) != (w.config.hidden_size,):
            raise ModelFormatError(
                f"{w.file.path.name}: tensor '{name}.{part}' has shape {tuple(t.shape)}, "
                f"expected ({w.config.hidden_size},)"
            )
    return weight, bias


def _norm_opt(w: Weights, name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if not w.has(name + ".weight"):
        return None
    return _norm(w, name, needs_bias=False)


def _qkv_bias(w: Weights, p: str) -> torch.Tensor | None:
    """A fused QKV's bias: `attn_qkv.bias`, or separate Q/K/V biases beside the fused weight
    (llama.cpp's create_tensor_qkv accepts both)."""
    fused = w.f32_opt(p + "attn_qkv.bias")
    if fused is not None or not w.has(p + "attn_q.bias"):
        return fused
    return torch.cat([w.f32(p + f"attn_{x}.bias") for x in "qkv"])


def _linear_opt(w: Weights, name: str) -> QLinear | None:
    weight = w.q_opt(name + ".weight")
    return None if weight is None else QLinear(weight, w.f32_opt(name + ".bias"))


def _rotary(w: Weights) -> RotaryEmbedding:
    """nomic-bert's rope: NEOX layout (llama_model_rope_type), in GGUF as in HF folders."""
    cfg = w.config
    if cfg.rope_theta is None:
        raise ModelFormatError(f"{w.file.path.name}: nomic-bert needs a rope frequency base")
    return RotaryEmbedding(
        cfg.rope_dim or cfg.head_dim, cfg.rope_theta, interleaved=False, scaling=cfg.rope_scaling
    )


def _activation(w: Weights) -> Activation:
    if w.config.arch == "nomic-bert":  # SwiGLU [arXiv:2002.05202]
        act = None if w.is_gguf else w.file.hf_config.get("hidden_act", "silu")
        if act not in (None, "silu", "swish"):
            raise UnsupportedError(f"nomic-bert hidden_act {act!r} is not supported (silu)")
        return F.silu
    return _gelu(w)


def _gelu(w: Weights) -> Activation:
    hidden_act = None if w.is_gguf else w.file.hf_config.get("hidden_act", "gelu")
    if hidden_act is None or hidden_act in _TANH_GELUS:  # GGUF: ggml_gelu is the tanh form
        return lambda x: F.gelu(x, approximate="tanh")
    if hidden_act != "gelu":
        raise UnsupportedError(f"BERT hidden_act {hidden_act!r} is not supported (gelu, gelu_new)")
    return F.gelu
