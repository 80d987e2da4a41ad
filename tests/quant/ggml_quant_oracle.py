"""Test-only oracle: llama.cpp's own quantizer, `ggml_quantize_chunk`, through ctypes.

The ggml shared library comes with llama-cpp-python (not a llamapy dependency); `load()`
returns None when it is not installed, so tests that need it skip.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from llamapy.quant.types import QuantType, row_nbytes


@functools.cache
def load() -> ctypes.CDLL | None:
    """libggml-base from the llama_cpp package, or None when llama-cpp-python is missing."""
    try:
        import llama_cpp
    except ImportError:
        return None
    libdir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
    if not candidates:
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def quantize_chunk(
    x: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """ggml_quantize_chunk over all rows of `x` (R, n) float32 -> (R, row_bytes) uint8."""
    lib = load()
    if lib is None:
        raise RuntimeError("llama-cpp-python is not installed")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, row_nbytes(qtype, n)), dtype=np.uint8)
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert qw.shape == (n,)
    lib.ggml_quantize_chunk(
        int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
        None if qw is None else qw.ctypes.data,
    )  # fmt: skip
    return out
