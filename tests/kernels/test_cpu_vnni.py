"""The AVX512-VNNI CPU matmul (kernels/cpu/vnni.py) against float64 oracles, fresh inputs.

Oracle: W from gguf-py's own quantizer and dequantizer (`gguf.quants`), x through
llama.cpp's activation quantizers as kernels/cpu/ggml_numerics.py emulates them (checked
there against llama.cpp's compiled ones), the product in float64. The kernel's integer dots
are exact; what is left is float32 arithmetic: per block one product of fp16 scales and a
float32 multiply-add into the output's lane. Bound: 1e-5 x (|x_q| @ |W|^T), some 50 float32
roundings of the terms' magnitudes at these sizes (a wrong nibble, quad, scale or offset
moves an output by ~1e-2 of it or more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llamapy.kernels.cpu import vnni
from llamapy.kernels.cpu.ggml_numerics import quantize_q8_0, quantize_q8_K
from llamapy.quant.types import QuantType

pytestmark = pytest.mark.skipif(
    not vnni.available(),
    reason="needs numba and an x86 CPU with AVX512-VNNI (the kernels are that instruction)",
)

TYPES = [*vnni.LAYOUTS, QuantType.Q4_K, QuantType.Q6_K]
K_QUANTS = (QuantType.Q4_K, QuantType.Q6_K)
LEGACY = list(vnni.LAYOUTS)
REL_TOL = 1e-5


def _blocks(rng: np.random.Generator, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """gguf-py's blocks of a random (N, K) weight, rows of different magnitudes; Q4_K and
    Q6_K (gguf-py does not quantize them): random bytes with moderate fp16 d (and dmin)."""
    if qtype in K_QUANTS:
        size, d_offsets = (144, (0, 2)) if qtype == QuantType.Q4_K else (210, (208,))
        blocks = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
        for off in d_offsets:
            d = (rng.standard_normal(blocks.shape[0]) * 1e-2).astype(np.float16)
            blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
        return torch.from_numpy(blocks).view(n, -1)
    w = rng.standard_normal((n, k)).astype(np.float32) * 10.0 ** rng.uniform(-3, 0, (n, 1))
    q = gguf_quants.quantize(w, GGMLQuantizationType[qtype.name])
    return torch.from_numpy(np.ascontiguousarray(q)).view(torch.uint8).view(n, -1)


def _oracle(x: torch.Tensor, blocks: torch.Tensor, qtype: QuantType) -> tuple:
    """(float64 x_q @ W^T, |x_q| @ |W|^T) with x_q llama.cpp's 8-bit x (Q8_0's values; Q8_1
    has the same quants and scales; the K-quants': Q8_K's)."""
    n = blocks.shape[0]
    w = gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype.name])
    w = torch.from_numpy(w).double().view(n, -1)
    m, k = x.shape
    if qtype == QuantType.Q6_K:  # llama.cpp's Q8_K activations (per 256)
        q, d, _ = quantize_q8_K(x)
    else:
        q, d = quantize_q8_0(x)
    xq = (q.double() * d.double()[:, None]).view(m, k)
    return xq @ w.T, xq.abs() @ w.abs().T


def _check(y: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, qtype: QuantType) -> None:
    exact, scale = _oracle(x, blocks, qtype)
    assert y.shape == exact.shape and y.dtype == torch.float32
    excess = ((y.double() - exact).abs() - REL_TOL * scale).max().item()
    assert excess <= 0, f"an output is {excess:.3g} past its bound"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        (1, 16, 32), (1, 17, 96), (2, 40, 640), (3, 33, 256), (4, 48, 64), (5, 1, 128),
        (9, 64, 576), (17, 24, 64), (40, 33, 128),
    ],
)  # fmt: skip
def test_matches_llama_cpp_dot_products(rng, qtype, m, n, k) -> None:
    """Every tile kernel (1-4 rows of x, and 5 / 9 rows as 4 + 1), a partial last tile
    (N % 16), one block (K = 32) and an odd number of blocks (Q4_K, Q6_K: K scaled to
    their 256-weight super-blocks, 1 to 3 of them); x quantized inside the op (up to
    X_IN_OP_MAX_M rows) and by `quantize_x` (17 and 40 rows)."""
    if qtype in K_QUANTS:
        k = 256 * (1 + k % 3)
    blocks = _blocks(rng, qtype, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    y = vnni.vnni_mm(x, vnni.pack(blocks, qtype, n, k), qtype, n)
    _check(y, x, blocks, qtype)


@pytest.mark.parametrize(
    "qtype", [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q4_K, QuantType.Q6_K], ids=lambda q: q.name
)
def test_in_op_quantization_is_quantize_x(rng, qtype) -> None:
    """The op's own quantization of x (numba, decode) gives the bits of `quantize_x` (torch,
    checked against llama.cpp's quantizer in test_ggml_numerics): the same outputs, over
    rows whose block scales fall in fp16's subnormal range, at its largest finite values,
    on fp16 ties, on rounding ties of x * 127 / amax, and for zeros."""
    n, k = 16, 32 * 40
    tiles = vnni.pack(_blocks(rng, qtype, n, k), qtype, n, k)
    x = torch.from_numpy(rng.standard_normal((8, k), dtype=np.float32))
    x[0] *= 1e-4  # dx = amax / 127 below 2^-14: fp16 subnormals
    x[1] *= 1e-7
    x[2] = torch.from_numpy(rng.uniform(6e6, 8.3e6, k).astype(np.float32))  # dx near 65504
    x[3] = torch.from_numpy(rng.integers(-254, 255, k).astype(np.float32) / 2)  # .5 ties
    x[3, ::32] = 127.0  # amax 127: x * 127 / amax = x, so the halves are exact ties
    x[4] = 0
    x[5, :64] = 0
    x[6] *= 1e3
    x[7, :64] = x[7, :64].clamp(-100, 100)  # fp16 ties of dx = amax / 127: half to even
    x[7, 0] = 127.0 * (1 + 2.0**-11)  # -> 1.0
    x[7, 32] = 127.0 * (1 + 3 * 2.0**-11)  # -> 1 + 2^-9
    want = torch.ops.llamapy.vnni_mm(*vnni.quantize_x(x, qtype), tiles, int(qtype), n)
    for rows in (x, x[:1], x[3:5]):
        got = torch.ops.llamapy.vnni_mm_x(rows.contiguous(), tiles, int(qtype), n)
        lo = 0 if rows is x else (0 if rows.shape[0] == 1 else 3)
        assert torch.equal(got, want[lo : lo + rows.shape[0]])


def test_q6_k_activations_are_llama_cpp_q8_k(rng) -> None:
    """Q6_K's x is llama.cpp's Q8_K (ggml_numerics.quantize_q8_K, checked there against
    llama.cpp's quantizer): the same quants, d in every 32-block's dx, and the per-16 sums
    (bsums) times -32 in the bias and cx planes."""
    x = torch.from_numpy(rng.standard_normal((3, 512), dtype=np.float32))
    x[1, :256] = 0  # a zero super-block: d 0
    x[2, 7] = -x[2, :256].abs().max() * 2  # the largest magnitude negative: q -127
    q, scales = vnni.quantize_x(x, QuantType.Q6_K)
    want_q, want_d, bsums = quantize_q8_K(x)
    assert torch.equal(q.view(-1, 256), want_q)
    dx, bias, cx = scales[:, 0], scales[:, 1].view(torch.int32), scales[:, 2]
    assert torch.equal(dx.reshape(-1, 8), want_d[:, None].expand(-1, 8))
    halves = bsums.view(3, -1, 2).int()  # per 32-block: its two 16s
    assert torch.equal(bias, -32 * halves[..., 0])
    assert torch.equal(cx, (-32 * halves[..., 1]).float())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_extreme_activations(rng, qtype) -> None:
    """Zero rows (amax 0: q = 0, dx = 0), a row of one spike per block, large and tiny
    magnitudes: the 8-bit quantization of x is per block, so each scale is its own."""
    n, k = 32, 512
    blocks = _blocks(rng, qtype, n, k)
    x = torch.from_numpy(rng.standard_normal((4, k), dtype=np.float32))
    x[0] = 0
    x[1] = 0
    x[1, ::32] = 3.0
    x[2] *= 1e4
    x[3] *= 1e-4
    y = vnni.vnni_mm(x, vnni.pack(blocks, qtype, n, k), qtype, n)
    assert torch.equal(y[0], torch.zeros(n))
    _check(y, x, blocks, qtype)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_pack_moves_bytes_only(rng, qtype) -> None:
    """The tiles hold the blocks' bytes, rearranged as documented: rebuilt here by an
    independent loop over rows and blocks (rows past N are zero), the 5-bit types' high
    bits bit by bit."""
    n, k = 21, 96
    blocks = _blocks(rng, qtype, n, k).numpy()
    tiles = vnni.pack(torch.from_numpy(blocks), qtype, n, k).numpy()
    bs, d_off, m_off, h_off, q_off = vnni.LAYOUTS[qtype]
    tb, td, tm, th, tq, quads = vnni.tile_layout(qtype)
    assert tiles.shape == (2, k // 32 * tb)
    for row in range(32):
        t, i = divmod(row, 16)
        for b in range(k // 32):
            rec = tiles[t, b * tb : (b + 1) * tb]
            blk = blocks[row, b * bs : (b + 1) * bs] if row < n else np.zeros(bs, np.uint8)
            assert (rec[td + 2 * i : td + 2 * i + 2] == blk[d_off : d_off + 2]).all()
            if m_off >= 0:
                assert (rec[tm + 2 * i : tm + 2 * i + 2] == blk[m_off : m_off + 2]).all()
            if h_off >= 0:
                qh = int.from_bytes(blk[h_off : h_off + 4].tobytes(), "little")
                word = int.from_bytes(rec[th + 4 * i : th + 4 * i + 4].tobytes(), "little")
                for j in range(32):  # weight j's fifth bit: byte e of quad q, low or high
                    q, e = divmod(j % 16, 4)
                    assert (word >> (8 * e + 4 * (j >= 16) + q)) & 1 == (qh >> j) & 1
            for quad in range(quads):
                got = rec[tq + 64 * quad + 4 * i : tq + 64 * quad + 4 * i + 4]
                assert (got == blk[q_off + 4 * quad : q_off + 4 * quad + 4]).all()


def test_threads_do_not_change_results(rng) -> None:
    """Tiles are split across torch's threads; each output is one tile's sums, so any
    thread count gives the same bits."""
    n, k = 160, 512
    blocks = _blocks(rng, QuantType.Q4_0, n, k)
    tiles = vnni.pack(blocks, QuantType.Q4_0, n, k)
    x = torch.from_numpy(rng.standard_normal((3, k), dtype=np.float32))
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(vnni.vnni_mm(x, tiles, QuantType.Q4_0, n))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_compiled_graph_calls_the_op(rng) -> None:
    """Inside torch.compile (the CPU decode step) the op is one opaque call, and with the
    decode step's Inductor options (`emulate_precision_casts`: Inductor otherwise drops the
    fp16 rounding of each block's dx) the whole matmul, x's quantization included, gives
    the eager bits."""
    from llamapy.models.cpu_compile import INDUCTOR_OPTIONS

    n, k = 48, 128
    blocks = _blocks(rng, QuantType.Q8_0, n, k)
    tiles = vnni.pack(blocks, QuantType.Q8_0, n, k)
    x = torch.from_numpy(rng.standard_normal((2, k), dtype=np.float32))

    def f(x):
        return vnni.vnni_mm(x * 2.0, tiles, QuantType.Q8_0, n) + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=False, options=INDUCTOR_OPTIONS)
    assert torch.equal(compiled(x), f(x))


def test_qmatmul_takes_vnni_and_the_switch_turns_it_off(rng, monkeypatch) -> None:
    from llamapy.kernels.cpu.qmatmul import pack_weight_cpu, qmatmul_cpu

    n, k = 32, 128
    blocks = _blocks(rng, QuantType.Q4_1, n, k)
    w = pack_weight_cpu(blocks, QuantType.Q4_1, (n, k))
    assert w.method == "vnni" and w.nbytes == blocks.nbytes  # 16-row tiles: no padding here
    x = torch.from_numpy(rng.standard_normal((3, k), dtype=np.float32))
    bias = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    y = qmatmul_cpu(x, w, bias)
    exact, scale = _oracle(x, blocks, QuantType.Q4_1)
    assert ((y.double() - exact - bias.double()).abs() <= REL_TOL * scale + 1e-6).all()
    monkeypatch.setenv("LLAMAPY_CPU_VNNI", "0")
    assert not vnni.available()
    assert pack_weight_cpu(blocks, QuantType.Q4_1, (n, k)).method == "int4pack"


def test_q6_k_takes_the_tiles_only_when_switched_on(rng, monkeypatch) -> None:
    """Q6_K tiles are opt-in (LLAMAPY_CPU_VNNI_Q6K=1: see vnni.K_QUANTS for why); on, a
    Q6_K weight packs to tiles and multiplies as the oracle does."""
    from llamapy.kernels.cpu.qmatmul import pack_weight_cpu, qmatmul_cpu

    n, k = 40, 512
    blocks = _blocks(rng, QuantType.Q6_K, n, k)
    monkeypatch.delenv("LLAMAPY_CPU_VNNI_Q6K", raising=False)
    assert pack_weight_cpu(blocks, QuantType.Q6_K, (n, k)).method != "vnni"
    monkeypatch.setenv("LLAMAPY_CPU_VNNI_Q6K", "1")
    w = pack_weight_cpu(blocks, QuantType.Q6_K, (n, k))
    assert w.method == "vnni"
    x = torch.from_numpy(rng.standard_normal((2, k), dtype=np.float32))
    _check(qmatmul_cpu(x, w), x, blocks, QuantType.Q6_K)


def test_packing_in_row_chunks_gives_the_same_bytes(rng) -> None:
    from llamapy.kernels.cpu.qmatmul import _pack_vnni_in_chunks

    n, k = 16 * 9 + 5, 64
    blocks = _blocks(rng, QuantType.Q8_0, n, k)
    whole = vnni.pack(blocks, QuantType.Q8_0, n, k)
    assert torch.equal(_pack_vnni_in_chunks(blocks, QuantType.Q8_0, n, k, chunk=32), whole)


def test_kernels_are_loaded_from_numba_disk_cache(tmp_path) -> None:
    """The compiled kernels carry no process-specific address (libgomp is called by name),
    so a second process loads them from numba's cache instead of compiling (~1 s a type):
    a ctypes pointer compiled in again would make numba refuse to cache them."""
    import os
    import subprocess
    import sys

    probe = (
        "from numba.core import caching\n"
        "from llamapy.kernels.cpu import _vnni_numba as kernels\n"
        "from llamapy.quant.types import QuantType\n"
        "loads = []\n"
        "original = caching.Cache.load_overload\n"
        "def load(self, *args, **kwargs):\n"
        "    out = original(self, *args, **kwargs)\n"
        "    loads.append(out is not None)\n"
        "    return out\n"
        "caching.Cache.load_overload = load\n"
        "kernels.runner(int(QuantType.Q4_0))\n"
        "kernels._launch.compile('(' + ','.join(['int64'] * 10) + ')')\n"
        "print(sum(loads), len(loads))\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))

    def run() -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
        hits, lookups = map(int, out.stdout.split()[-2:])
        return hits, lookups

    assert run() == (0, 2)  # the worker and the launcher: compiled and stored
    assert any(tmp_path.rglob("*.nbc")), "numba stored no compiled kernel"
    assert run() == (2, 2)  # a new process: both loaded
