"""Write a model source as a GGUF of a preset's types (what `llama-quantize` does).

Each tensor gets the type `plan_tensor_types` gives it; one that changes type is
dequantized to float32 and quantized with `llamapy.quant.quantize` (in row chunks, so only
a slice of a large matrix is ever float at once) when it is written. Tensors are written
in llama.cpp's order; the metadata is the source's with `general.file_type` and
`general.quantization_version` set, and the imatrix it used noted as llama-quantize does.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from gguf import GGML_QUANT_VERSION, Keys
from tqdm import tqdm

from llamapy.convert.source import ModelSource, SourceTensor
from llamapy.errors import UnsupportedError
from llamapy.formats.gguf_writer import PendingTensor, write_gguf
from llamapy.quant.imatrix import ImportanceMatrix
from llamapy.quant.presets import QuantOptions, TensorPlan, plan_tensor_types
from llamapy.quant.qtensor import QTensor
from llamapy.quant.quantize import SUPPORTED_TYPES, quantize
from llamapy.quant.types import FLOAT_TYPES, QuantType, row_nbytes

logger = logging.getLogger(__name__)

# float32 elements quantized at once (64 MiB): bounds the scratch of one tensor
CHUNK_ELEMENTS = 16 * 1024 * 1024
_FLOAT_DTYPES = {
    QuantType.F32: torch.float32,
    QuantType.F16: torch.float16,
    QuantType.BF16: torch.bfloat16,
}
_MIB = 1024.0 * 1024.0


@dataclass(slots=True)
class QuantizeSummary:
    """What was written: sizes before and after, and the types tensors got."""

    path: Path
    preset: str
    n_tensors: int
    n_quantized: int
    n_fallback: int
    n_elements: int
    size_in: int
    size_out: int
    seconds: float
    type_counts: dict[str, int] = field(default_factory=dict)

    @property
    def bpw_in(self) -> float:
        return 8.0 * self.size_in / max(self.n_elements, 1)

    @property
    def bpw_out(self) -> float:
        return 8.0 * self.size_out / max(self.n_elements, 1)

    def lines(self) -> list[str]:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts.items()))
        out = [
            f"model size = {self.size_in / _MIB:8.2f} MiB ({self.bpw_in:.2f} BPW)",
            f"quant size = {self.size_out / _MIB:8.2f} MiB ({self.bpw_out:.2f} BPW)",
            f"tensors    = {self.n_tensors} ({self.n_quantized} converted): {types}",
        ]
        if self.n_fallback:
            out.append(
                f"{self.n_fallback} of {self.n_tensors} tensor(s) required fallback quantization"
            )
        out.append(f"wrote {self.path} in {self.seconds:.2f} s")
        return out


def supported_types() -> set[QuantType]:
    """The types llamapy's quantizer can make."""
    return set(SUPPORTED_TYPES)


def check_supported(plans: list[TensorPlan]) -> None:
    """UnsupportedError naming the first type the plan needs that llamapy cannot make."""
    needed = {p.dst_type for p in plans if p.quantized}
    missing = needed - supported_types()
    if missing:
        first = next(p for p in plans if p.quantized and p.dst_type in missing)
        names = ", ".join(sorted(t.name for t in missing))
        raise UnsupportedError(
            f"quantizing to {names} is not supported yet (needed for {first.name} and maybe "
            f"others); try --pure or another type"
        )


def quantize_rows(
    x: torch.Tensor | QTensor, qtype: QuantType, imatrix: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of floats (or of another type's blocks, dequantized a chunk at a time) ->
    `qtype` blocks `(rows, row_bytes)`; only `CHUNK_ELEMENTS` floats exist at once.
    `imatrix`: `(n,)` column importances (the types that do not read them ignore them)."""
    n = x.shape[-1]
    data = x.data.reshape(-1, x.data.shape[-1]) if isinstance(x, QTensor) else x.reshape(-1, n)
    num_rows = data.shape[0]

    def rows_of(a: int, b: int) -> torch.Tensor:
        if isinstance(x, QTensor):
            return QTensor(data[a:b], x.qtype, (b - a, n)).dequantize()
        return data[a:b].to(torch.float32)

    step = max(1, CHUNK_ELEMENTS // n)
    parts = [
        _quantize(rows_of(a, min(a + step, num_rows)), qtype, imatrix)
        for a in range(0, num_rows, step)
    ]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _quantize(x: torch.Tensor, qtype: QuantType, imatrix: torch.Tensor | None) -> torch.Tensor:
    # torch's float32 -> float16 / bfloat16 casts round to nearest even as ggml does; only NaN
    # payloads differ, so `quantize` (bit-exact with them too) is kept for inputs with NaNs
    dtype = _FLOAT_DTYPES.get(qtype)
    if qtype != QuantType.F32 and dtype is not None and not bool(x.isnan().any()):
        return x.to(dtype).view(torch.uint8)
    return quantize(x, qtype, imatrix)


def convert_tensor(
    t: QTensor | torch.Tensor, dst: QuantType, imatrix: torch.Tensor | None = None
) -> torch.Tensor:
    """A loaded tensor as raw `dst` rows `(*shape[:-1], row_bytes)` (uint8)."""
    if isinstance(t, QTensor) and t.qtype == dst:
        return t.data
    if isinstance(t, torch.Tensor) and _FLOAT_DTYPES.get(dst) == t.dtype:
        return t.contiguous().view(torch.uint8)
    shape = tuple(t.shape)
    if len(shape) == 3 and imatrix is not None and imatrix.dim() == 2:  # one per expert
        experts = [
            t.to(torch.float32)[e]
            if isinstance(t, torch.Tensor)
            else QTensor(t.data[e], t.qtype, shape[1:])
            for e in range(shape[0])
        ]
        blocks = torch.stack([quantize_rows(x, dst, imatrix[e]) for e, x in enumerate(experts)])
    else:
        blocks = quantize_rows(t, dst, imatrix)
    return blocks.reshape(*shape[:-1], row_nbytes(dst, shape[-1]))


def quantize_model(
    source: ModelSource,
    out: str | os.PathLike[str],
    options: QuantOptions,
    imatrix: ImportanceMatrix | None = None,
    *,
    imatrix_path: str | None = None,
    progress: bool = False,
) -> QuantizeSummary:
    """Write `source` to `out` with the preset's tensor types; returns the summary."""
    t0 = time.perf_counter()
    by_name = {t.name: t for t in source.tensors}
    plans = plan_tensor_types(
        [(t.name, t.shape, t.qtype) for t in source.tensors], source.model_shape, options
    )
    check_supported(plans)
    imats = {}
    if imatrix is not None:
        imats = {p.name: imatrix.for_tensor(p.name, p.shape) for p in plans if p.quantized}
    requant = {
        p.src_type.name
        for p in plans
        if p.quantized and p.src_type not in FLOAT_TYPES and p.dst_type not in FLOAT_TYPES
    }
    if requant:
        logger.warning(
            "requantizing from %s: quality is lower than from 16/32-bit weights",
            ", ".join(sorted(requant)),
        )
    metadata = dict(source.metadata)
    metadata[Keys.General.QUANTIZATION_VERSION] = GGML_QUANT_VERSION
    metadata[Keys.General.FILE_TYPE] = int(options.preset.ftype)
    if imatrix is not None:
        metadata.update(_imatrix_metadata(imatrix, imatrix_path))
    bar = tqdm(total=len(plans), unit="tensor", disable=not progress, desc="quantize")

    def pending(plan: TensorPlan) -> PendingTensor:
        src = by_name[plan.name]

        def make() -> torch.Tensor:
            bar.set_postfix_str(f"{plan.name} -> {plan.dst_type.name}", refresh=False)
            data = convert_tensor(src.load(), plan.dst_type, imats.get(plan.name))
            bar.update(1)
            return data

        return PendingTensor(plan.shape, make)

    try:
        write_gguf(
            out,
            source.arch,
            metadata,
            [(p.name, pending(p), p.dst_type) for p in plans],
            metadata_types=source.metadata_types,
        )
    finally:
        bar.close()
    return _summary(Path(out), options, plans, by_name, time.perf_counter() - t0)


def _imatrix_metadata(imatrix: ImportanceMatrix, path: str | None) -> dict[str, object]:
    # tools/quantize/quantize.cpp's LLM_KV_QUANTIZE_IMATRIX_* overrides
    md: dict[str, object] = {"quantize.imatrix.entries_count": len(imatrix.entries)}
    if path:
        md["quantize.imatrix.file"] = str(path)[:127]
    if imatrix.datasets:
        md["quantize.imatrix.dataset"] = imatrix.datasets[0][:127]
    if imatrix.chunk_count > 0:
        md["quantize.imatrix.chunks_count"] = imatrix.chunk_count
    return md


def _summary(
    path: Path,
    options: QuantOptions,
    plans: list[TensorPlan],
    by_name: dict[str, SourceTensor],
    seconds: float,
) -> QuantizeSummary:
    size_out = sum(row_nbytes(p.dst_type, p.shape[-1]) * math.prod(p.shape[:-1]) for p in plans)
    counts = collections.Counter(p.dst_type.name for p in plans)
    return QuantizeSummary(
        path=path,
        preset=options.preset.name,
        n_tensors=len(plans),
        n_quantized=sum(p.quantized for p in plans),
        n_fallback=sum(p.fallback for p in plans),
        n_elements=sum(t.numel for t in by_name.values()),
        size_in=sum(t.nbytes for t in by_name.values()),
        size_out=size_out,
        seconds=seconds,
        type_counts=dict(counts),
    )
