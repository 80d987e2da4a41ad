"""Hugging Face model folders: `config.json` + `*.safetensors` (+ tokenizer files).

Tensors are opened lazily through `safetensors.safe_open` (memory-mapped) and renamed to the
canonical GGUF names with gguf-py's `TensorNameMap`, so every later layer sees one naming.
Layout differences that llama.cpp's converter bakes into GGUF (the Q/K row permutation of
llama-style rope, Gemma's `1 + w` norms) are not applied here: the reader gives the tensors
as stored; the model loader owns those conversions.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from safetensors import SafetensorError, safe_open

from llamapy.config import ENCODER_ARCHS, ModelConfig, RopeScaling
from llamapy.errors import ModelFormatError, UnsupportedError
from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType

# HF `architectures[0]` / `model_type` -> gguf architecture name.
_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForSequenceClassification": "bert",
    "NomicBertModel": "nomic-bert",
    "JinaBertModel": "jina-bert-v2",
    "JinaBertForMaskedLM": "jina-bert-v2",
}
_HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "bert": "bert",
    "nomic_bert": "nomic-bert",
}
_GGUF_ARCH_ENUM = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# Buffers that HF checkpoints carry but that are not weights (llama.cpp's converter skips them).
_SKIPPED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")
_TORCH_TO_QTYPE = {
    torch.float32: QuantType.F32,
    torch.float16: QuantType.F16,
    torch.bfloat16: QuantType.BF16,
    torch.float64: QuantType.F64,
    torch.int8: QuantType.I8,
    torch.int16: QuantType.I16,
    torch.int32: QuantType.I32,
    torch.int64: QuantType.I64,
}
_ST_DTYPES = {
    "F32": QuantType.F32,
    "F16": QuantType.F16,
    "BF16": QuantType.BF16,
    "F64": QuantType.F64,
    "I8": QuantType.I8,
    "I16": QuantType.I16,
    "I32": QuantType.I32,
    "I64": QuantType.I64,
}


@dataclass(frozen=True, slots=True)
class HFTensorInfo:
    name: str  # canonical GGUF name (or the HF name when it has no GGUF counterpart)
    hf_name: str
    shape: tuple[int, ...]
    qtype: QuantType
    nbytes: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path} must hold a JSON object")
    return value


def hf_arch(config: dict[str, Any]) -> str:
    """The gguf architecture name of a HF `config.json`."""
    for name in config.get("architectures") or []:
        if name in _HF_ARCHS:
            return _HF_ARCHS[name]
    model_type = config.get("model_type")
    if model_type in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[model_type]
    named = (config.get("architectures") or [model_type])[0]
    raise UnsupportedError(
        f"Hugging Face architecture {named!r} is not supported "
        f"(supported: {', '.join(sorted(_HF_ARCHS))})"
    )


class HFFolder:
    """A Hugging Face model folder opened for reading."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelFormatError(
                f"{self.path} is not a Hugging Face model folder: no config.json"
            )
        self.hf_config = read_json(config_path)
        # Multimodal Gemma 3 keeps the language model's settings in text_config.
        text_config = self.hf_config.get("text_config")
        self.text_config = text_config if isinstance(text_config, dict) else self.hf_config
        self.arch = hf_arch(self.hf_config)
        if self.arch == "nomic-bert":
            self.text_config = nomic_text_config(self.hf_config)
        self.tokenizer_config = self._optional_json("tokenizer_config.json")
        self._handles: dict[Path, Any] = {}
        self.tensor_infos, self.unmapped = self._index_tensors()
        self.config = config_from_hf(self.text_config, self.arch, self)

    def _optional_json(self, name: str) -> dict[str, Any]:
        p = self.path / name
        return read_json(p) if p.is_file() else {}

    @property
    def file_size(self) -> int:
        return sum(p.stat().st_size for p in self.safetensors_files)

    @property
    def safetensors_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFormatError(f"{index} has no weight_map")
            files = sorted({self.path / str(f) for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelFormatError(f"{index} names missing shard(s): {', '.join(missing)}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{self.path} has no *.safetensors weights")
        return files

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelFormatError(f"cannot read {file}: {e}") from None
            self._handles[file] = handle
        return handle

    def _index_tensors(self) -> tuple[dict[str, HFTensorInfo], list[str]]:
        num_layers = int(self.text_config.get("num_hidden_layers") or 0)
        name_map = gguf.TensorNameMap(_GGUF_ARCH_ENUM[self.arch], num_layers)
        infos: dict[str, HFTensorInfo] = {}
        unmapped: list[str] = []
        for file in self.safetensors_files:
            handle = self._open(file)
            for hf_name in handle.keys():
                if hf_name.endswith(_SKIPPED_SUFFIXES):
                    continue
                sl = handle.get_slice(hf_name)
                shape = tuple(int(d) for d in sl.get_shape()) or (1,)
                qtype = _ST_DTYPES.get(sl.get_dtype())
                if qtype is None:
                    raise UnsupportedError(
                        f"{file.name}: tensor {hf_name!r} has unsupported dtype {sl.get_dtype()}"
                    )
                if self.arch in ("bert", "jina-bert-v2"):
                    name = _bert_name(name_map, hf_name, self.hf_config)
                elif self.arch == "nomic-bert":
                    name = _nomic_name(name_map, hf_name)
                else:
                    name = _gguf_name(name_map, hf_name)
                if name is None:
                    unmapped.append(hf_name)
                    name = hf_name
                if name in infos:
                    raise ModelFormatError(f"two tensors map to {name!r} ({hf_name!r})")
                nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
                for d in shape:
                    nbytes *= d
                infos[name] = HFTensorInfo(name, hf_name, shape, qtype, nbytes, file)
        return infos, unmapped

    def tensor(self, name: str) -> QTensor:
        info = self.tensor_infos.get(name)
        if info is None:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        t = self._open(info.file).get_tensor(info.hf_name).reshape(info.shape).contiguous()
        if t.dtype not in _TORCH_TO_QTYPE:
            raise UnsupportedError(f"tensor {info.hf_name!r} has dtype {t.dtype}")
        data = t.view(torch.uint8).reshape(*info.shape[:-1], -1)
        return QTensor(data, info.qtype, info.shape)

    @property
    def chat_template(self) -> str | None:
        template = self.tokenizer_config.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def release_pages(self) -> None:
        """Nothing to release: safetensors tensors are read on demand."""

    def close(self) -> None:
        self._handles.clear()


def _bert_name(name_map: gguf.TensorNameMap, hf_name: str, hf_config: dict) -> str | None:
    """BertFor* checkpoints prefix the encoder with "bert."; a sequence classifier's pooler
    (dense + tanh) and classifier are GGUF's `cls` and `cls.output` (llama.cpp's rank head;
    its converter drops the pooler, transformers applies it)."""
    base = hf_name.removeprefix("bert.")
    stem, _, suffix = base.rpartition(".")
    heads = {"pooler.dense": "cls", "classifier": "cls.output"}
    if stem in heads and "BertForSequenceClassification" in (hf_config.get("architectures") or []):
        return f"{heads[stem]}.{suffix}"
    return _gguf_name(name_map, base)


# transformers' native nomic_bert names -> nomic-ai's custom-code ones, which gguf-py maps
# (the reverse of transformers' conversion_mapping for nomic_bert).
_NOMIC_NATIVE_NAMES = (
    ("embeddings.LayerNorm.", "emb_ln."),
    ("self_attn.o_proj.", "attn.out_proj."),
    ("mlp.up_proj.", "mlp.fc11."),
    ("mlp.gate_proj.", "mlp.fc12."),
    ("mlp.down_proj.", "mlp.fc2."),
    ("post_attention_layernorm.", "norm1."),
    ("post_mlp_layernorm.", "norm2."),
)


def _nomic_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """nomic-bert in either naming: transformers' (`layers.N.self_attn.q_proj`, separate
    Q/K/V) or nomic-ai's custom code (`encoder.layers.N.attn.Wqkv`, `mlp.fc11` / `fc12`)."""
    base = hf_name.removeprefix("nomic_bert.").removeprefix("bert.")
    qkv = re.fullmatch(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", base)
    if qkv:
        return f"blk.{qkv[1]}.attn_{qkv[2]}.{qkv[3]}"
    if base.startswith("layers."):
        base = "encoder." + base
    for native, original in _NOMIC_NATIVE_NAMES:
        base = base.replace(native, original)
    return _gguf_name(name_map, base)


def nomic_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A nomic-bert config.json in transformers' nomic_bert keys: nomic-ai's custom-code
    configs name them as GPT-2 does (n_embd, n_layer, rotary_emb_base, ...). Options llama.cpp
    does not run either (as its converter asserts) are UnsupportedError."""
    out = dict(cfg)
    for original, native in (
        ("n_embd", "hidden_size"),
        ("n_head", "num_attention_heads"),
        ("n_layer", "num_hidden_layers"),
        ("n_inner", "intermediate_size"),
        ("layer_norm_epsilon", "layer_norm_eps"),
        ("rotary_emb_base", "rope_theta"),
    ):
        if original in cfg and native not in cfg:
            out[native] = cfg[original]
    if "max_position_embeddings" not in cfg and "n_positions" in cfg:
        # nomic-embed-text v1 / v1.5 say 8192 positions but were trained for 2048
        out["max_position_embeddings"] = cfg.get("max_trained_positions") or cfg["n_positions"]
    if cfg.get("rotary_emb_fraction") not in (None, 1.0):
        out["partial_rotary_factor"] = cfg["rotary_emb_fraction"]
    if not (cfg.get("rope_parameters") or {}).get("rope_theta"):
        out.setdefault("rope_theta", 1000.0)  # transformers' NomicBertConfig.default_theta
    checks = (
        ("activation_function", ("swiglu",)),
        ("rotary_emb_interleaved", (False,)),
        ("rotary_emb_scale_base", (None,)),
        ("prenorm", (False,)),
        ("moe_every_n_layers", (None, 0)),
        ("hidden_act", ("silu", "swish")),
    )
    for key, allowed in checks:
        if key in cfg and cfg[key] not in allowed:
            raise UnsupportedError(f"nomic-bert with {key}={cfg[key]!r} is not supported")
    return out


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    # Multimodal checkpoints prefix the language model ("model.language_model.layers...").
    candidates = [hf_name, hf_name.replace("language_model.", "", 1)]
    for candidate in candidates:
        name = name_map.get_name(candidate, try_suffixes=(".weight", ".bias"))
        if name is not None:
            return name
    return None


# -- config.json -> ModelConfig ---------------------------------------------------------------


def _rope_params(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (global, sliding-layer) rope settings of a HF config. transformers 5 nests them in
    `rope_parameters` (per layer type for Gemma 3); older configs give `rope_theta`,
    `rope_scaling` and `rope_local_base_freq` at top level. Both are read, as
    convert_hf_to_gguf.py's TextModel.__init__ does."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    params = params if isinstance(params, dict) else {}
    full = dict(params.get("full_attention", params))
    sliding = dict(params.get("sliding_attention") or {})
    full.setdefault("rope_theta", cfg.get("rope_theta", 10_000.0))
    if cfg.get("rope_local_base_freq") is not None:
        sliding.setdefault("rope_theta", cfg["rope_local_base_freq"])
    if cfg.get("partial_rotary_factor") is not None:
        full.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    return full, sliding


def _rope_scaling(rs: dict[str, Any]) -> RopeScaling | None:
    # A pre-5 `rope_scaling` without a type is linear (transformers' legacy default).
    kind = rs.get("rope_type") or rs.get("type") or ("linear" if "factor" in rs else "default")
    if kind == "default":
        return None
    return RopeScaling(
        type=kind,
        factor=float(rs.get("factor", 1.0)),
        original_context_length=rs.get("original_max_position_embeddings"),
        beta_fast=rs.get("beta_fast"),
        beta_slow=rs.get("beta_slow"),
        attn_factor=rs.get("attention_factor"),
        low_freq_factor=rs.get("low_freq_factor"),
        high_freq_factor=rs.get("high_freq_factor"),
    )


def _sliding(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, tuple]:
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None, ()
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return window, tuple(t == "sliding_attention" for t in layer_types)
    period = cfg.get("sliding_window_pattern") or (6 if arch == "gemma3" else 0)
    if period <= 0:
        return window, (True,) * num_layers
    return window, tuple((il % period) < period - 1 for il in range(num_layers))


def _required(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ModelFormatError(f"config.json lacks {key!r}")
    return cfg[key]


def config_from_hf(cfg: dict[str, Any], arch: str, folder: HFFolder | None = None) -> ModelConfig:
    """A ModelConfig from a HF `config.json` (the text config for multimodal models)."""
    hidden = _required(cfg, "hidden_size")
    num_heads = _required(cfg, "num_attention_heads")
    num_layers = _required(cfg, "num_hidden_layers")
    head_dim = cfg.get("head_dim") or (hidden // num_heads if num_heads else 0)
    is_bert = arch in ENCODER_ARCHS
    no_rope = arch in ("bert", "jina-bert-v2")
    window, sliding_layers = _sliding(cfg, arch, num_layers)
    tie = cfg.get("tie_word_embeddings", True)
    if folder is not None:
        tie = "output.weight" not in folder.tensor_infos
    rope, rope_swa = _rope_params(cfg)
    partial = rope.get("partial_rotary_factor")
    pooling = _sentence_transformers_pooling(folder.path) if folder is not None else None
    return ModelConfig(
        arch=arch,
        name=cfg.get("_name_or_path") or None,
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        vocab_size=_required(cfg, "vocab_size"),
        context_length=_required(cfg, "max_position_embeddings"),
        ffn_size=cfg.get("intermediate_size") or 0,
        norm_eps=float(cfg.get("layer_norm_eps" if is_bert else "rms_norm_eps") or 1e-6),
        norm_type="layer" if is_bert else "rms",
        rope_theta=None if no_rope else float(rope["rope_theta"]),
        rope_dim=int(head_dim * partial) if partial else None,
        rope_scaling=None if no_rope else _rope_scaling(rope),
        sliding_window=window,
        sliding_layers=sliding_layers,
        rope_theta_swa=rope_swa.get("rope_theta") if arch == "gemma3" else None,
        # Gemma scales queries by query_pre_attn_scalar^-0.5 (transformers Gemma3Attention)
        attention_scale=_query_scale(cfg),
        attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        causal=not is_bert,
        pooling=pooling,
        tie_word_embeddings=bool(tie),
    )


def _query_scale(cfg: dict[str, Any]) -> float | None:
    scalar = cfg.get("query_pre_attn_scalar")
    return float(scalar) ** -0.5 if scalar else None


def _sentence_transformers_pooling(path: Path) -> str | None:
    """Pooling of a sentence-transformers folder (`modules.json` -> `*_Pooling/config.json`)."""
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {modules}: {e}") from None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("models.Pooling"):
            cfg = read_json(path / str(entry.get("path", "")) / "config.json")
            if cfg.get("pooling_mode_cls_token"):
                return "cls"
            if cfg.get("pooling_mode_mean_tokens"):
                return "mean"
            if cfg.get("pooling_mode_lasttoken"):
                return "last"
            raise UnsupportedError(f"{modules}: pooling mode {cfg} is not supported")
    return None
