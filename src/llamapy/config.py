"""ModelConfig: the hyperparameters of a model, from GGUF metadata or a Hugging Face config.

Field names follow the field (vLLM / HF) where they exist; architecture names are gguf's
(`llama`, `qwen2`, `gemma3`, ...), because GGUF is the canonical form inside llamapy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguf import Keys

from llamapy.errors import ModelFormatError, UnsupportedError

# Architectures whose config llamapy understands, with per-architecture defaults that
# llama.cpp hard-codes in llama_model::load_hparams rather than reading from the file.
SUPPORTED_ARCHS = (
    "llama", "qwen2", "qwen3", "gemma3", "phi3", "bert", "nomic-bert", "jina-bert-v2",
)  # fmt: skip
# BERT-family encoders: LayerNorm, bidirectional; nomic-bert alone has rotary positions.
ENCODER_ARCHS = ("bert", "nomic-bert", "jina-bert-v2")
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "llama3", "longrope")
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")
# gguf's LLAMA_POOLING_TYPE numbering (llama.h): -1 unspecified, 0 none, 1 mean, 2 cls, ...
_GGUF_POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
# Gemma 3 interleaves 5 sliding-window layers with 1 global one (llama.cpp: swa pattern 6).
_GEMMA3_SWA_PERIOD = 6
_GEMMA3_ROPE_THETA_SWA = 10_000.0
_GEMMA3_27B_LAYERS = 62


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary embedding scaling as GGUF (`rope.scaling.*`) or HF (`rope_scaling`) give it."""

    type: str
    factor: float = 1.0
    original_context_length: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attn_factor: float | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise UnsupportedError(
                f"rope scaling type {self.type!r} is not supported "
                f"(known: {', '.join(ROPE_SCALING_TYPES)})"
            )
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ModelFormatError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    arch: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    ffn_size: int
    norm_eps: float
    name: str | None = None
    v_head_dim: int | None = None
    norm_type: str = "rms"  # "rms" or "layer"
    rope_theta: float | None = 10_000.0
    rope_dim: int | None = None
    rope_scaling: RopeScaling | None = None
    # Sliding-window attention: `sliding_layers[i]` is True where layer i uses the window.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_theta_swa: float | None = None
    attn_logit_softcap: float | None = None
    attention_scale: float | None = None  # query scale; None: 1/sqrt(head_dim)
    final_logit_softcap: float | None = None
    causal: bool = True
    pooling: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedError(
                f"architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "context_length",
        ):
            _check_positive(name, getattr(self, name))
        if self.ffn_size < 0:
            raise ModelFormatError(f"ffn_size must be >= 0, got {self.ffn_size}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if not (0 < self.norm_eps < 1):
            raise ModelFormatError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if self.norm_type not in ("rms", "layer"):
            raise ModelFormatError(f"norm_type must be 'rms' or 'layer', got {self.norm_type!r}")
        if self.rope_dim is not None and not (0 < self.rope_dim <= self.head_dim):
            raise ModelFormatError(
                f"rope_dim must be in 1..head_dim ({self.head_dim}), got {self.rope_dim}"
            )
        if self.sliding_window is not None:
            _check_positive("sliding_window", self.sliding_window)
            if len(self.sliding_layers) != self.num_layers:
                raise ModelFormatError(
                    f"sliding_layers has {len(self.sliding_layers)} entries for "
                    f"{self.num_layers} layers"
                )
        if self.pooling is not None and self.pooling not in POOLING_TYPES:
            raise ModelFormatError(
                f"pooling must be one of {', '.join(POOLING_TYPES)}, got {self.pooling!r}"
            )


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelFormatError(f"{name} must be a positive integer, got {value!r}")


# -- from GGUF -------------------------------------------------------------------------------


class _GGUFKeys:
    """Typed access to `{arch}.*` metadata with errors that name the key."""

    def __init__(self, metadata: Mapping[str, Any], arch: str) -> None:
        self.metadata = metadata
        self.arch = arch

    def get(self, key_template: str, default: Any = None) -> Any:
        return self.metadata.get(key_template.format(arch=self.arch), default)

    def int(self, key_template: str, default: int | None = None) -> int:
        key = key_template.format(arch=self.arch)
        value = self.metadata.get(key, default)
        if value is None:
            raise ModelFormatError(f"GGUF metadata lacks {key!r}")
        if hasattr(value, "tolist"):  # per-layer arrays: accept them when uniform
            values = set(value.tolist())
            if len(values) != 1:
                raise UnsupportedError(f"{key!r} varies per layer ({sorted(values)[:4]}...)")
            value = values.pop()
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelFormatError(f"GGUF metadata {key!r} must be an integer, got {value!r}")
        return value

    def float(self, key_template: str, default: float | None = None) -> float | None:
        value = self.get(key_template, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            key = key_template.format(arch=self.arch)
            raise ModelFormatError(f"GGUF metadata {key!r} must be a number, got {value!r}")
        return float(value)


def config_from_gguf(metadata: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (as `GGUFFile.metadata`) and tensor names."""
    arch = metadata.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise ModelFormatError("GGUF metadata lacks general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    k = _GGUFKeys(metadata, arch)
    hidden = k.int(Keys.LLM.EMBEDDING_LENGTH)
    num_heads = k.int(Keys.Attention.HEAD_COUNT)
    num_layers = k.int(Keys.LLM.BLOCK_COUNT)
    head_dim = k.int(Keys.Attention.KEY_LENGTH, hidden // num_heads if num_heads else None)
    tokens = metadata.get(Keys.Tokenizer.LIST)
    vocab = k.get(Keys.LLM.VOCAB_SIZE) or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ModelFormatError("GGUF metadata gives no vocabulary size and no token list")
    is_bert = arch in ENCODER_ARCHS
    no_rope = arch in ("bert", "jina-bert-v2")
    sliding_window = k.get(Keys.Attention.SLIDING_WINDOW) or None  # 0: no SWA (Phi-3)
    pooling = k.get(Keys.LLM.POOLING_TYPE)
    return ModelConfig(
        arch=arch,
        name=metadata.get(Keys.General.NAME),
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=k.int(Keys.Attention.HEAD_COUNT_KV, num_heads),
        head_dim=head_dim,
        v_head_dim=k.int(Keys.Attention.VALUE_LENGTH, head_dim),
        vocab_size=int(vocab),
        context_length=k.int(Keys.LLM.CONTEXT_LENGTH),
        ffn_size=k.int(Keys.LLM.FEED_FORWARD_LENGTH, 0),
        norm_eps=k.float(
            Keys.Attention.LAYERNORM_EPS if is_bert else Keys.Attention.LAYERNORM_RMS_EPS,
            1e-12 if is_bert else 1e-5,
        ),
        norm_type="layer" if is_bert else "rms",
        rope_theta=None if no_rope else k.float(Keys.Rope.FREQ_BASE, 10_000.0),
        rope_dim=None if no_rope else k.get(Keys.Rope.DIMENSION_COUNT),
        rope_scaling=_gguf_rope_scaling(k),
        sliding_window=sliding_window,
        sliding_layers=_gguf_sliding_layers(k, num_layers) if sliding_window else (),
        rope_theta_swa=k.float(
            Keys.Rope.FREQ_BASE_SWA, _GEMMA3_ROPE_THETA_SWA if arch == "gemma3" else None
        ),
        attn_logit_softcap=k.float(Keys.LLM.ATTN_LOGIT_SOFTCAPPING),
        attention_scale=_gguf_gemma3_scale(arch, hidden, num_heads, num_layers),
        final_logit_softcap=k.float(Keys.LLM.FINAL_LOGIT_SOFTCAPPING),
        causal=bool(k.get(Keys.Attention.CAUSAL, not is_bert)),
        pooling=_GGUF_POOLING.get(pooling) if pooling is not None else None,
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def _gguf_gemma3_scale(arch: str, hidden: int, num_heads: int, num_layers: int) -> float | None:
    """Gemma 3 27B (62 layers) scales queries by (hidden / heads)^-0.5, not head_dim^-0.5;
    GGUF does not store it (as llama.cpp's llama_model_gemma3 load_hparams)."""
    if arch == "gemma3" and num_layers == _GEMMA3_27B_LAYERS:
        return (hidden // num_heads) ** -0.5
    return None


def _gguf_rope_scaling(k: _GGUFKeys) -> RopeScaling | None:
    kind = k.get(Keys.Rope.SCALING_TYPE)
    factor = k.float(Keys.Rope.SCALING_FACTOR)
    if kind is None and factor is None:
        return None
    if kind in (None, "none") and factor in (None, 0.0, 1.0):
        return None
    return RopeScaling(
        type=kind or "linear",
        factor=factor or 1.0,
        original_context_length=k.get(Keys.Rope.SCALING_ORIG_CTX_LEN),
        beta_fast=k.float(Keys.Rope.SCALING_YARN_BETA_FAST),
        beta_slow=k.float(Keys.Rope.SCALING_YARN_BETA_SLOW),
        attn_factor=k.float(Keys.Rope.SCALING_ATTN_FACTOR),
    )


def _gguf_sliding_layers(k: _GGUFKeys, num_layers: int) -> tuple[bool, ...]:
    pattern = k.get(Keys.Attention.SLIDING_WINDOW_PATTERN)
    if pattern is not None and hasattr(pattern, "tolist"):  # per-layer bools
        layers = tuple(bool(x) for x in pattern.tolist())
        if len(layers) != num_layers:
            raise ModelFormatError(
                f"sliding_window_pattern has {len(layers)} entries for {num_layers} layers"
            )
        return layers
    period = (
        int(pattern) if pattern is not None else (_GEMMA3_SWA_PERIOD if k.arch == "gemma3" else 0)
    )
    if period <= 0:  # every layer uses the window (Mistral-style SWA)
        return (True,) * num_layers
    # as llama_hparams::set_swa_pattern: the last layer of each period is global
    return tuple((il % period) < period - 1 for il in range(num_layers))
