"""Quantize weights while a model loads (`LLM(model, quantize="Q4_0")`), writing no file.

The tensors get the types `llamapy quantize` would give them (llama.cpp's per-tensor rules
for the preset); each is quantized when the model builder asks for it, so a float
checkpoint is never whole in memory as floats on top of its file. A HF folder's tensors are
quantized as stored: the Q/K rope permutation llama.cpp's converter applies moves whole
rows, and ggml blocks never span rows, so the result is the same blocks in another order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llamapy.convert.quantize_model import check_supported, convert_tensor
from llamapy.quant.presets import ModelShape, QuantOptions, parse_preset, plan_tensor_types
from llamapy.quant.qtensor import QTensor

Requantize = Callable[[str, QTensor], QTensor]


def load_time_quantizer(model_file: Any, preset: str) -> Requantize:
    """A function `(name, tensor) -> tensor` giving each weight of `model_file` (a GGUFFile
    or HFFolder) its type under `preset`.

    Raises:
        ValueError: an unknown preset name.
        UnsupportedError: the preset needs a type llamapy cannot make yet.
    """
    options = QuantOptions(parse_preset(preset))
    cfg = model_file.config
    shape = ModelShape(cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    infos = model_file.tensor_infos
    plans = plan_tensor_types(
        [(name, info.shape, info.qtype) for name, info in infos.items()], shape, options
    )
    check_supported(plans)
    targets = {p.name: p.dst_type for p in plans if p.quantized}

    def requantize(name: str, t: QTensor) -> QTensor:
        dst = targets.get(name)
        if dst is None or dst == t.qtype:
            return t
        return QTensor(convert_tensor(t, dst), dst, t.shape)

    return requantize
