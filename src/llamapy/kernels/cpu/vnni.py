"""Integer dot-product matmuls on x86 CPUs with AVX512-VNNI, compiled by numba from Python.

llama.cpp's CPU matmul quantizes each row of x to 8 bits per 32-block (its `vec_dot_type`,
Q8_0 or Q8_1) and multiplies the weight's integer quants with it in integer arithmetic.
This module does the same with `vpdpbusd` (64 unsigned-by-signed byte products into 16
int32 lanes per instruction; ATen's int4 kernel instead converts every weight to float):

    y[m, n] = sum_b  dw[n, b] * dx[m, b] * (isum[m, n, b] + bias[m, b])  +  cw[n, b] * cx[m, b]

with `isum` the exact integer dot of block b's unsigned weight codes u with x's int8 quants
q, and the weight type's offset folded into the integer `bias` or the float `cx` term:

    type          u (weight codes, unsigned)           bias              cw   cx
    Q4_0 / Q5_0   4 / 5-bit code, w = d (u - 8 / 16)   -8 / -16 sum(q)   -    0
    Q4_1 / Q5_1   4 / 5-bit code, w = d u + m          0                 m    dx sum(q)
    Q8_0          q + 128, w = d q                     -128 sum(q)       -    0
    Q4_K          nibble, w = d sc_j u - dmin m_j      0                 per sub-block j:
                  (dw = d sc_j per 32-weight sub-block)                  -dmin m_j, dx sum(q)

x is quantized as llama.cpp's x86 `quantize_row_q8_0` does (kernels/cpu/ggml_numerics.py,
checked there against llama.cpp's own quantizer): dx = fp16(amax / 127),
q = round-half-even(x * 127 / amax). (For Q4_1 / Q5_1 llama.cpp's Q8_1 adds m times an
fp16 `s` = d * sum(q), which overflows at |x| > ~2047; cx here is float32 dx * sum(q).)
For Q6_K x is llama.cpp's Q8_K instead: one float32 scale per 256 (`_quantize_x_q8_k`).
So the matmul is llama.cpp's up to float32 summation order, except Q4_K's x, quantized per
32 here (llama.cpp: Q8_K; see K_QUANTS).

Weights are repacked once at load (`pack`) into tiles of 16 rows: per 32-block, the 16
rows' fp16 scales (and mins, and the 5-bit types' high bits) side by side, then the quants
as 64-byte vectors of one 4-byte quad from each row. The kernel (_vnni_numba.py, LLVM IR
built in Python through numba's `intrinsic`: the VNNI instruction has no Python spelling)
`vpdpbusd`s each quad vector with x's matching quad broadcast to all lanes, so the 16 lanes
are the tile's 16 outputs: no horizontal sums, and one pass over a tile serves up to 4 rows
of x. Tiles run in parallel on torch's own OpenMP threads (`torch.get_num_threads()`).

Available where numba imports, torch ships its libgomp and the host CPU has AVX512-VNNI,
-BW and -VL (`available()`); `LLAMAPY_CPU_VNNI=0` turns it off (then the int4pack path).
"""

from __future__ import annotations

import functools
import os

import torch

from llamapy.quant.kquants import _k_scale_min
from llamapy.quant.types import QuantType
from llamapy.switches import switched_off, switched_on

# Weight types this module multiplies, with their ggml block layout: bytes per 32-block, the
# offsets of the fp16 scale d, of the fp16 min m (-1: none), of the 32 high bits qh of the
# 5-bit types (-1: none) and of the quants.
LAYOUTS: dict[QuantType, tuple[int, int, int, int, int]] = {
    QuantType.Q4_0: (18, 0, -1, -1, 2),
    QuantType.Q4_1: (20, 0, 2, -1, 4),
    QuantType.Q5_0: (22, 0, -1, 2, 6),
    QuantType.Q5_1: (24, 0, 2, 4, 8),
    QuantType.Q8_0: (34, 0, -1, -1, 2),
}
# Q4_K: per 256-weight super-block, 16 rows' fp16 d and dmin, their 8 six-bit sub-block
# scales and mins unpacked to bytes, then the quants' quads (4 chunks x 8 quads x 64 bytes)
Q4K_TILE = (32 + 32 + 128 + 128 + 2048, 0, 32, 64, 192, 320)  # bytes, d, dmin, sc, m, qs
# Q6_K: per 256-weight super-block, 16 rows' fp16 d, their 16 int8 scales (one per 16
# weights: group g of rows 0..15 at 16 g), then per half of 128 weights and pair p of its
# low-bit quads 64 bytes of the pair's fifth and sixth bits (`q6k_high_words`), the two
# quads of the 4-bit parts (ql as stored: low nibbles weights b.., high nibbles b + 64..)
Q6K_TILE = (32 + 256 + 2 * 8 * (64 + 2 * 64), 0, 32, 288)  # bytes, d, scales, first pair
# the offset term per 32-block of x (times sum(q)) of the types whose weights are d (u - o)
OFFSETS = {QuantType.Q4_0: -8, QuantType.Q5_0: -16, QuantType.Q8_0: -128}
# Q6_K's weights are d sc (u - 32) per 16: its x planes hold -32 sum(q) of each 16-half
Q6K_OFFSET = -32
K_QUANTS = (QuantType.Q4_K, QuantType.Q6_K)
# Q6_K's x is quantized per 256, as llama.cpp's Q8_K (`quantize_x`). Q4_K's stays per 32
# (finer than llama.cpp's Q8_K): measured on Gemma 3, Q8_K for Q4_K moved perplexity
# against llama.cpp from -0.40% to -0.55%, KL 5.97e-3 -> 6.11e-3, greedy 3/5 -> 2/5.
# Q6_K weights take the tiles only with LLAMAPY_CPU_VNNI_Q6K=1 (else int4pack). With them on
# the tiles, Gemma 3 Q4_K_M (ffn_down Q6_K) on an AMX host: decode +0-10%, prefill unchanged
# (int4pack's is a bf16 GEMM, on AMX there), perplexity against llama.cpp -0.40% -> -0.10%,
# KL unchanged (5.97e-3), top-1 95.80% -> 95.61%, greedy 3/5 -> 1/5. Not the default: its
# per-256 activation scales make a quantization flip larger, and the compiled decode step's
# final hidden states then differ from eager ones by up to 0.10 (relative; 1 of 3 runs of
# test_compiled_decode_matches_eager, bound 0.05) where they stay within 0.019-0.035 without.
TILE_N = 16  # weight rows per tile: the 16 int32 / float32 lanes of a 512-bit register
TILE_M = 4  # rows of x per pass over a tile
# torch's own OpenMP runtime: the kernels run on its thread pool (see _vnni_numba.py).
GOMP_PATH = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")


def _switched_on() -> bool:
    return not switched_off("LLAMAPY_CPU_VNNI")


@functools.cache
def _host_has_vnni() -> bool:
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return False
    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512vnni", "avx512bw", "avx512vl"))


@functools.cache
def _numba_imports() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """Whether the VNNI kernels can run here (numba, AVX512-VNNI, torch's libgomp, not
    switched off)."""
    return _switched_on() and os.path.exists(GOMP_PATH) and _numba_imports() and _host_has_vnni()


def supported(qtype: QuantType) -> bool:
    """Whether a weight of `qtype` can take these kernels (here, now)."""
    if qtype == QuantType.Q6_K and not switched_on("LLAMAPY_CPU_VNNI_Q6K"):
        return False  # opt-in: see K_QUANTS
    return (qtype in LAYOUTS or qtype in K_QUANTS) and available()


# -- the weight layout ---------------------------------------------------------------------


def tile_layout(qtype: QuantType) -> tuple[int, int, int, int, int, int]:
    """(bytes per tile-block, offsets of the 16 fp16 d, of the 16 fp16 m (-1: none), of the
    16 rows' high-bit words (-1: none), of the quant quads, number of 4-byte quads)."""
    bs, _, m_off, h_off, _ = LAYOUTS[qtype]
    m_tile = 32 if m_off >= 0 else -1
    h_tile = 32 + 32 * (m_off >= 0) if h_off >= 0 else -1
    q_tile = 32 + 32 * (m_off >= 0) + 64 * (h_off >= 0)
    quads = 8 if qtype == QuantType.Q8_0 else 4
    return TILE_N * bs, 0, m_tile, h_tile, q_tile, quads


def high_bit_words(qh: torch.Tensor) -> torch.Tensor:
    """Q5 blocks' qh (..., 4) uint8 (bit j: the fifth bit of weight j) -> the tiles' form
    (..., 4) uint8: bit 8e + j of the word holds weight 4j + e's bit (j < 4, the low nibbles
    of quad j) and bit 8e + 4 + j weight 16 + 4j + e's (the high nibbles), so that the kernel
    moves quad j's bits to bit 4 of each byte with one shift and one mask."""
    h = qh.to(torch.int64)
    h = h[..., 0] | h[..., 1] << 8 | h[..., 2] << 16 | h[..., 3] << 24
    out = torch.zeros_like(h)
    for j in range(4):
        for e in range(4):
            out |= ((h >> (4 * j + e)) & 1) << (8 * e + j)
            out |= ((h >> (16 + 4 * j + e)) & 1) << (8 * e + 4 + j)
    return torch.stack([(out >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)


def tile_row_bytes(qtype: QuantType, k: int) -> int:
    """Bytes of one 16-row tile of a K-wide weight (16 rows' ggml blocks; Q4_K: plus the
    sub-block scales unpacked, 64 bytes a tile's super-block)."""
    if qtype == QuantType.Q4_K:
        return k // 256 * Q4K_TILE[0]
    if qtype == QuantType.Q6_K:
        return k // 256 * Q6K_TILE[0]
    return k // 32 * TILE_N * LAYOUTS[qtype][0]


def _tile_blocks(data: torch.Tensor, n: int, kb: int, bs: int) -> torch.Tensor:
    """W's blocks (N, kb * bs bytes) as (tiles, kb, 16 rows, bs), rows past N zero."""
    tiles = -(-n // TILE_N)
    blocks = data.view(n, kb, bs)
    if tiles * TILE_N != n:
        blocks = torch.cat([blocks, blocks.new_zeros(tiles * TILE_N - n, kb, bs)])
    return blocks.view(tiles, TILE_N, kb, bs).transpose(1, 2)


def pack(data: torch.Tensor, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """W's ggml blocks (N, row bytes) uint8 -> tiles (ceil(N/16), K/32 * 16 * block bytes):
    per 16 rows and 32-block, the rows' 16 fp16 d, (Q4_1, Q5_1) their 16 fp16 m, (Q5_0,
    Q5_1) their high bits as 16 words (`high_bit_words`), then per 4-byte quad of the
    block's quants 64 bytes: the quad of row 0, of row 1, ... (rows past N are zero). The
    bytes are the blocks' (the high bits permuted within each word); nothing is rounded."""
    if qtype == QuantType.Q4_K:
        return _pack_q4_k(data, n, k)
    if qtype == QuantType.Q6_K:
        return _pack_q6_k(data, n, k)
    bs, d_off, m_off, h_off, q_off = LAYOUTS[qtype]
    kb = k // 32
    blocks = _tile_blocks(data, n, kb, bs)  # (tiles, kb, 16, bs)
    tiles = blocks.shape[0]
    parts = [blocks[..., d_off : d_off + 2]]
    if m_off >= 0:
        parts.append(blocks[..., m_off : m_off + 2])
    if h_off >= 0:
        parts.append(high_bit_words(blocks[..., h_off : h_off + 4]))
    quads = blocks[..., q_off:].reshape(tiles, kb, TILE_N, -1, 4).transpose(2, 3)
    parts.append(quads)
    flat = [p.reshape(tiles, kb, -1) for p in parts]
    return torch.cat(flat, dim=2).reshape(tiles, kb * TILE_N * bs).contiguous()


def _pack_q4_k(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Q4_K blocks (N, K/256 * 144) -> tiles (ceil(N/16), K/256 * Q4K_TILE[0]): per 16 rows
    and super-block their fp16 d, their fp16 dmin, their sub-block scales (8 x 16 bytes:
    sub-block j of rows 0..15), their mins (likewise), then for each 32-byte chunk c of the
    quants (low nibbles: sub-block 2c, high: 2c + 1) and quad q, the quad of rows 0..15."""
    kb = k // 256
    blocks = _tile_blocks(data, n, kb, 144)  # (tiles, kb, 16, 144)
    tiles = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[..., 4:16].reshape(-1, 12))
    sc = sc.to(torch.uint8).view(tiles, kb, TILE_N, 8).transpose(2, 3)
    mn = mn.to(torch.uint8).view(tiles, kb, TILE_N, 8).transpose(2, 3)
    quads = blocks[..., 16:].reshape(tiles, kb, TILE_N, 4, 8, 4).permute(0, 1, 3, 4, 2, 5)
    parts = [blocks[..., 0:2], blocks[..., 2:4], sc, mn, quads]
    flat = [p.reshape(tiles, kb, -1) for p in parts]
    return torch.cat(flat, dim=2).reshape(tiles, kb * Q4K_TILE[0]).contiguous()


def q6k_high_words(qh: torch.Tensor) -> torch.Tensor:
    """Q6_K's qh (..., 2, 32) uint8 (per 128-weight half: weight 32 c + l's two high bits at
    bits 2c, 2c + 1 of qh[l]) -> (..., 2, 8, 4) uint8: per half and pair p of low-bit quads
    (weights 8p.. and 8p + 4.. in the low nibbles, + 64 in the high), byte i holds the high
    bits of weights 8p + i (bits 0-1), 8p + 64 + i (2-3), 8p + 4 + i (4-5) and 8p + 68 + i
    (6-7): each quad's codes are its nibbles OR-ed with one shift and mask of the word."""
    bits = (qh[..., None, :].to(torch.int32) >> (2 * torch.arange(4)[:, None])) & 3
    hi2 = bits.reshape(*qh.shape[:-1], 128)  # [.., 32 c + l]: weight 32 c + l's bits
    p, i = torch.arange(8)[:, None], torch.arange(4)[None, :]
    parts = [
        hi2[..., 8 * p + i + off] << shift for off, shift in ((0, 0), (64, 2), (4, 4), (68, 6))
    ]
    return (parts[0] | parts[1] | parts[2] | parts[3]).to(torch.uint8)


def _pack_q6_k(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Q6_K blocks (N, K/256 * 210: ql[128], qh[64], 16 int8 scales, fp16 d) -> tiles
    (ceil(N/16), K/256 * Q6K_TILE[0]), see Q6K_TILE. The quads are ql's bytes as stored."""
    kb = k // 256
    blocks = _tile_blocks(data, n, kb, 210)  # (tiles, kb, 16, 210)
    tiles = blocks.shape[0]
    scales = blocks[..., 192:208].transpose(2, 3)  # (tiles, kb, 16 groups, 16 rows)
    words = q6k_high_words(blocks[..., 128:192].reshape(tiles, kb, TILE_N, 2, 32))
    words = words.permute(0, 1, 3, 4, 2, 5)  # (tiles, kb, half, pair, 16 rows, 4)
    quads = blocks[..., :128].reshape(tiles, kb, TILE_N, 2, 8, 2, 4).permute(0, 1, 3, 4, 5, 2, 6)
    pairs = torch.cat([words.unsqueeze(4), quads], dim=4)  # (tiles, kb, 2, 8, 3, 16, 4)
    parts = [blocks[..., 208:210], scales, pairs]
    flat = [p.reshape(tiles, kb, -1) for p in parts]
    return torch.cat(flat, dim=2).reshape(tiles, kb * Q6K_TILE[0]).contiguous()


# -- x: llama.cpp's Q8_0 / Q8_1 activations ----------------------------------------------


def quantize_x(x: torch.Tensor, qtype: QuantType) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> (q (M, K) int8, scales (M, 3, K/32) float32: per 32-block dx,
    the int32 offset term `bias` (its bits), cx; see the module docstring)."""
    m, k = x.shape
    if qtype == QuantType.Q6_K:
        return _quantize_x_q8_k(x)
    xb = x.reshape(m, k // 32, 32).float()
    amax = xb.abs().amax(-1)
    inv = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None])  # half to even, as _mm256_round_ps
    d = amax / 127.0
    dx = d.to(torch.float16).float()
    qsum = q.sum(-1)  # exact in float32: |sum| <= 32 * 127
    if qtype in OFFSETS:
        bias = (OFFSETS[qtype] * qsum).to(torch.int32)
        cx = torch.zeros_like(dx)
    else:
        # llama.cpp's Q8_1 stores fp16(d * qsum), which overflows once a block's amax
        # passes ~2047; dx * qsum (float32) is the exact sum of the quantized x instead
        bias = torch.zeros_like(qsum, dtype=torch.int32)
        cx = dx * qsum
    scales = torch.stack([dx, bias.view(torch.float32), cx], dim=1)
    return q.to(torch.int8).view(m, k), scales


def _quantize_x_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_x` for Q6_K: llama.cpp's Q8_K, one scale per 256 (the element of largest
    magnitude, the first one, maps to -127; d = 1 / (-127 / max); q = min(127,
    round-half-even(x * -127 / max))), d repeated in each 32-block's dx, bias and cx
    -32 sum(q) of the 32-block's two 16s (Q6K_OFFSET)."""
    m, k = x.shape
    xb = x.reshape(m, k // 256, 256).float()
    idx = xb.abs().argmax(-1, keepdim=True)  # the first largest, as the C loop's `>`
    mx = xb.gather(-1, idx)[..., 0]
    nonzero = mx != 0
    iscale = torch.where(nonzero, torch.full_like(mx, -127.0) / mx, torch.zeros_like(mx))
    q = torch.round(xb * iscale[..., None]).clamp_max(127)
    d = torch.where(nonzero, torch.ones_like(mx) / iscale, torch.zeros_like(mx))
    dx = d.repeat_interleave(8, dim=-1)
    halves = q.view(m, k // 32, 2, 16).sum(-1) * Q6K_OFFSET  # per 16: its offset term
    bias, cx = halves[..., 0].to(torch.int32), halves[..., 1]
    scales = torch.stack([dx, bias.view(torch.float32), cx], dim=1)
    return q.to(torch.int8).view(m, k), scales


# Up to this many rows of x (decode), the op quantizes x itself (numba, ~1-3 us a row)
# instead of `quantize_x`'s torch ops, which Inductor fuses into single-threaded loops of
# ~7 us per matmul (measured in the compiled SmolLM2 decode step: 4 a layer).
X_IN_OP_MAX_M = 16


def vnni_mm(x: torch.Tensor, tiles: torch.Tensor, qtype: QuantType, n: int) -> torch.Tensor:
    """x (M, K) float32 @ W.T for W packed by `pack` -> (M, N) float32: llama.cpp's
    quantized dot products (see the module docstring)."""
    if x.shape[0] <= X_IN_OP_MAX_M:
        return torch.ops.llamapy.vnni_mm_x(x.float().contiguous(), tiles, int(qtype), n)
    q, scales = quantize_x(x, qtype)
    return torch.ops.llamapy.vnni_mm(q, scales, tiles, int(qtype), n)


# A plain library op, not `torch.library.custom_op`: its dispatch costs ~3 us a call instead
# of ~10 (measured), which counts at ~120 matmuls a decoded token.
_LIB = torch.library.Library("llamapy", "FRAGMENT")
_LIB.define("vnni_mm(Tensor q, Tensor scales, Tensor tiles, int qtype, int n) -> Tensor")
_LIB.define("vnni_mm_x(Tensor x, Tensor tiles, int qtype, int n) -> Tensor")


def _vnni_mm_cpu(
    q: torch.Tensor, scales: torch.Tensor, tiles: torch.Tensor, qtype: int, n: int
) -> torch.Tensor:
    # a decoded token makes ~120 of these calls: the Python here is kept to a few us
    m, k = q.shape
    t = tiles.shape[0]
    y = torch.empty(m, t * TILE_N, dtype=torch.float32)
    if m and t:
        if not (q.is_contiguous() and scales.is_contiguous()):
            q, scales = q.contiguous(), scales.contiguous()
        _numba().runner(qtype)(
            tiles.data_ptr(), t, q.data_ptr(), m, k, scales.data_ptr(), y.data_ptr(), 0,
            torch.get_num_threads(),
        )  # fmt: skip
    return y if t * TILE_N == n else y[:, :n].contiguous()


def _vnni_mm_x_cpu(x: torch.Tensor, tiles: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    m, k = x.shape
    t = tiles.shape[0]
    y = torch.empty(m, t * TILE_N, dtype=torch.float32)
    if m and t:
        if not x.is_contiguous():
            x = x.contiguous()
        _numba().runner(qtype)(
            tiles.data_ptr(), t, 0, m, k, 0, y.data_ptr(), x.data_ptr(), torch.get_num_threads()
        )
    return y if t * TILE_N == n else y[:, :n].contiguous()


def _vnni_mm_fake(
    q: torch.Tensor, scales: torch.Tensor, tiles: torch.Tensor, qtype: int, n: int
) -> torch.Tensor:
    return q.new_empty(q.shape[0], n, dtype=torch.float32)


def _vnni_mm_x_fake(x: torch.Tensor, tiles: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


_LIB.impl("vnni_mm", _vnni_mm_cpu, "CPU")
_LIB.impl("vnni_mm_x", _vnni_mm_x_cpu, "CPU")
torch.library.register_fake("llamapy::vnni_mm", _vnni_mm_fake, lib=_LIB)
torch.library.register_fake("llamapy::vnni_mm_x", _vnni_mm_x_fake, lib=_LIB)


# -- the kernels ---------------------------------------------------------------------------


@functools.cache
def _numba():
    """The numba kernels (kernels/cpu/_vnni_numba.py): each type's loaded from numba's disk
    cache or compiled at its first use."""
    if not available():
        raise RuntimeError(
            "the VNNI CPU kernels need numba, torch's bundled libgomp and a CPU with "
            "AVX512-VNNI (and LLAMAPY_CPU_VNNI not 0)"
        )
    from llamapy.kernels.cpu import _vnni_numba

    return _vnni_numba
