"""QLinear: y = x W^T (+ b) with W kept as ggml blocks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llamapy.quant.dequant import dequantize
from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType

if TYPE_CHECKING:
    from llamapy.kernels.triton.decode_splits import DecodeSplits

logger = logging.getLogger(__name__)

# Which matmul QLinear uses on the CPU: "fast" (kernels/cpu: repacked weights, the measured
# fastest method per type), "reference" (row-chunked dequantize + fp32 matmul: the oracle) or
# "ggml" (llama.cpp's CPU roundings emulated: kernels/cpu/ggml_numerics.py).
CPU_KERNELS = ("fast", "reference", "ggml")


class QLinear(torch.nn.Module):
    """A linear layer whose weight stays quantized in memory.

    Until `prepare(device)` is called the weight is the file's blocks and every call
    dequantizes them in row chunks (the torch reference: at no time does the whole float
    matrix exist). `prepare` repacks the blocks once for the device's kernels: the fused
    Triton dequant-matmuls on CUDA, `kernels.cpu.qmatmul_cpu` on the CPU.
    """

    # Rows dequantized at once by the reference path: bounds its scratch to a few MB.
    CHUNK_ROWS = 2048

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QLinear needs a 2-D weight, got shape {weight.shape}")
        self._weight = weight
        # a fused layer's parts, concatenated into `weight` at its first use (see `fused`)
        self._parts: list[torch.Tensor] | None = None
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        # kernel-specific form of `weight`, set by prepare(), which then empties `weight`
        # (the blocks live on in `packed` alone)
        self.packed = None
        self.kernel = "reference"
        # CUDA: also pack the quants one a byte for the decode GEMV (`widen_to_q8_0`)
        self.byte_twin = False
        # CUDA: a Q4_K / Q5_K weight as the Q4_1 / Q5_1 blocks of its sub-blocks
        # (`qmatmul.LEGACY_TWINS`; set by the model, `models.llama.gpu_kquant_twins`)
        self.legacy_twin = False

    @classmethod
    def fused(
        cls, weights: Sequence[QTensor], biases: Sequence[torch.Tensor | None]
    ) -> QLinear | None:
        """One layer computing several projections of the same input (Q, K and V; gate and
        up), their outputs concatenated in order; None unless the weights share type and
        width. ggml blocks never span rows, so stacking rows is exact."""
        first = weights[0]
        if any(w.qtype != first.qtype or w.shape[1] != first.shape[1] for w in weights):
            return None
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return None
        shape = (sum(w.shape[0] for w in weights), first.shape[1])
        bias = None if biases[0] is None else torch.cat(list(biases))
        # The stacked blocks are built when first needed (by `prepare`, or a reference-path
        # call), not here: a model builds all its layers before preparing any, and copies
        # made here would all be resident at once, and the file's pages they were read from.
        layer = cls(QTensor(first.data[:0], first.qtype, (0, shape[1])), bias)
        layer.out_features = shape[0]
        layer._parts = [w.data for w in weights]
        return layer

    @property
    def file_nbytes(self) -> int:
        """Bytes of the weight's ggml blocks (a fused layer's parts not concatenated)."""
        if self._parts is not None:
            return sum(part.nbytes for part in self._parts)
        return self._weight.data.nbytes

    def legacy_twin_extra_nbytes(self) -> int:
        """GPU bytes the weight's legacy twin (`legacy_twin`, Q4_K / Q5_K) takes beyond its
        blocks; 0 for the other types."""
        from llamapy.kernels.triton.qmatmul import LEGACY_TWINS, legacy_twin_nbytes

        qtype = self._weight.qtype
        if qtype not in LEGACY_TWINS:
            return 0
        twin = legacy_twin_nbytes(qtype, self.out_features, self.in_features)
        return twin - self.file_nbytes

    @property
    def weight(self) -> QTensor:
        """The ggml blocks (empty once `prepare` has repacked them)."""
        if self._parts is not None:
            data = torch.cat(self._parts)
            shape = (self.out_features, self.in_features)
            self._weight = QTensor(data, self._weight.qtype, shape)
            self._parts = None
        return self._weight

    @weight.setter
    def weight(self, value: QTensor) -> None:
        self._weight, self._parts = value, None

    def widen_to_q8_0(self) -> None:
        """Hold a Q4_0 / Q5_0 weight as its exact Q8_0 twin (`quant.legacy.widen_to_q8_0`,
        the GPU's choice for small models, `models.llama.gpu_widening`); a Q4_1 weight, which
        has no exact Q8_0 form, keeps its blocks and is packed with its quants also one a byte
        (`qmatmul.BYTE_TWIN_TYPES`: the decode GEMV reads those), and so is a Q4_K weight
        held as Q4_1 blocks (`legacy_twin`); other types stay."""
        from llamapy.kernels.triton.qmatmul import BYTE_TWIN_TYPES, LEGACY_TWINS
        from llamapy.quant.legacy import WIDENS_TO_Q8_0, widen_to_q8_0

        if self.packed is not None:
            return
        w = self.weight
        if w.qtype in WIDENS_TO_Q8_0 and w.qtype != QuantType.Q8_0:
            self.weight = QTensor(widen_to_q8_0(w.data, w.qtype), QuantType.Q8_0, w.shape)
        self.byte_twin = LEGACY_TWINS.get(w.qtype, w.qtype) in BYTE_TWIN_TYPES

    def prepare(self, device: torch.device, cpu_kernels: str = "fast") -> None:
        """Move the weight to `device` in the form its kernels read (once, at load)."""
        if device.type == "cuda" and self.in_features % 32:
            # Widths no real model has (tiny test models): the Triton kernels step K by 32;
            # a float32 matrix and torch's matmul instead.
            self.packed = self.dense_weight().to(device)
            self.kernel = "dense"
            self._drop_blocks()
        elif device.type == "cuda":
            from llamapy.kernels.triton.qmatmul import pack_weight

            data = self.weight.data.to(device, non_blocking=True)
            self.packed = pack_weight(
                data, self.weight.qtype, self.weight.shape, self.byte_twin, self.legacy_twin
            )
            self.kernel = "triton"
            # the packed arrays are the weight now: keep no second copy on the GPU
            self._drop_blocks()
        elif cpu_kernels == "fast":
            from llamapy.kernels.cpu.qmatmul import pack_weight_cpu

            self.packed = pack_weight_cpu(self.weight.data, self.weight.qtype, self.weight.shape)
            self.kernel = "cpu"
            self._drop_blocks()
        elif cpu_kernels == "ggml":
            from llamapy.kernels.cpu.ggml_numerics import pack_weight_ggml

            self.packed = pack_weight_ggml(self.weight.data, self.weight.qtype, self.weight.shape)
            self.kernel = "ggml"
            self._drop_blocks()
        if self.bias is not None:
            self.bias = self.bias.to(device)

    def _drop_blocks(self) -> None:
        """The packed copy is the weight now: keep no reference to the ggml blocks (a view
        of them, even empty, would keep a fused layer's concatenated copy alive)."""
        data = self.weight.data
        empty = torch.empty((0, *data.shape[1:]), dtype=data.dtype, device=data.device)
        self.weight = QTensor(empty, self.weight.qtype, (0, self.in_features))

    def dense_weight(
        self, rows: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        data = self.weight.data if rows is None else self.weight.data[rows]
        return dequantize(data, self.weight.qtype, dtype)

    def forward(
        self,
        x: torch.Tensor | DecodeSplits,
        *,
        norm_weight: torch.Tensor | None = None,
        eps: float | None = None,
        act: str | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y = x W^T (+ b). The keywords are the Triton matmul's fused forms (the CUDA decode
        step; see `kernels.triton.qmatmul.qmatmul`): RMSNorm or gated activation of x inside
        the matmul, `residual += y` in place. x may be a CUDA decode attention's unmerged
        key splits (`DecodeSplits`): the Triton GEMV merges them as it loads x."""
        if self.kernel == "triton":
            from llamapy.kernels.triton.qmatmul import qmatmul

            return qmatmul(
                x, self.packed, self.bias, norm_weight=norm_weight, eps=eps, act=act,
                residual=residual,
            )  # fmt: skip
        if not isinstance(x, torch.Tensor):  # a decode attention's unmerged key splits
            x = x.merged().reshape(x.shape)
        if norm_weight is not None or act is not None or residual is not None:
            raise ValueError(
                f"fused matmul forms need the Triton kernels; this layer runs {self.kernel}"
            )
        if self.kernel == "dense":
            return torch.nn.functional.linear(x.to(self.packed.dtype), self.packed, self.bias)
        if self.kernel == "cpu":
            from llamapy.kernels.cpu.qmatmul import qmatmul_cpu

            return qmatmul_cpu(x, self.packed, self.bias)
        if self.kernel == "ggml":
            from llamapy.kernels.cpu import ggml_numerics

            numerics = ggml_numerics.active() or ggml_numerics.ALL
            return ggml_numerics.ggml_matmul(x, self.packed, self.bias, numerics)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        # (T, in) @ (in, out) in row chunks of W
        n = self.out_features
        if n <= self.CHUNK_ROWS:
            y = x @ self.dense_weight(dtype=x.dtype).T
        else:
            y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
            for start in range(0, n, self.CHUNK_ROWS):
                rows = slice(start, min(start + self.CHUNK_ROWS, n))
                torch.matmul(x, self.dense_weight(rows, x.dtype).T, out=y[..., rows])
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, {self._weight.qtype.name}, {self.kernel}"
        )


def embedding_lookup(
    weight: QTensor, ids: torch.Tensor, dtype: torch.dtype, scale: float | None = None
) -> torch.Tensor:
    """Rows `ids` of a (vocab, dim) quantized table, times `scale` if given: only the
    looked-up rows are dequantized (on CUDA in one Triton launch for the legacy, Q4_K, Q6_K and
    float types, kernels/triton/embedding.py; the same float32 values)."""
    if ids.is_cuda and weight.data.device == ids.device:
        from llamapy.kernels.triton import HAS_TRITON
        from llamapy.kernels.triton import embedding as triton_embedding

        supported = weight.qtype in triton_embedding.SUPPORTED and weight.data.dim() == 2
        if HAS_TRITON and supported and weight.data.is_contiguous():
            x = triton_embedding.embedding_rows(weight.data, weight.qtype, ids.contiguous(), scale)
            return x if dtype == torch.float32 else x.to(dtype)
    x = dequantize(weight.data[ids], weight.qtype, dtype)
    return x * scale if scale is not None else x
