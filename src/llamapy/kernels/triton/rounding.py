"""float32 -> 16-bit rounding for the Triton kernels, one definition for all of them."""

from __future__ import annotations

from llamapy.kernels.triton import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def round_to(x, dtype: tl.constexpr, INTERP: tl.constexpr):
        """float32 x -> dtype, rounded to nearest even. The interpreter's own float32 ->
        bfloat16 cast truncates, so there the bits are rounded first (finite x)."""
        if INTERP and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)
