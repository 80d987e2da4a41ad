"""Model file readers: GGUF files and Hugging Face folders behind one interface."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from llamapy.config import ModelConfig
from llamapy.errors import ModelNotFoundError
from llamapy.formats.gguf_file import GGUFFile, GGUFTensorInfo
from llamapy.formats.hf_folder import HFFolder, HFTensorInfo
from llamapy.quant.qtensor import QTensor

TensorInfo = GGUFTensorInfo | HFTensorInfo


class ModelFile(Protocol):
    """What every reader offers: config, canonical tensor names, raw-block tensors."""

    path: Path
    kind: str  # "gguf" or "hf"
    tensor_infos: dict[str, Any]

    @property
    def config(self) -> ModelConfig: ...

    @property
    def chat_template(self) -> str | None: ...

    @property
    def file_size(self) -> int: ...

    def tensor(self, name: str) -> QTensor: ...

    def release_pages(self) -> None: ...

    def close(self) -> None: ...


def open_model_file(path: str | os.PathLike[str]) -> GGUFFile | HFFolder:
    """Open a `.gguf` file or a Hugging Face model folder (already resolved to a path)."""
    p = Path(path)
    if p.is_dir():
        return HFFolder(p)
    if p.is_file():
        return GGUFFile(p)
    raise ModelNotFoundError(f"no model file or folder at {p}")


__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "HFFolder",
    "HFTensorInfo",
    "ModelFile",
    "TensorInfo",
    "open_model_file",
]
