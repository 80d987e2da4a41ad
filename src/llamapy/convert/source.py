"""What a GGUF is written from: metadata and tensors that load on demand.

`ModelSource` is the one shape both inputs take: a GGUF file (its metadata as it is, its
tensors as raw blocks) and a Hugging Face folder (metadata made by `hf_to_gguf`, tensors
converted to llama.cpp's layout as they load).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFValueType, Keys

from llamapy.formats.gguf_file import GGUFFile
from llamapy.quant.presets import ModelShape
from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType, row_nbytes


@dataclass(frozen=True, slots=True)
class SourceTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order
    qtype: QuantType  # the type it has as loaded
    load: Callable[[], QTensor | torch.Tensor]  # raw blocks, or floats

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return row_nbytes(self.qtype, self.shape[-1]) * math.prod(self.shape[:-1])


@dataclass(slots=True)
class ModelSource:
    path: Path
    arch: str
    metadata: dict[str, Any]
    tensors: list[SourceTensor]
    model_shape: ModelShape
    metadata_types: dict[str, GGUFValueType] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


# Keys llama-quantize drops from its output (a split model is written whole).
_SPLIT_KEYS = (
    Keys.Split.LLM_KV_SPLIT_NO,
    Keys.Split.LLM_KV_SPLIT_COUNT,
    Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT,
)


def _first_int(value: Any, default: int) -> int:
    """Per-layer counts may be arrays (one value per layer): the largest one."""
    if isinstance(value, list):
        return max((int(v) for v in value), default=default)
    return default if value is None else int(value)


def model_shape_from_gguf(md: dict[str, Any]) -> ModelShape:
    arch = str(md.get(Keys.General.ARCHITECTURE, ""))
    heads = _first_int(md.get(Keys.Attention.HEAD_COUNT.format(arch=arch)), 1)
    return ModelShape(
        arch=arch,
        num_layers=_first_int(md.get(Keys.LLM.BLOCK_COUNT.format(arch=arch)), 0),
        num_heads=heads,
        num_kv_heads=_first_int(md.get(Keys.Attention.HEAD_COUNT_KV.format(arch=arch)), heads),
        num_experts=_first_int(md.get(Keys.LLM.EXPERT_COUNT.format(arch=arch)), 0),
    )


def gguf_source(path: str | Path) -> ModelSource:
    """A GGUF file as a source: its metadata (split keys dropped), its tensors' blocks."""
    f = GGUFFile(path)
    md = {k: v for k, v in f.metadata.items() if k not in _SPLIT_KEYS}
    tensors = [
        SourceTensor(name, tuple(info.shape), info.qtype, _gguf_loader(f, name))
        for name, info in f.tensor_infos.items()
    ]
    return ModelSource(
        path=f.path,
        arch=str(md.get(Keys.General.ARCHITECTURE, "")),
        metadata=md,
        tensors=tensors,
        model_shape=model_shape_from_gguf(md),
        metadata_types=dict(f.metadata_types),
        close=f.close,
    )


def _gguf_loader(f: GGUFFile, name: str) -> Callable[[], QTensor]:
    return lambda: f.tensor(name)


def open_source(path: str | Path) -> ModelSource:
    """A GGUF file or a Hugging Face folder (converted to llama.cpp's layout as it loads)."""
    p = Path(path)
    if p.is_dir():
        from llamapy.convert.hf_to_gguf import hf_source

        return hf_source(p)
    return gguf_source(p)
