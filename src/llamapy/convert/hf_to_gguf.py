"""A Hugging Face safetensors folder as a GGUF model source, as llama.cpp's
convert_hf_to_gguf.py writes it for the architectures llamapy runs.

Tensor names come from `HFFolder` (gguf-py's `TensorNameMap`); on the way, as the
converter does:
- llama: the Q/K rows are permuted from HF's half-split rope layout to ggml's interleaved
  one (`permute`), and Llama 3 rope scaling becomes a `rope_freqs.weight` tensor;
- Gemma 3: norm weights are stored as `1 + w`; the embedding is cut to the tokenizer's size;
- 1-D tensors (norms, biases) are float32.
The hyperparameters go under llama.cpp's keys; the tokenizer under `tokenizer.*`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gguf import Keys, PoolingType

from llamapy.config import ENCODER_ARCHS, ModelConfig
from llamapy.convert.source import ModelSource, SourceTensor
from llamapy.convert.tokenizer_export import tokenizer_metadata
from llamapy.errors import UnsupportedError
from llamapy.formats.hf_folder import HFFolder
from llamapy.quant.presets import ModelShape
from llamapy.quant.types import QuantType

logger = logging.getLogger(__name__)

CONVERTIBLE_ARCHS = (
    "llama",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma3",
    "bert",
    "nomic-bert",
    "jina-bert-v2",
)
_POOLING = {
    "none": PoolingType.NONE,
    "mean": PoolingType.MEAN,
    "cls": PoolingType.CLS,
    "last": PoolingType.LAST,
    "rank": PoolingType.RANK,
}
_FLOAT_DTYPES = {
    QuantType.F32: torch.float32,
    QuantType.F16: torch.float16,
    QuantType.BF16: torch.bfloat16,
}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rope layout (each head: first halves, then second halves of the pairs) ->
    ggml's NORM layout (pairs adjacent), on the rows of a Q or K weight or bias."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 rope scaling (the converter's rope_freqs)."""
    rs = cfg.rope_scaling
    assert rs is not None and cfg.rope_theta is not None
    dim = cfg.rope_dim or cfg.head_dim
    factor = rs.factor
    low, high = rs.low_freq_factor or 1.0, rs.high_freq_factor or 4.0
    old_ctx = rs.original_context_length or 8192
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs:  # float32 arithmetic on each 0-d tensor, as the converter's values
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return torch.tensor(out, dtype=torch.float32)


# -- metadata ---------------------------------------------------------------------------------


def hparams_metadata(hf: HFFolder, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's `{arch}.*` keys of a folder's config (TextModel.set_gguf_parameters and
    the per-architecture additions)."""
    cfg, c, a = hf.config, hf.text_config, hf.arch
    md: dict[str, Any] = {
        Keys.General.ARCHITECTURE: a,
        Keys.General.TYPE: "model",
        Keys.General.NAME: hf.path.name,
        Keys.LLM.VOCAB_SIZE.format(arch=a): n_vocab,
        Keys.LLM.CONTEXT_LENGTH.format(arch=a): cfg.context_length,
        Keys.LLM.EMBEDDING_LENGTH.format(arch=a): cfg.hidden_size,
        Keys.LLM.BLOCK_COUNT.format(arch=a): cfg.num_layers,
        Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a): cfg.ffn_size,
        Keys.Attention.HEAD_COUNT.format(arch=a): cfg.num_heads,
        Keys.Attention.HEAD_COUNT_KV.format(arch=a): cfg.num_kv_heads,
    }
    if cfg.norm_type == "rms":
        md[Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a)] = cfg.norm_eps
    else:
        md[Keys.Attention.LAYERNORM_EPS.format(arch=a)] = cfg.norm_eps
    if c.get("head_dim") or a == "gemma3":
        md[Keys.Attention.KEY_LENGTH.format(arch=a)] = cfg.head_dim
        md[Keys.Attention.VALUE_LENGTH.format(arch=a)] = cfg.head_dim
    if a in ENCODER_ARCHS:
        md[Keys.Attention.CAUSAL.format(arch=a)] = False
        if cfg.rope_theta is not None:  # nomic-bert
            md[Keys.Rope.FREQ_BASE.format(arch=a)] = cfg.rope_theta
            if cfg.rope_dim not in (None, cfg.head_dim):
                md[Keys.Rope.DIMENSION_COUNT.format(arch=a)] = cfg.rope_dim
        if cfg.pooling is not None:
            md[Keys.LLM.POOLING_TYPE.format(arch=a)] = int(_POOLING[cfg.pooling])
        md[Keys.Tokenizer.TOKEN_TYPE_COUNT.format(arch=a)] = int(c.get("type_vocab_size", 2))
        return md
    md.update(_rope_metadata(cfg, c, a))
    if a == "gemma3":
        if cfg.final_logit_softcap:
            md[Keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=a)] = cfg.final_logit_softcap
        if cfg.sliding_window:
            md[Keys.Attention.SLIDING_WINDOW.format(arch=a)] = cfg.sliding_window
        if c.get("query_pre_attn_scalar") not in (None, cfg.head_dim):
            logger.warning(
                "llama.cpp scales Gemma 3 queries by head_dim, not by query_pre_attn_scalar=%s",
                c["query_pre_attn_scalar"],
            )
    elif a == "phi3":
        md[Keys.Attention.SLIDING_WINDOW.format(arch=a)] = c.get("sliding_window") or 0
    elif cfg.sliding_window:
        logger.warning("llama.cpp runs %s without its sliding window (%d)", a, cfg.sliding_window)
    return md


def _rope_metadata(cfg: ModelConfig, c: dict[str, Any], a: str) -> dict[str, Any]:
    md: dict[str, Any] = {
        Keys.Rope.FREQ_BASE.format(arch=a): cfg.rope_theta,
        Keys.Rope.DIMENSION_COUNT.format(arch=a): cfg.rope_dim or cfg.head_dim,
    }
    if cfg.rope_theta_swa is not None:
        md[Keys.Rope.FREQ_BASE_SWA.format(arch=a)] = cfg.rope_theta_swa
    rs = cfg.rope_scaling
    if a == "phi3":
        orig = c.get("original_max_position_embeddings") or cfg.context_length
        md[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)] = orig
    if rs is None or rs.type == "llama3":  # llama3: the rope_freqs tensor
        return md
    if rs.type == "linear":
        md[Keys.Rope.SCALING_TYPE.format(arch=a)] = "linear"
        md[Keys.Rope.SCALING_FACTOR.format(arch=a)] = rs.factor
    elif rs.type == "yarn":
        md[Keys.Rope.SCALING_TYPE.format(arch=a)] = "yarn"
        md[Keys.Rope.SCALING_FACTOR.format(arch=a)] = rs.factor
        if rs.original_context_length:
            md[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)] = rs.original_context_length
        for key, value in (
            (Keys.Rope.SCALING_YARN_BETA_FAST, rs.beta_fast),
            (Keys.Rope.SCALING_YARN_BETA_SLOW, rs.beta_slow),
            (Keys.Rope.SCALING_YARN_ATTN_FACTOR, rs.attn_factor),
        ):
            if value is not None:
                md[key.format(arch=a)] = value
    else:
        raise UnsupportedError(f"converting rope scaling {rs.type!r} is not supported")
    return md


# -- tensors ----------------------------------------------------------------------------------


def _loader(
    hf: HFFolder, name: str, fix: Callable[[torch.Tensor], torch.Tensor] | None
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        q = hf.tensor(name)
        t = q.data.view(_FLOAT_DTYPES[q.qtype]).reshape(q.shape)
        if len(q.shape) == 1:
            t = t.to(torch.float32)
        return fix(t) if fix is not None else t

    return load


def _fix(hf: HFFolder, name: str, n_tokens: int | None) -> Callable | None:
    """The layout change llama.cpp's converter makes to tensor `name`, if any."""
    cfg, arch = hf.config, hf.arch
    fixes: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
        n_head = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
        fixes.append(lambda t: permute(t, n_head))
    if arch == "gemma3" and name.endswith("norm.weight"):
        fixes.append(lambda t: t.to(torch.float32) + 1.0)
    if arch == "gemma3" and name == "token_embd.weight" and n_tokens is not None:
        fixes.append(lambda t: t[:n_tokens])
    if not fixes:
        return None

    def apply(t: torch.Tensor) -> torch.Tensor:
        for f in fixes:
            t = f(t)
        return t.contiguous()

    return apply


def _tensors(hf: HFFolder, n_tokens: int | None) -> list[SourceTensor]:
    out = []
    skipped = set(hf.unmapped)
    for name, info in hf.tensor_infos.items():
        if info.hf_name in skipped:
            continue
        if info.qtype not in _FLOAT_DTYPES:
            raise UnsupportedError(f"tensor {info.hf_name!r} of type {info.qtype.name}")
        shape = tuple(info.shape)
        if hf.arch == "gemma3" and name == "token_embd.weight" and n_tokens is not None:
            shape = (min(n_tokens, shape[0]), *shape[1:])
        qtype = QuantType.F32 if len(shape) == 1 else info.qtype
        out.append(SourceTensor(name, shape, qtype, _loader(hf, name, _fix(hf, name, n_tokens))))
    cfg = hf.config
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        factors = llama3_rope_factors(cfg)
        out.append(
            SourceTensor("rope_freqs.weight", tuple(factors.shape), QuantType.F32, lambda: factors)
        )
    return out


def hf_source(folder: str | Path, *, with_vocab: bool = True) -> ModelSource:
    """A HF folder as llama.cpp's converter would write it (tensors converted as read).

    Raises:
        UnsupportedError: an architecture, dtype, rope scaling or tokenizer llamapy does not
            convert.
        ModelFormatError: a malformed folder.
    """
    hf = HFFolder(folder)
    if hf.arch not in CONVERTIBLE_ARCHS:
        raise UnsupportedError(
            f"converting architecture {hf.arch!r} is not supported "
            f"(supported: {', '.join(CONVERTIBLE_ARCHS)})"
        )
    if hf.unmapped:
        logger.warning(
            "skipping %d tensor(s) llama.cpp has no name for: %s",
            len(hf.unmapped),
            ", ".join(hf.unmapped[:5]),
        )
    embd = hf.tensor_infos.get("token_embd.weight")
    rows = embd.shape[0] if embd is not None else hf.config.vocab_size
    tok_md: dict[str, Any] = {Keys.Tokenizer.MODEL: "none"}
    n_tokens = None
    if with_vocab:
        # Gemma 3 keeps the tokenizer's size (embedding cut); others pad tokens to the rows
        tok_md = tokenizer_metadata(hf.path, 0 if hf.arch == "gemma3" else rows)
        n_tokens = len(tok_md[Keys.Tokenizer.LIST])
    n_vocab = min(rows, n_tokens) if hf.arch == "gemma3" and n_tokens else rows
    metadata = hparams_metadata(hf, n_vocab)
    metadata.update(tok_md)
    cfg = hf.config
    return ModelSource(
        path=hf.path,
        arch=hf.arch,
        metadata=metadata,
        tensors=_tensors(hf, n_tokens),
        model_shape=ModelShape(hf.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads),
        close=hf.close,
    )
