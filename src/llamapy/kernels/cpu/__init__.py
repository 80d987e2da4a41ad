"""The measured-fastest CPU paths (torch ops and torch.compile'd kernels, no C extensions)."""

from llamapy.kernels.cpu.qmatmul import (
    CpuWeight,
    pack_weight_cpu,
    qmatmul_cpu,
    qmatmul_cpu_reference,
)

__all__ = ["CpuWeight", "pack_weight_cpu", "qmatmul_cpu", "qmatmul_cpu_reference"]
