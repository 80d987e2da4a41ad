"""Importance matrices (llama-imatrix output): per-column weights for quantizing a tensor.

Two file formats, read as llama.cpp's common_imatrix_load and llama-quantize's
load_imatrix do:

- GGUF (current): tensors `<name>.in_sum2` (F32, `(n_mat, ne0)`: sums of squared
  activations) and `<name>.counts` (F32, `(n_mat, 1)`: tokens seen per matrix), metadata
  `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`. The value of a column is
  its sum / its matrix's count (1 where the count is 0).
- legacy `.dat`: int32 entry count, then per entry int32 name length, the name, int32 ncall,
  int32 nval, nval float32 (already averaged per call, times ncall); optionally int32 chunk
  count, int32 dataset name length and the name. The value is the stored number / ncall.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llamapy.errors import ModelFormatError
from llamapy.quant.types import QuantType

_SUMS, _COUNTS = ".in_sum2", ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass(slots=True)
class ImportanceMatrix:
    """Per-tensor column importances, by GGUF tensor name (`blk.0.attn_q.weight`)."""

    entries: dict[str, np.ndarray]  # float32, ne0 * n_expert values each
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The importances of tensor `name` of torch shape `shape`, `(n_per_row,)` or
        `(n_expert, n_per_row)` for a 3-D expert tensor; None if the file has none for it.

        Raises:
            ModelFormatError: its size is not the tensor's row length (times its experts),
                except for token_embd, which llama.cpp quantizes without one then.
        """
        values = self.entries.get(name)
        if values is None:
            return None
        n_mat = shape[0] if len(shape) == 3 else 1
        if values.size != shape[-1] * n_mat:
            if name == "token_embd.weight":
                return None
            raise ModelFormatError(
                f"imatrix size {values.size} is different from tensor size "
                f"{shape[-1] * n_mat} for {name}"
            )
        t = torch.from_numpy(values.copy())
        return t.view(n_mat, shape[-1]) if len(shape) == 3 else t


def uses_imatrix(qtype: QuantType) -> bool:
    """Whether ggml_quantize_chunk reads the importances for this type (ggml-quants.c: the
    legacy 4/5-bit types, the k-quants and the i-quants; Q8_0 and floats ignore them)."""
    return qtype not in (QuantType.F32, QuantType.F16, QuantType.BF16, QuantType.Q8_0)


def load_imatrix(path: str | os.PathLike[str]) -> ImportanceMatrix:
    """Read an imatrix file of either format (GGUF if it starts with the GGUF magic)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFormatError(f"cannot read imatrix {path}: {e.strerror or e}") from None
    imatrix = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    for name, values in imatrix.entries.items():
        if not np.isfinite(values).all():
            raise ModelFormatError(f"imatrix {path.name}: entry {name!r} has non-finite values")
    return imatrix


def _load_gguf(path: Path) -> ImportanceMatrix:
    from llamapy.formats.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        md = f.metadata
        missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in md]
        if missing:  # as llama-quantize: the metadata says what the matrix was computed on
            raise ModelFormatError(f"imatrix {path.name} lacks metadata {', '.join(missing)}")
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for name, info in f.tensor_infos.items():
            for suffix in (_SUMS, _COUNTS):
                if name.endswith(suffix):
                    if info.qtype != QuantType.F32:
                        raise ModelFormatError(
                            f"imatrix {path.name}: {name} must be F32, not {info.qtype.name}"
                        )
                    arr = f.raw(name).numpy().view(np.float32).copy()
                    pairs.setdefault(name[: -len(suffix)], {})[suffix] = arr
        entries = {}
        for name, pair in pairs.items():
            if len(pair) != 2:
                raise ModelFormatError(
                    f"imatrix {path.name}: mismatched sums and counts for {name}"
                )
            entries[name] = _normalize(pair[_SUMS], pair[_COUNTS], path, name)
        if not entries:
            raise ModelFormatError(f"imatrix {path.name} holds no entries")
        datasets = md[KEY_DATASETS]
        return ImportanceMatrix(
            entries,
            [str(d) for d in datasets] if isinstance(datasets, list) else [str(datasets)],
            int(md[KEY_CHUNK_COUNT]),
            int(md[KEY_CHUNK_SIZE]),
        )


def _normalize(sums: np.ndarray, counts: np.ndarray, path: Path, name: str) -> np.ndarray:
    n_mat = counts.size
    if n_mat == 0 or sums.size % n_mat:
        raise ModelFormatError(
            f"imatrix {path.name}: {name} has {sums.size} sums for {n_mat} count(s)"
        )
    counts = np.round(counts).astype(np.float32)  # std::lround, then back to float
    per_mat = sums.reshape(n_mat, -1)
    out = np.ones_like(per_mat)
    seen = counts > 0
    out[seen] = per_mat[seen] / counts[seen, None]
    return out.reshape(-1)


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelFormatError(f"imatrix {self.path.name} is truncated in {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def _load_legacy(path: Path) -> ImportanceMatrix:
    r = _Reader(path.read_bytes(), path)
    n_entries = r.i32("the entry count")
    if n_entries < 1:
        raise ModelFormatError(f"{path.name} is neither a GGUF nor a legacy imatrix file")
    entries = {}
    for i in range(n_entries):
        what = f"entry {i + 1}"
        name = r.take(r.i32(what), what).split(b"\0", 1)[0].decode("utf-8", "replace")
        ncall, nval = r.i32(what), r.i32(what)
        if nval < 1:
            raise ModelFormatError(f"imatrix {path.name}: {what} has {nval} values")
        values = np.frombuffer(r.take(4 * nval, what), dtype="<f4").astype(np.float32)
        entries[name] = values / np.float32(ncall) if ncall > 0 else values.copy()
    chunk_count, datasets = 0, []
    if not r.at_end:  # optional trailer: chunk count and dataset name
        chunk_count = r.i32("the chunk count")
        if not r.at_end:
            n = r.i32("the dataset name")
            if n > 0:
                datasets.append(r.take(n, "the dataset name").decode("utf-8", "replace"))
    return ImportanceMatrix(entries, datasets, chunk_count, 0, is_legacy=True)
