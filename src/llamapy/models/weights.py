"""Weight access for model builders: canonical GGUF names in, QTensors and float tensors out.

This is where the two file kinds are reconciled. llama.cpp's converter changes some tensors
on the way to GGUF; a HF folder gives them as stored, so the builder asks this class which
form it got (`rope_interleaved`, `norm_offset`) instead of testing the file kind itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamapy.errors import ModelFormatError
from llamapy.formats import GGUFFile, HFFolder
from llamapy.quant.qtensor import QTensor


class Weights:
    """`requantize(name, tensor)`, if given, changes a weight's type as it is read (quantizing
    at load: `llamapy.convert.at_load`)."""

    def __init__(
        self,
        model_file: GGUFFile | HFFolder,
        requantize: Callable[[str, QTensor], QTensor] | None = None,
    ) -> None:
        self.file = model_file
        self.config = model_file.config
        self.is_gguf = isinstance(model_file, GGUFFile)
        self.requantize = requantize

    def has(self, name: str) -> bool:
        return name in self.file.tensor_infos

    def q(self, name: str) -> QTensor:
        """A weight as raw blocks (stays quantized)."""
        if not self.has(name):
            raise ModelFormatError(f"{self.file.path.name} lacks tensor {name!r}")
        t = self.file.tensor(name)
        return t if self.requantize is None else self.requantize(name, t)

    def q_opt(self, name: str) -> QTensor | None:
        return self.q(name) if self.has(name) else None

    def f32(self, name: str, *, norm: bool = False) -> torch.Tensor:
        """A small tensor (norm weight, bias) as float32, in memory of its own."""
        blocks = self.q(name)
        t = blocks.dequantize(torch.float32)
        if norm and self.norm_offset:
            t = t + self.norm_offset
        if t.untyped_storage().data_ptr() == blocks.data.untyped_storage().data_ptr():
            # an F32 tensor dequantizes to a view of the mapped file: read every step (a
            # norm), it would keep its page resident, and on kernels whose page cache holds
            # large folios the 2 MiB of matrices around it, whose blocks were copied at load
            t = t.clone()
        return t

    def f32_opt(self, name: str, *, norm: bool = False) -> torch.Tensor | None:
        return self.f32(name, norm=norm) if self.has(name) else None

    @property
    def rope_interleaved(self) -> bool:
        """llama GGUFs use ggml's NORM rope (the converter permuted Q/K rows to match);
        every other case here is NEOX-style."""
        return self.is_gguf and self.config.arch == "llama"

    @property
    def norm_offset(self) -> float:
        """Gemma norms compute x * (1 + w); llama.cpp's converter stores 1 + w."""
        return 1.0 if (not self.is_gguf and self.config.arch == "gemma3") else 0.0
