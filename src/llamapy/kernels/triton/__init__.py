"""Triton kernels for CUDA GPUs.

Each module keeps a kernel beside a thin launcher (shape, dtype and stride checks) and a
torch reference of the same signature. Under `TRITON_INTERPRET=1` the same launchers run on
CPU tensors, which is how CI (no GPU) tests them on small shapes.
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton: the torch paths still work
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device) -> bool:
    """Whether Triton kernels can run on tensors of `device`: CUDA with triton, or any device
    under the interpreter."""
    import torch

    if not HAS_TRITON:
        return False
    return INTERPRET or torch.device(device).type == "cuda"
