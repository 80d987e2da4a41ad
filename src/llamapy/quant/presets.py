"""llama-quantize's presets (Q4_K_M, ...) and the ggml type each tensor gets under them.

A preset is a llama.cpp file type (`LlamaFileType`): a default tensor type plus per-tensor
rules (attn_v and some ffn_down layers get more bits, the output matrix Q6_K, rows that do
not split into 256-blocks fall back to a 32-block type). `plan_tensor_types` follows
`llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp, tensor by tensor, in the order
llama.cpp visits them (non-layer tensors first, then layer by layer, by name), since some
rules count the attn_v / ffn_down tensors already seen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from gguf import LlamaFileType

from llamapy.quant.types import FLOAT_TYPES, QuantType, block_size

F = LlamaFileType
T = QuantType


@dataclass(frozen=True, slots=True)
class Preset:
    """One `llamapy quantize` type name: a llama.cpp file type and its default tensor type."""

    name: str
    ftype: LlamaFileType
    default_type: QuantType
    description: str


_PRESET_LIST = (
    Preset("Q4_0", F.MOSTLY_Q4_0, T.Q4_0, "4.5 bpw, legacy"),
    Preset("Q4_1", F.MOSTLY_Q4_1, T.Q4_1, "5.0 bpw, legacy"),
    Preset("Q5_0", F.MOSTLY_Q5_0, T.Q5_0, "5.5 bpw, legacy"),
    Preset("Q5_1", F.MOSTLY_Q5_1, T.Q5_1, "6.0 bpw, legacy"),
    Preset("Q8_0", F.MOSTLY_Q8_0, T.Q8_0, "8.5 bpw"),
    Preset("Q2_K", F.MOSTLY_Q2_K, T.Q2_K, "k-quant mix around 2.6 bpw"),
    Preset("Q3_K_S", F.MOSTLY_Q3_K_S, T.Q3_K, "k-quant, 3.4 bpw"),
    Preset("Q3_K_M", F.MOSTLY_Q3_K_M, T.Q3_K, "k-quant mix, attn_v / ffn_down raised"),
    Preset("Q3_K_L", F.MOSTLY_Q3_K_L, T.Q3_K, "k-quant mix, attn_v / ffn_down Q5_K"),
    Preset("Q4_K_S", F.MOSTLY_Q4_K_S, T.Q4_K, "k-quant, 4.5 bpw"),
    Preset("Q4_K_M", F.MOSTLY_Q4_K_M, T.Q4_K, "k-quant mix, half of attn_v / ffn_down Q6_K"),
    Preset("Q5_K_S", F.MOSTLY_Q5_K_S, T.Q5_K, "k-quant, 5.5 bpw"),
    Preset("Q5_K_M", F.MOSTLY_Q5_K_M, T.Q5_K, "k-quant mix, half of attn_v / ffn_down Q6_K"),
    Preset("Q6_K", F.MOSTLY_Q6_K, T.Q6_K, "k-quant, 6.6 bpw"),
    Preset("IQ4_NL", F.MOSTLY_IQ4_NL, T.IQ4_NL, "4.5 bpw non-linear"),
    Preset("IQ4_XS", F.MOSTLY_IQ4_XS, T.IQ4_XS, "4.25 bpw non-linear"),
    Preset("F16", F.MOSTLY_F16, T.F16, "16 bpw"),
    Preset("BF16", F.MOSTLY_BF16, T.BF16, "16 bpw, bfloat16"),
    Preset("F32", F.ALL_F32, T.F32, "32 bpw"),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}
# llama-quantize's aliases
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def parse_preset(name: str) -> Preset:
    """A preset from its name (case-insensitive; Q3_K / Q4_K / Q5_K mean the _M mixes)."""
    key = name.strip().upper()
    key = _ALIASES.get(key, key)
    preset = PRESETS.get(key)
    if preset is None:
        raise ValueError(f"unknown quantization type {name!r}; choose one of {', '.join(PRESETS)}")
    return preset


def parse_tensor_type(name: str) -> QuantType:
    """A ggml tensor type by name (for --output-tensor-type / --token-embedding-type)."""
    try:
        return QuantType[name.strip().upper()]
    except KeyError:
        known = ", ".join(t.name for t in QuantType)
        raise ValueError(f"unknown ggml type {name!r}; known: {known}") from None


@dataclass(frozen=True, slots=True)
class QuantOptions:
    """What `llama_model_quantize_params` says about tensor types."""

    preset: Preset
    pure: bool = False  # every quantizable tensor gets the default type (no mixes)
    output_tensor_type: QuantType | None = None
    token_embedding_type: QuantType | None = None
    quantize_output_tensor: bool = True  # False: --leave-output-tensor
    has_imatrix: bool = False


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The hyperparameters the rules read (llama_model's hparams)."""

    arch: str
    num_layers: int
    num_heads: int = 1
    num_kv_heads: int = 1
    num_experts: int = 0

    @property
    def n_gqa(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def is_70b(self) -> bool:
        # llama_quant_model_from_metadata's test for LLM_TYPE_70B
        return (
            self.arch == "llama" and self.num_layers == 80 and self.num_heads != self.num_kv_heads
        )


@dataclass(frozen=True, slots=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # torch order: shape[-1] is ggml's ne[0], the row length
    src_type: QuantType
    dst_type: QuantType
    fallback: bool = False  # the rules' type did not fit the rows

    @property
    def quantized(self) -> bool:
        return self.dst_type != self.src_type


# -- which tensors may be quantized (tensor_allows_quantization) ------------------------------

# Name parts llama.cpp never quantizes (the small or special 2-D tensors of every family).
_KEEP_PARTS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
# BERT's positional embeddings and token types (LLM_TENSOR_POS_EMBD / TOKEN_TYPES)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one above 1 (at least 1)."""
    ne = list(reversed(shape))
    return max((i + 1 for i, d in enumerate(ne) if d > 1), default=1)


def allows_quantization(name: str, shape: Sequence[int], options: QuantOptions) -> bool:
    """tensor_allows_quantization: 2-D and 3-D weights, not norms, embeddings of positions,
    expert gates or the other small tensors llama.cpp keeps as they are."""
    if ggml_n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if not options.quantize_output_tensor and name == "output.weight":
        return False
    if name in _KEEP_NAMES:
        return False
    return not any(part in name for part in _KEEP_PARTS)


# -- categories (tensor_get_category) ---------------------------------------------------------


class Category(Enum):
    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


_CATEGORY_PARTS = (
    ("attn_qkv.weight", Category.ATTN_QKV),
    ("attn_kv_b.weight", Category.ATTN_KV_B),
    ("attn_v.weight", Category.ATTN_V),
    ("attn_k.weight", Category.ATTN_K),
    ("attn_q.weight", Category.ATTN_Q),
    ("attn_output.weight", Category.ATTN_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for part, cat in _CATEGORY_PARTS:
        if part in name:
            return cat
    return Category.OTHER


def _is_attn_v(cat: Category) -> bool:
    return cat in (Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B)


_LAYER = re.compile(r"blk\.(\d+)\.")


def layer_of(name: str) -> int:
    """The layer number of `blk.N.*`, -1 for the other tensors."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: Iterable[str]) -> list[str]:
    """The order llama.cpp's loader keeps weights in (weight_name_comparer): non-layer tensors
    first, then by layer number, by name within a layer."""
    return sorted(names, key=lambda n: (layer_of(n), n))


# -- the rules (llama_tensor_get_type_impl) ---------------------------------------------------


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or _cmod(i_layer - n_layers // 8, 3) == 2
    )


def _cmod(a: int, b: int) -> int:
    """C's `%` (truncates toward zero), which the rules use on possibly negative numbers."""
    r = abs(a) % b
    return -r if a < 0 else r


@dataclass(slots=True)
class _State:
    """quantize_state_impl: counters the rules advance as tensors go by."""

    model: ModelShape
    options: QuantOptions
    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    has_tied_embeddings: bool = True
    n_fallback: int = 0
    fallbacks: list[str] = field(default_factory=list)

    def layer_info(self, counter: int, name: str) -> tuple[int, int]:
        n = self.model.num_layers
        if self.model.num_experts > 1:  # experts are not consecutive: read the name
            i = layer_of(name)
            if not 0 <= i < n:
                raise ValueError(f"cannot tell the layer of tensor {name!r}")
            return i, n
        return counter, n


def _output_type(st: _State, new: QuantType, ncols: int) -> QuantType:
    o = st.options
    if o.output_tensor_type is not None:
        return o.output_tensor_type
    if st.model.arch == "falcon" or ncols % block_size(new):
        return T.Q8_0
    return new if new == T.Q8_0 else T.Q6_K


def _attn_v_type(st: _State, new: QuantType) -> QuantType:
    ft, gqa = st.options.preset.ftype, st.model.n_gqa
    if ft == F.MOSTLY_Q2_K:
        new = T.Q4_K if gqa >= 4 else T.Q3_K
    elif ft == F.MOSTLY_Q3_K_M:
        new = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
    elif ft == F.MOSTLY_Q3_K_L or (ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa >= 4):
        new = T.Q5_K
    elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(
        st.i_attention_wv, st.n_attention_wv
    ):
        new = T.Q6_K
    elif ft == F.MOSTLY_Q4_K_S and st.i_attention_wv < 4:
        new = T.Q5_K
    if st.model.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K  # 8 heads share attn_v: more bits cost little
    if st.model.num_experts == 8:
        new = T.Q8_0
    st.i_attention_wv += 1
    return new


def _ffn_down_type(st: _State, new: QuantType, name: str) -> QuantType:
    ft, falcon = st.options.preset.ftype, st.model.arch == "falcon"
    i, n = st.layer_info(st.i_ffn_down, name)
    if ft == F.MOSTLY_Q2_K:
        new = T.Q3_K
    elif ft == F.MOSTLY_Q3_K_M:
        if i < n // 16:
            new = T.Q5_K
        elif not falcon or _use_more_bits(i, n):
            new = T.Q4_K
        else:
            new = T.Q3_K
    elif ft == F.MOSTLY_Q3_K_L:
        new = T.Q4_K if falcon else T.Q5_K
    elif ft == F.MOSTLY_Q4_K_M:
        if falcon:
            new = T.Q6_K if i < n // 16 else (T.Q5_K if _use_more_bits(i, n) else T.Q4_K)
        elif _use_more_bits(i, n):
            new = T.Q6_K
    elif i < n // 8 and ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not st.options.has_imatrix:
        new = T.Q5_K
    elif ft == F.MOSTLY_Q5_K_M and _use_more_bits(i, n):
        new = T.Q6_K
    elif ft == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
        new = T.Q5_K
    elif ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and st.options.has_imatrix and i < n // 8:
        # guards the first ffn_down layers, only with an imatrix (as llama.cpp)
        new = T.Q4_1 if ft == F.MOSTLY_Q4_0 else T.Q5_1
    st.i_ffn_down += 1
    return new


_ATTN_OUTPUT_MOE_Q5K = (
    F.MOSTLY_Q2_K,
    F.MOSTLY_Q3_K_S,
    F.MOSTLY_Q3_K_M,
    F.MOSTLY_IQ4_NL,
    F.MOSTLY_Q4_K_S,
    F.MOSTLY_Q4_K_M,
    F.MOSTLY_IQ4_XS,
)


def _attn_output_type(st: _State, new: QuantType) -> QuantType:
    ft = st.options.preset.ftype
    if st.model.arch == "falcon":
        return T.Q4_K if ft == F.MOSTLY_Q3_K_L else new
    if st.model.num_experts == 8:
        return T.Q5_K if ft in _ATTN_OUTPUT_MOE_Q5K else new
    return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}.get(ft, new)


def _rule_type(st: _State, new: QuantType, name: str, shape: Sequence[int]) -> QuantType:
    """llama_tensor_get_type_impl for the presets llamapy offers."""
    cat = category(name)
    if cat == Category.OUTPUT or (st.has_tied_embeddings and cat == Category.TOKEN_EMBD):
        return _output_type(st, new, shape[-1])
    if cat == Category.TOKEN_EMBD:
        o = st.options
        return o.token_embedding_type if o.token_embedding_type is not None else new
    if _is_attn_v(cat):
        return _attn_v_type(st, new)
    if cat == Category.ATTN_K:
        return T.Q8_0 if st.model.num_experts == 8 else new
    if cat == Category.FFN_DOWN:
        return _ffn_down_type(st, new, name)
    if cat == Category.ATTN_OUTPUT:
        return _attn_output_type(st, new)
    if cat == Category.ATTN_QKV:  # unreachable: attn_qkv is attn_v-like above (as llama.cpp)
        return new
    if cat == Category.FFN_GATE:
        st.layer_info(st.i_ffn_gate, name)
        st.i_ffn_gate += 1
    elif cat == Category.FFN_UP:
        st.layer_info(st.i_ffn_up, name)
        st.i_ffn_up += 1
    return new


# Where a type's blocks do not fit a row (tensor_type_fallback).
_FALLBACK = {
    T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.TQ1_0: T.Q4_0,
    T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def _fallback(st: _State, name: str, ncols: int, target: QuantType) -> QuantType:
    if ncols % block_size(target) == 0:
        return target
    st.n_fallback += 1
    st.fallbacks.append(name)
    new = _FALLBACK.get(target)
    if new is None:
        if block_size(target) > 32:
            raise ValueError(f"no fallback type is defined for {target.name}")
        new = target
    return new if ncols % block_size(new) == 0 else T.F16


def _tensor_type(
    st: _State, name: str, shape: Sequence[int], src: QuantType
) -> tuple[QuantType, bool]:
    """llama_tensor_get_type: (the type, whether it fell back)."""
    o = st.options
    if not allows_quantization(name, shape, o):
        return src, False
    cat = category(name)
    if o.token_embedding_type is not None and cat == Category.TOKEN_EMBD:
        return o.token_embedding_type, False
    if o.output_tensor_type is not None and cat == Category.OUTPUT:
        return o.output_tensor_type, False
    new = o.preset.default_type
    if new in FLOAT_TYPES:  # ggml_is_quantized is false: no mixes, no fallbacks
        return new, False
    if not o.pure:
        new = _rule_type(st, new, name, shape)
    before = st.n_fallback
    new = _fallback(st, name, shape[-1], new)
    return new, st.n_fallback > before


def plan_tensor_types(
    tensors: Iterable[tuple[str, Sequence[int], QuantType]],
    model: ModelShape,
    options: QuantOptions,
) -> list[TensorPlan]:
    """The type of every tensor, in llama.cpp's order (see `llama_order`).

    Args:
        tensors: (GGUF name, shape in torch order, current type) of every tensor.
    """
    by_name = {name: (tuple(int(d) for d in shape), src) for name, shape, src in tensors}
    st = _State(model, options)
    for name in by_name:  # init_quantize_state_counters
        cat = category(name)
        st.n_attention_wv += _is_attn_v(cat)
        if cat == Category.OUTPUT:
            st.has_tied_embeddings = False
    plans = []
    for name in llama_order(by_name):
        shape, src = by_name[name]
        dst, fell_back = _tensor_type(st, name, shape, src)
        if shape[-1] % block_size(dst):
            raise ValueError(
                f"tensor {name!r}: rows of {shape[-1]} are not a whole number of "
                f"{dst.name} blocks of {block_size(dst)}"
            )
        plans.append(TensorPlan(name, shape, src, dst, fell_back))
    return plans
