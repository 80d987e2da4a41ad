"""Decode GEMV over int8 codes of x made once, read by x-stationary tiles (Q4_0 / Q4_1 and
the Q4_K twins held as Q4_1 blocks; one row).

The float32-x decode GEMV (`qmatmul._gemv_kernel`) is bound by its issue slots (~7
instructions a weight). The int8-x form (dp4a) with x quantized in every program's prologue
did not pay, and in one level misses issue 6's logits bar. What does pay, measured on an H100
at the Llama-3.2-1B shapes (benchmarks/RESULTS.md, twenty-third session):

1. x quantized ONCE per matmul by a small kernel (`_quantize_kernel`), in two levels: codes
   c1 = rint(y / s1), s1 = amax / 127 per 32-block (llama.cpp's q8_1 activations), then the
   residual y - s1 c1 quantized the same way (s2, c2): y ~ s1 c1 + s2 c2, within ~1.5e-5 of
   each block's largest value. (One level, 254 times coarser, cost the 1B's decode logits
   their 99% top-1 agreement with the float32 reference; two keep the float32 path's.) The
   kernel applies the GEMV's prologue first (RMSNorm with its weight, or the SiLU /
   GELU-tanh gating of a [gate | up] row).
2. the GEMV reading those codes (`_codes_gemv_kernel`) with tiles whose BLOCK_B is 32 x
   num_warps, so that Triton's layout gives each thread one block's code words for all the
   program's rows (x read once a thread, from registers after): with rows spread over threads
   each thread re-read x's codes and the kernel was bound by L1 (ncu: 73% L1 throughput).
   Per block and level: two dp4a a word pair, the -8 offset of Q4_0 folded in with the codes'
   sum: d * s * (sum_j q_j c_j - 8 sum_j c_j); Q4_1's offset m adds m * s * sum_j c_j.

3. for K < 4096 (the 1B's gate_up and output matrix) the same product in a persistent,
   software-pipelined kernel (`_codes_gemv_pipe_kernel`): 16 one-warp programs an SM, each
   reading x's codes of all of K once into registers and walking two-row tiles, the next
   tile's loads issued before the current one is computed: on an H200 gate_up 9.22 -> 7.48
   us, the output matrix 54.88 -> 39.41, 1B tg128 +7.1% (twenty-sixth session). Long K
   (down) stays tiled for Q4_0 (its best persistent tile 6.02 us against 5.94); Q4_1's down
   takes the persistent form without PDL (6.08 against 7.47 us tiled; `Q41_PIPE_DEFAULT`).

4. Q6_K weights (the output matrix and about half the ffn_down of Q4_K_M files) in their own
   persistent kernel (`_q6k_pipe_kernel`): a 128-weight unit (half a super-block) is 16 ql
   words and 8 qh words; the nibbles and the two high bits make unsigned 6-bit bytes q, and
   per 16-weight sub-block d * sc * s * (sum_j q_j c_j - 32 sum_j c_j), the codes' sums over
   16 weights taken once a program. The K-quant GEMV (`qmatmul_kquants`) spends ~12
   instructions a weight on these; this ~2.

A 16-layer chain of the 1B's gate_up and down GEMVs with the quantizing launch before each
took 31.60 us a layer against 36.81 for the fused float32 GEMVs (qkv and o lose: their GEMVs
gain less than a launch costs, hence `MIN_WEIGHTS`); the output matrix 84.8 -> 56.7 us. In
the engine (H100, CUDA graphs): 1B tg128 +17% (Q4_0), +15% (Q4_1), +8% (Q4_K_M); one-token
decode logits against the CPU's float32 reference top-1 1.000, KL ~3e-7, as without codes.

`qmatmul` routes here (`takes`): CUDA, one row of float32 x, a Q4_0 / Q4_1 / Q6_K weight of
at least MIN_WEIGHTS weights with K >= MIN_K (the measured shapes), no bias, a card with dp4a,
and LLAMAPY_GPU_X_CODES not switched off (0 / false / no / off). Every fused form of `qmatmul`
is kept: the prologue in the quantizing kernel, the residual add in the GEMV's store.
"""

from __future__ import annotations

import functools
import os

import torch

from llamapy.kernels.triton import HAS_TRITON, INTERPRET, pdl
from llamapy.kernels.triton.packed import PackedWeight
from llamapy.quant.types import QuantType
from llamapy.switches import OFF_VALUES, switched_off

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llamapy.kernels.triton import qmatmul as qm

LEVELS = 2
QK = 32
# The shapes measured (1B: gate_up 16384 x 2048, down 2048 x 8192, output 128256 x 2048);
# below this many weights the quantizing launch costs more than the GEMV gains (qkv, o;
# measured before the quantizing kernel took part in PDL). LLAMAPY_GPU_X_CODES_MIN_WEIGHTS
# sets it, for A/B runs (the 1B's qkv has 6.3M weights, o 4.2M).


def _min_weights(env: str | None) -> int:
    if not env:
        return 1 << 24
    if not env.strip().isdigit():
        raise ValueError(f"LLAMAPY_GPU_X_CODES_MIN_WEIGHTS wants a weight count, got {env!r}")
    return int(env)


MIN_WEIGHTS = _min_weights(os.environ.get("LLAMAPY_GPU_X_CODES_MIN_WEIGHTS"))
MIN_K = 2048
TYPES = {QuantType.Q4_0: 0, QuantType.Q4_1: 1, QuantType.Q6_K: 2, QuantType.Q4_K: 3}  # -> QT
# the packed array holding each type's quants (not a byte twin's or a float form's)
_QUANTS = {QuantType.Q4_0: "qs", QuantType.Q4_1: "qs", QuantType.Q6_K: "ql", QuantType.Q4_K: "qs"}
# K-quant types with their own persistent kernel and tiles (None for a side: the K-quant GEMV)
_KQUANT_PIPES = (QuantType.Q6_K, QuantType.Q4_K)
# x-stationary tiles of the H100 sweep (`benchmarks/kernels/q8x_lab.py --stationary`):
# (BLOCK_N, BLOCK_B, num_warps), K split never paid; long K (down): one row, 128 blocks.
_TILE = (2, 32, 1)
_TILE_LONG_K = (1, 128, 4)


Pipe = tuple[int, int, int, int]  # (BLOCK_N, num_warps, programs an SM, tiles loaded ahead)
# The persistent form's default: short K (gate_up, the output matrix) persistent, long K
# (down) tiled. H200, `benchmarks/kernels/xcodes_tile_lab.py` (graph replays over rotating
# weights, us): gate_up 9.22 tiled -> 7.48, output 54.88 -> 39.41, down 5.94 tiled against
# 6.02 at its best persistent tile; `gpu_ab.py` 1B tg128 Q4_0 1541.8 -> 1651.0, Q4_1 1448.2
# -> 1550.4 (1.071x both; benchmarks/RESULTS.md, twenty-sixth session).
PIPE_DEFAULT: dict[str, Pipe | None] = {"short": (2, 1, 16, 1), "long": None}


def _pipe_config(
    env: str | None,
    default: dict[str, Pipe | None] = PIPE_DEFAULT,
    name: str = "LLAMAPY_GPU_X_CODES_PIPE",
) -> dict[str, Pipe | None]:
    """The persistent, software-pipelined form (`_codes_gemv_pipe_kernel`) for short and long
    K (K >= 4096): {"short" / "long": (BLOCK_N, num_warps, programs an SM, tiles ahead), or
    None for the tiled form}. LLAMAPY_GPU_X_CODES_PIPE: off (0 / false / no / off: tiled
    everywhere), or "BN,W,P[,A]/BN,W,P[,A]" (short / long; "-" for the tiled form; A 1 or 2,
    default 1) for A/B runs; unset: `PIPE_DEFAULT`. (`name` / `default`: the same for the
    Q6_K kernel's LLAMAPY_GPU_X_CODES_Q6K_PIPE, where None keeps the K-quant GEMV.)"""
    if not env:
        return dict(default)
    if env.strip().lower() in OFF_VALUES:
        return {"short": None, "long": None}
    parts = env.split("/")
    config: dict[str, Pipe | None] = {}
    for key, part in zip(("short", "long"), parts, strict=False):
        values = [v.strip() for v in part.split(",")]
        if part.strip() == "-":
            config[key] = None
            continue
        if len(values) not in (3, 4) or not all(v.isdigit() and int(v) > 0 for v in values):
            break
        bn, warps, per_sm, ahead = (int(v) for v in (*values, "1")[:4])
        if bn & (bn - 1) or warps & (warps - 1) or ahead > 2:
            break
        config[key] = (bn, warps, per_sm, ahead)
    if len(parts) != 2 or len(config) != 2:
        raise ValueError(f"{name} wants off or 'BN,W,P[,A]/BN,W,P[,A]' ('-' a side), got {env!r}")
    return config


_PIPE = _pipe_config(os.environ.get("LLAMAPY_GPU_X_CODES_PIPE"))
# Q4_1's: its down (long K) persistent too, 2 rows, 8 warps, 3 programs an SM, and without
# PDL (`_pipe_grid`). H200, `benchmarks/kernels/xcodes_tile_lab.py --type Q4_1 --long-only
# --tiles` (us a call): down tiled 7.47 (Q4_0's tile; 6.98 at its best, 2 warps), persistent
# 6.08; 1B Q4_1 tg128 (`gpu_ab.py`) 1659.0 -> 1715.4 t/s (1.034x; with PDL 0.977x), Q4_0's
# down the same way 0.968x (benchmarks/RESULTS.md, thirtieth session). A set
# LLAMAPY_GPU_X_CODES_PIPE applies to both types.
Q41_PIPE_DEFAULT: dict[str, Pipe | None] = {"short": (2, 1, 16, 1), "long": (2, 8, 3, 1)}
_Q41_PIPE = _pipe_config(os.environ.get("LLAMAPY_GPU_X_CODES_PIPE"), Q41_PIPE_DEFAULT)
# The Q6_K kernel's tiles, short K (the output matrix, 2048) / long K (ffn_down, 8192): the
# same fields; "-" (or off) keeps that side on the K-quant GEMV. LLAMAPY_GPU_X_CODES_Q6K_PIPE.
# H200, `benchmarks/kernels/q6k_codes_lab.py` (graph replays over rotating weights, us a
# call): the 1B's output 145.6 (K-quant GEMV) -> 58.2 (2 rows, 1 warp, 24 programs an SM),
# with its quantizing launch 60.0; down 14.6 -> 9.1 (1 row, 4 warps, 4 programs), 11.1 with
# the gating's quantizing launch; 1B Q4_K_M tg128 1239.8 -> 1451.9 t/s (1.171x;
# benchmarks/RESULTS.md, twenty-ninth session).
Q6K_PIPE_DEFAULT: dict[str, Pipe | None] = {"short": (2, 1, 24, 1), "long": (1, 4, 4, 1)}
_Q6K_PIPE = _pipe_config(
    os.environ.get("LLAMAPY_GPU_X_CODES_Q6K_PIPE"), Q6K_PIPE_DEFAULT, "LLAMAPY_GPU_X_CODES_Q6K_PIPE"
)
# Q4_K rows read as stored (`_q4k_pipe_kernel`: 4.6 bits a weight) rather than as their Q4_1
# twins (6 bits, `models.llama.gpu_kquant_twins`): the same fields,
# LLAMAPY_GPU_X_CODES_Q4K_PIPE; a side the kernel takes keeps its weights K-quant on the GPU
# (a quarter fewer bytes there). Off by default: no faster. H200, `benchmarks/kernels/
# q6k_codes_lab.py --type Q4_K`, us a call, the twins' codes GEMV against the best tile:
# gate_up 8.47 / 8.64 (2 rows, 2 warps, 8 programs an SM), down 7.20 / 7.03 (2 rows, 8 warps,
# 2 programs); 1B Q4_K_M with "2,2,8,1/2,8,2,1" tg128 1.001x, B=64 0.970x, pp512 0.999x
# (benchmarks/RESULTS.md, twenty-ninth session). Turned on: those tiles (Q4K_PIPE_MEASURED).
Q4K_PIPE_DEFAULT: dict[str, Pipe | None] = {"short": None, "long": None}
Q4K_PIPE_MEASURED: dict[str, Pipe | None] = {"short": (2, 2, 8, 1), "long": (2, 8, 2, 1)}
_Q4K_PIPE = _pipe_config(
    os.environ.get("LLAMAPY_GPU_X_CODES_Q4K_PIPE"), Q4K_PIPE_DEFAULT, "LLAMAPY_GPU_X_CODES_Q4K_PIPE"
)
# The persistent form launches with PDL whatever its weight's size (the size rule,
# `pdl.AUTO_MAX_WEIGHT_BYTES`, would keep the 1B's gate_up and output matrix off): its grid is
# resident at once, behind the quantizing kernel, and its first tile's loads go out before
# the wait. H200, 1B Q4_0 tg128 (`gpu_ab.py`, twenty-seventh session): 1650.2 -> 1688.8 t/s
# (1.023x); PDL on for every kernel instead: 0.946x. Except at long K (down: Q4_1's, Q6_K's),
# which keeps the size rule (thirtieth session, `gpu_ab.py`, tg128): 1B Q4_1's persistent
# down with PDL 0.977x, without 1.034x; 1B Q4_K_M's Q6_K down without PDL 1.007x.
# LLAMAPY_GPU_X_CODES_PIPE_PDL=0: the size rule everywhere; "all": PDL at long K too.
PIPE_PDL_SWITCH = "LLAMAPY_GPU_X_CODES_PIPE_PDL"


# The quantizing launch stays: each persistent program quantizing RMSNorm(x) itself lost
# twice, 0.856x tg128 (1B Q4_0, twenty-sixth session) and, with 256-value norm chunks and 128
# registers, 0.901x (16 one-warp programs an SM) / 0.951x (8 two-warp ones; thirty-fifth
# session, benchmarks/RESULTS.md). Its program: 8 blocks on one warp (8 / 32 programs for the
# 1B's 2048 / 8192 rows). H200, 1B tg128 (`gpu_ab.py`, three rounds, thirty-fifth session;
# benchmarks/RESULTS.md): against 16 blocks on four warps (the tile before), Q4_0 1860.2 ->
# 1882.3 t/s (1.012x), Q4_1 1824.4 -> 1854.5 (1.016x); 8 on two warps 0.996x / 1.001x, 16 on
# one 0.925x / 0.933x, 4 on one (Q4_0) 1.002x.
QUANT_TILE_DEFAULT = (8, 1)


def _quant_tile(env: str | None) -> tuple[int, int]:
    """(32-blocks a quantizing program takes, its warps): LLAMAPY_GPU_X_CODES_QUANT_TILE
    "BLOCKS,WARPS" (powers of two) for the lab's sweeps, else QUANT_TILE_DEFAULT."""
    if env:
        parts = env.split(",")
        if len(parts) == 2 and all(v.strip().isdigit() for v in parts):
            tile = (int(parts[0]), int(parts[1]))
            if all(v > 0 and v & (v - 1) == 0 for v in tile):
                return tile
        raise ValueError(f"LLAMAPY_GPU_X_CODES_QUANT_TILE wants two powers of two, got {env!r}")
    return QUANT_TILE_DEFAULT


_QUANT_BLOCKS, _QUANT_WARPS = _quant_tile(os.environ.get("LLAMAPY_GPU_X_CODES_QUANT_TILE"))


def _pdl(device: torch.device, weight_bytes: int | None) -> bool:
    """`pdl.pdl_enabled`'s policy (the quantizing kernel reads no weight: on wherever PDL is),
    unless LLAMAPY_GPU_X_CODES_PDL is off (0 / false / no / off), for A/B runs."""
    return pdl.pdl_enabled(device, weight_bytes) and not switched_off("LLAMAPY_GPU_X_CODES_PDL")


def _trigger(device: torch.device, k: int) -> bool:
    """`pdl.trigger_enabled`, unless LLAMAPY_GPU_X_CODES_PDL is off."""
    return pdl.trigger_enabled(device, k) and not switched_off("LLAMAPY_GPU_X_CODES_PDL")


def enabled() -> bool:
    """LLAMAPY_GPU_X_CODES: on unless 0 / false / no / off (`switches.switched_off`)."""
    return not switched_off("LLAMAPY_GPU_X_CODES")


@functools.cache
def _has_dp4a(index: int) -> bool:
    """dp4a needs compute capability 6.1 or later."""
    return torch.cuda.get_device_capability(index) >= (6, 1)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def takes(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> bool:
    """Whether `qmatmul` routes this product here (see the module's docstring)."""
    return x.shape[0] == 1 and _weight_fits(w) and bias is None and _row_fits(x)


def _weight_fits(w: PackedWeight) -> bool:
    return _shape_fits(w.qtype, w.n, w.k) and _QUANTS[w.qtype] in w.tensors


def _shape_fits(qtype: QuantType, n: int, k: int) -> bool:
    return (
        qtype in TYPES
        and k >= MIN_K
        and n * k >= MIN_WEIGHTS
        and (qtype not in _KQUANT_PIPES or _pipe_for(k, qtype) is not None)
    )


def takes_native(qtype: QuantType, n: int, k: int) -> bool:
    """Whether one row times an (n, k) weight of this K-quant type goes over the codes as its
    blocks are (so the GPU need not hold a legacy twin of it for the decode step)."""
    return qtype in _KQUANT_PIPES and _shape_fits(qtype, n, k) and enabled()


def weight_takes(w: PackedWeight) -> bool:
    """Whether one float32 row times `w` goes over the codes on a card that takes them (the
    weight's part of `takes`): for callers choosing a fused prologue before x exists."""
    return _weight_fits(w) and enabled()


def _pipe_for(k: int, qtype: QuantType = QuantType.Q4_0) -> Pipe | None:
    """The persistent form's config for a weight of K columns, None for the tiled form (for
    the K-quant types: for the K-quant GEMV)."""
    pipes = {QuantType.Q6_K: _Q6K_PIPE, QuantType.Q4_K: _Q4K_PIPE, QuantType.Q4_1: _Q41_PIPE}
    pipes = pipes.get(qtype, _PIPE)
    return pipes["long" if k >= 4096 else "short"]


def _row_fits(x: torch.Tensor) -> bool:
    """One float32 row on a card with dp4a (or the interpreter), the codes not switched off."""
    return (
        x.shape[0] == 1
        and x.dtype == torch.float32
        and (INTERPRET or (x.is_cuda and _has_dp4a(_index(x.device))))
        and enabled()
    )


def code_buffers(k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(codes (LEVELS, K / 4) int32 words, scales (LEVELS, K / 32) float32, sums (LEVELS,
    K / 32) int32) for one row of K values."""
    nb = k // QK
    return (
        torch.empty(LEVELS, nb * 8, dtype=torch.int32, device=device),
        torch.empty(LEVELS, nb, dtype=torch.float32, device=device),
        torch.empty(LEVELS, nb, dtype=torch.int32, device=device),
    )


def quantize(
    x: torch.Tensor,
    k: int,
    pro: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    buffers: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Codes of one row: x (1, K) float32 (pro 0 none, 1 RMSNorm with `norm_weight`) or (1, 2K)
    [gate | up] (pro 2 SiLU, 3 GELU-tanh gating) -> `code_buffers(K)` filled (`buffers` when
    given)."""
    if x.shape[0] != 1 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous float32 row, got {x.dtype} {tuple(x.shape)}")
    if k % QK or x.shape[1] != (2 * k if pro >= 2 else k):
        raise ValueError(f"x of {x.shape[1]} values does not fit K={k} with prologue {pro}")
    if pro == 1 and (norm_weight is None or norm_weight.shape != (k,)):
        raise ValueError(f"the norm prologue needs a ({k},) weight")
    if buffers is None:
        buffers = code_buffers(k, x.device)
    nb = k // QK
    _quantize_kernel[(triton.cdiv(nb, _QUANT_BLOCKS),)](
        x, norm_weight if norm_weight is not None else x, *buffers, k, float(eps),
        PRO=pro, LEVELS=LEVELS, BLOCK_B=_QUANT_BLOCKS, INTERP=INTERPRET,
        RMS_CHUNK=qm.rms_chunk(k, 1), **pdl.launch_options(_pdl(x.device, None)),
        num_warps=_QUANT_WARPS,
    )  # fmt: skip
    return buffers


def gemv(
    codes: tuple[torch.Tensor, ...], w: PackedWeight, out: torch.Tensor, accumulate: bool
) -> torch.Tensor:
    """out (1, N) float32 = (or += when `accumulate`) W x for the x `codes` stand for."""
    _check_codes(codes, w)
    if out.shape != (1, w.n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 (1, {w.n}), got {tuple(out.shape)}")
    _launch(codes, w, out, accumulate)
    return out


def _check_codes(codes: tuple[torch.Tensor, ...], w: PackedWeight) -> None:
    if w.qtype not in TYPES:
        raise ValueError(f"the codes GEMV takes {[t.name for t in TYPES]}, got {w.qtype.name}")
    if _QUANTS[w.qtype] not in w.tensors:
        raise ValueError(
            f"the codes GEMV reads the quants ({_QUANTS[w.qtype]!r}), not a byte twin or float form"
        )
    nb = w.k // QK
    if codes[0].shape != (LEVELS, nb * 8) or codes[1].shape != (LEVELS, nb):
        raise ValueError(f"codes are for K={codes[1].shape[-1] * QK}, the weight has K={w.k}")


def _launch(
    codes: tuple[torch.Tensor, ...],
    w: PackedWeight,
    out: torch.Tensor,
    accumulate: bool,
) -> None:
    if w.qtype in _KQUANT_PIPES:
        config = _pipe_for(w.k, w.qtype)
        if config is None:
            raise ValueError(
                f"the {w.qtype.name} codes GEMV is off for K={w.k} "
                f"(LLAMAPY_GPU_X_CODES_{w.qtype.name.replace('_', '')}_PIPE)"
            )
        _launch_kquant(codes, w, out, accumulate, config)
        return
    pipe = _pipe_for(w.k, w.qtype)
    if pipe is not None:
        _launch_pipe(codes, w, out, accumulate, pipe)
        return
    block_n, block_b, warps = _TILE_LONG_K if w.k >= 4096 else _TILE
    d = w.tensors["d"]
    pdl_on = _pdl(out.device, w.nbytes)
    lines = pdl.prefetch_lines(w.k // QK * 16) if pdl_on else 0  # a row's nibbles
    steps = triton.cdiv(w.k // QK, block_b)
    _codes_gemv_kernel[(triton.cdiv(w.n, block_n),)](
        *codes, w.tensors["qs"].view(torch.int32), d, w.tensors.get("m", d), out, w.n, w.k,
        steps, QT=TYPES[w.qtype], LEVELS=LEVELS, BLOCK_N=block_n, BLOCK_B=block_b,
        RES=accumulate, INTERP=INTERPRET, PF=lines,
        **pdl.launch_options(pdl_on, _trigger(out.device, w.k)), num_warps=warps,
    )  # fmt: skip


def _pipe_grid(w: PackedWeight, out: torch.Tensor, config: Pipe) -> tuple[int, int, bool]:
    """A persistent kernel's (programs, row tiles, PDL): min(row tiles, SMs x programs an SM)
    programs (the interpreter's 4 SMs); PDL whatever the weight's size at short K, by the
    size rule at long K (`PIPE_PDL_SWITCH`)."""
    if LEVELS != 2:
        raise ValueError("the persistent codes GEMVs hold two levels of codes")
    tiles = triton.cdiv(w.n, config[0])
    programs = min(tiles, qm._num_sms(out.device) * config[2])
    every = os.environ.get(PIPE_PDL_SWITCH, "").strip().lower() == "all"
    size_rule = switched_off(PIPE_PDL_SWITCH) or (w.k >= 4096 and not every)
    pdl_on = _pdl(out.device, w.nbytes if size_rule else None)
    return programs, tiles, pdl_on


def _launch_pipe(
    codes: tuple[torch.Tensor, ...],
    w: PackedWeight,
    out: torch.Tensor,
    accumulate: bool,
    config: Pipe,
) -> None:
    """The persistent form: min(row tiles, SMs x programs an SM) programs, each over the row
    tiles pid, pid + programs, ..., the whole of K a tile (BLOCK_B the next power of two of
    K / 32)."""
    block_n, warps, _, ahead = config
    programs, tiles, pdl_on = _pipe_grid(w, out, config)
    d = w.tensors["d"]
    _codes_gemv_pipe_kernel[(programs,)](
        *codes, w.tensors["qs"].view(torch.int32), d, w.tensors.get("m", d), out, w.n, w.k,
        tiles, QT=TYPES[w.qtype], BLOCK_N=block_n,
        BLOCK_B=triton.next_power_of_2(w.k // QK), RES=accumulate, AHEAD=ahead, INTERP=INTERPRET,
        **pdl.launch_options(pdl_on, _trigger(out.device, w.k)), num_warps=warps,
    )  # fmt: skip


def _launch_kquant(
    codes: tuple[torch.Tensor, ...],
    w: PackedWeight,
    out: torch.Tensor,
    accumulate: bool,
    config: Pipe,
) -> None:
    """`_q6k_pipe_kernel` / `_q4k_pipe_kernel`: min(row tiles, SMs x programs an SM)
    programs, as `_launch_pipe`."""
    block_n, warps, _, ahead = config
    programs, tiles, pdl_on = _pipe_grid(w, out, config)
    t = w.tensors
    common = dict(
        RES=accumulate, AHEAD=ahead, INTERP=INTERPRET,
        **pdl.launch_options(pdl_on, _trigger(out.device, w.k)), num_warps=warps,
    )  # fmt: skip
    if w.qtype == QuantType.Q6_K:
        _q6k_pipe_kernel[(programs,)](
            codes[0], codes[1], t["ql"].view(torch.int32), t["qh"].view(torch.int32), t["sc"],
            t["d"], out, w.n, w.k, tiles, BLOCK_N=block_n,
            BLOCK_U=triton.next_power_of_2(w.k // 128), **common,
        )  # fmt: skip
    else:
        _q4k_pipe_kernel[(programs,)](
            *codes, t["qs"].view(torch.int32), t["sc"], t["mn"], t["d"], t["dmin"], out, w.n,
            w.k, tiles, BLOCK_N=block_n, BLOCK_P=triton.next_power_of_2(w.k // 64), **common,
        )  # fmt: skip


def matmul(
    x: torch.Tensor,
    w: PackedWeight,
    out: torch.Tensor,
    pro: int,
    norm_weight: torch.Tensor | None,
    eps: float | None,
    accumulate: bool,
) -> torch.Tensor:
    """`qmatmul`'s product for a row it routes here (`takes`): x quantized with its prologue,
    then the codes GEMV into `out` (added into it when `accumulate`: the residual form)."""
    codes = quantize(x, w.k, pro, norm_weight, eps or 0.0)
    return gemv(codes, w, out, accumulate)


if HAS_TRITON:

    @triton.jit
    def _quantize_kernel(
        x_ptr, g_ptr, xc_ptr, xs_ptr, xt_ptr, K, eps,
        PRO: tl.constexpr, LEVELS: tl.constexpr, BLOCK_B: tl.constexpr, INTERP: tl.constexpr,
        PDL: tl.constexpr, RMS_CHUNK: tl.constexpr,
    ):  # fmt: skip
        """Codes of blocks [pid * BLOCK_B, +BLOCK_B) of one row's prologue output (PRO 0 x,
        1 RMSNorm with weight g (each program sums the whole row's squares: a few KiB from
        L2), 2 / 3 SiLU / GELU-tanh gating of a [gate | up] row of 2K): per level, int8 codes
        as words (a block's low half's four, then its high half's), the scale and the codes'
        sum per block; each level quantizes what the ones before left. PDL: launched early,
        it waits for the kernel before (x's producer) before reading anything."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        nb = K // 32
        b_first = tl.program_id(0) * BLOCK_B
        gl, gh = qm._g_halves(g_ptr, b_first, nb, BLOCK_B, PRO)
        xl, xh = qm._x_halves(x_ptr, True, b_first, nb, gl, gh, BLOCK_B, PRO)
        if PRO == 1:
            inv = qm._inv_rms(x_ptr, tl.arange(0, 1), 1, K, K, eps, 1, RMS_CHUNK, INTERP)
            inv = tl.sum(inv, 0)
            xl = xl * inv
            xh = xh * inv
        offs_b = b_first + tl.arange(0, BLOCK_B)
        _store_codes(xl, xh, offs_b, offs_b < nb, xc_ptr, xs_ptr, xt_ptr, nb, LEVELS)

    @triton.jit
    def _store_codes(xl, xh, blocks, ok, xc_ptr, xs_ptr, xt_ptr, nb, LEVELS: tl.constexpr):
        """Write the codes of blocks `blocks` (BB,) (where `ok`) of a row of nb 32-blocks, given
        as halves xl / xh (BB, 16) float32 (x[32b + j], x[32b + 16 + j]), into `code_buffers`
        (xc words, xs scales, xt code sums): per level, int8 codes as words (a block's low
        half's four, then its high half's), the scale and the codes' sum per block; each
        level quantizes what the ones before left."""
        words = blocks[:, None] * 8 + tl.arange(0, 4)[None, :]
        for lvl in tl.static_range(LEVELS):
            cl, ch, sx, total = qm._codes(xl, xh)
            tl.store(xc_ptr + lvl * (nb * 8) + words, qm._pack_bytes(cl), mask=ok[:, None])
            tl.store(xc_ptr + lvl * (nb * 8) + words + 4, qm._pack_bytes(ch), mask=ok[:, None])
            tl.store(xs_ptr + lvl * nb + blocks, sx, mask=ok)
            tl.store(xt_ptr + lvl * nb + blocks, total, mask=ok)
            xl = xl - cl.to(tl.float32) * sx[:, None]
            xh = xh - ch.to(tl.float32) * sx[:, None]

    @triton.jit
    def _codes_step(acc, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, m_ptr, rows, n_mask, nb,
                    b_first, QT: tl.constexpr, LEVELS: tl.constexpr, BLOCK_B: tl.constexpr,
                    INTERP: tl.constexpr):  # fmt: skip
        """acc (BN, BB) += blocks [b_first, +BLOCK_B) of the rows times the codes' x: QT 0
        Q4_0 (w = d (q - 8)), 1 Q4_1 (w = d q + m)."""
        offs_b = b_first + tl.arange(0, BLOCK_B)
        b_ok = offs_b < nb
        blk = rows[:, None] * nb + offs_b[None, :]
        ok = n_mask[:, None] & b_ok[None, :]
        d = tl.load(d_ptr + blk, mask=ok, other=0.0).to(tl.float32)
        w = qm._words(qs_ptr, rows, n_mask, b_first, nb, 4, 0, BLOCK_B)
        lo = w & 0x0F0F0F0F  # weights 4i .. 4i + 3 of the block (word i)
        hi = (w >> 4) & 0x0F0F0F0F  # weights 16 + 4i ..
        zero = tl.zeros(lo.shape, tl.int32)
        xw = offs_b[:, None] * 8 + tl.arange(0, 4)[None, :]  # (BB, 4) code words, low half
        part = tl.zeros(d.shape, tl.float32)
        xsum = tl.zeros((BLOCK_B,), tl.float32)  # sum_j x_j of each block (Q4_1's offset)
        for lvl in tl.static_range(LEVELS):
            cl = tl.load(xc_ptr + lvl * (nb * 8) + xw, mask=b_ok[:, None], other=0)
            ch = tl.load(xc_ptr + lvl * (nb * 8) + xw + 4, mask=b_ok[:, None], other=0)
            s = tl.load(xs_ptr + lvl * nb + offs_b, mask=b_ok, other=0.0)
            t = tl.load(xt_ptr + lvl * nb + offs_b, mask=b_ok, other=0)
            dot = qm._dp4a(lo, cl[None, :, :], zero, False, INTERP)
            dot = qm._dp4a(hi, ch[None, :, :], dot, False, INTERP)
            isum = tl.sum(dot, axis=2)  # |.| <= 32 * 15 * 127: exact
            if QT == 0:
                isum -= 8 * t[None, :]
            else:
                xsum += t.to(tl.float32) * s
            part += isum.to(tl.float32) * s[None, :]
        if QT == 1:
            m = tl.load(m_ptr + blk, mask=ok, other=0.0).to(tl.float32)
            return acc + d * part + m * xsum[None, :]
        return acc + d * part

    @triton.jit
    def _codes_gemv_kernel(
        xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, m_ptr, out_ptr, N, K, steps,
        QT: tl.constexpr, LEVELS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
        RES: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr, PF: tl.constexpr,
    ):  # fmt: skip
        """out[n] (+)= sum_b d[n, b] sum_l s[l, b] (sum_j q[n, b, j] c[l, b, j] - 8 t[l, b])
        for this program's BLOCK_N rows, K walked in `steps` steps of BLOCK_B blocks. PDL: PF
        lines of each row's words go to L2 before the wait for the kernel before (the codes'
        producer)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        n_mask = offs_n < N
        nb = K // 32
        if PDL:
            pdl.prefetch_rows(qs_ptr, rows, n_mask, nb * 4, 0, nb * 4, PF)
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        acc = tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
        if INTERP:  # numpy >= 2.4 cannot make the interpreter's scalars `range` bounds
            step = 0
            while step < steps:
                acc = _codes_step(acc, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, m_ptr, rows, n_mask,
                                  nb, step * BLOCK_B, QT, LEVELS, BLOCK_B, INTERP)  # fmt: skip
                step += 1
        else:
            for step in range(0, steps):
                acc = _codes_step(acc, xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, m_ptr, rows, n_mask,
                                  nb, step * BLOCK_B, QT, LEVELS, BLOCK_B, INTERP)  # fmt: skip
        y = tl.sum(acc, axis=1)
        if RES:  # out is the residual stream: y added into it, once
            y += tl.load(out_ptr + offs_n, mask=n_mask, other=0.0)
        tl.store(out_ptr + offs_n, y, mask=n_mask)

    @triton.jit
    def _pipe_tile(qs_ptr, d_ptr, m_ptr, tile, N, nb, QT: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_B: tl.constexpr):  # fmt: skip
        """A row tile's loads for `_codes_gemv_pipe_kernel`: words (BN, BB, 4), d (BN, BB) and
        m (Q4_1; else d again) of rows [tile * BLOCK_N, +BLOCK_N), all of K; rows past N
        (tiles past the last) load zeros."""
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        n_mask = offs_n < N
        offs_b = tl.arange(0, BLOCK_B)
        blk = rows[:, None] * nb + offs_b[None, :]
        ok = n_mask[:, None] & (offs_b < nb)[None, :]
        w = qm._words(qs_ptr, rows, n_mask, 0, nb, 4, 0, BLOCK_B)
        d = tl.load(d_ptr + blk, mask=ok, other=0.0).to(tl.float32)
        m = d
        if QT == 1:
            m = tl.load(m_ptr + blk, mask=ok, other=0.0).to(tl.float32)
        return w, d, m

    @triton.jit
    def _codes_gemv_pipe_kernel(
        xc_ptr, xs_ptr, xt_ptr, qs_ptr, d_ptr, m_ptr, out_ptr, N, K, tiles,
        QT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, RES: tl.constexpr,
        AHEAD: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """`_codes_gemv_kernel`'s product (two levels of codes), persistent and
        software-pipelined: the program holds x's codes of all of K in registers (read once)
        and walks the row tiles pid, pid + programs, ..., issuing the loads of the tile AHEAD
        (1 or 2) tiles on before it computes the current one, so that a program keeps AHEAD +
        1 tiles' bytes in flight. Its first tile's loads go out before the PDL wait (weights
        do not depend on the kernel before)."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        nb = K // 32
        w, d, m = _pipe_tile(qs_ptr, d_ptr, m_ptr, pid, N, nb, QT, BLOCK_N, BLOCK_B)
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        offs_b = tl.arange(0, BLOCK_B)
        b_ok = offs_b < nb
        xw = offs_b[:, None] * 8 + tl.arange(0, 4)[None, :]
        cl0 = tl.load(xc_ptr + xw, mask=b_ok[:, None], other=0)
        ch0 = tl.load(xc_ptr + xw + 4, mask=b_ok[:, None], other=0)
        cl1 = tl.load(xc_ptr + nb * 8 + xw, mask=b_ok[:, None], other=0)
        ch1 = tl.load(xc_ptr + nb * 8 + xw + 4, mask=b_ok[:, None], other=0)
        s0 = tl.load(xs_ptr + offs_b, mask=b_ok, other=0.0)
        s1 = tl.load(xs_ptr + nb + offs_b, mask=b_ok, other=0.0)
        t0 = tl.load(xt_ptr + offs_b, mask=b_ok, other=0)
        t1 = tl.load(xt_ptr + nb + offs_b, mask=b_ok, other=0)
        xsum = t0.to(tl.float32) * s0 + t1.to(tl.float32) * s1  # sum_j x_j a block (Q4_1)
        tile = pid
        if AHEAD == 2:
            w2, d2, m2 = _pipe_tile(qs_ptr, d_ptr, m_ptr, pid + step, N, nb, QT, BLOCK_N, BLOCK_B)
        while tile < tiles:
            nxt = _pipe_tile(qs_ptr, d_ptr, m_ptr, tile + AHEAD * step, N, nb, QT, BLOCK_N,
                             BLOCK_B)  # fmt: skip
            lo = w & 0x0F0F0F0F  # weights 4i .. 4i + 3 of the block (word i)
            hi = (w >> 4) & 0x0F0F0F0F  # weights 16 + 4i ..
            part = d * (_pipe_dot(lo, hi, cl0, ch0, t0, s0, QT, INTERP)
                        + _pipe_dot(lo, hi, cl1, ch1, t1, s1, QT, INTERP))  # fmt: skip
            if QT == 1:
                part += m * xsum[None, :]
            _store_tile(out_ptr, tl.sum(part, axis=1), tile, N, BLOCK_N, RES)
            if AHEAD == 2:
                w, d, m = w2, d2, m2
                w2, d2, m2 = nxt
            else:
                w, d, m = nxt
            tile += step

    @triton.jit
    def _store_tile(out_ptr, y, tile, N, BLOCK_N: tl.constexpr, RES: tl.constexpr):
        """A persistent kernel's row tile's results y (BLOCK_N,) into out (added into it when
        RES: the residual stream), rows past N dropped."""
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        if RES:
            y += tl.load(out_ptr + offs_n, mask=n_mask, other=0.0)
        tl.store(out_ptr + offs_n, y, mask=n_mask)

    @triton.jit
    def _pipe_dot(lo, hi, cl, ch, t, s, QT: tl.constexpr, INTERP: tl.constexpr):
        """One level's (BN, BB) block sums s * (sum_j q_j c_j (- 8 sum_j c_j for Q4_0)) of
        a block's weights as words lo (0..15) and hi (16..31) (BN, BB, 4) against that
        level's code words cl / ch (BB, 4)."""
        zero = tl.zeros(lo.shape, tl.int32)
        dot = qm._dp4a(lo, cl[None, :, :], zero, False, INTERP)
        dot = qm._dp4a(hi, ch[None, :, :], dot, False, INTERP)
        isum = tl.sum(dot, axis=2)
        if QT == 0:
            isum -= 8 * t[None, :]
        return isum.to(tl.float32) * s[None, :]

    @triton.jit
    def _q6k_scales(sc_ptr, d_ptr, rows, ok, nu, u, NIB: tl.constexpr):
        """d * sc (BN, BU, 2 runs, 2 halves) float32 of the sub-blocks 8u + 2r + half of piece
        r = 2 NIB + run of the units u (BU,) of rows `rows` (BN,) (`ok` (BN, BU))."""
        a2 = tl.arange(0, 2)
        run, half = a2[None, None, :, None], a2[None, None, None, :]
        sub = u[None, :, None, None] * 8 + NIB * 4 + run * 2 + half
        sc = tl.load(sc_ptr + rows[:, None, None, None] * (nu * 8) + sub,
                     mask=ok[:, :, None, None], other=0)  # fmt: skip
        d = tl.load(d_ptr + rows[:, None] * (nu // 2) + u[None, :] // 2, mask=ok, other=0.0)
        return d.to(tl.float32)[:, :, None, None] * sc.to(tl.float32)

    @triton.jit
    def _q6k_tile(ql_ptr, qh_ptr, sc_ptr, d_ptr, tile, N, nu, BLOCK_N: tl.constexpr,
                  BLOCK_U: tl.constexpr):  # fmt: skip
        """A row tile's loads for `_q6k_pipe_kernel`, all of K in 128-weight units u (half a
        super-block): ql words 16u + 8 run + 4 half + i (BN, BU, 2, 2, 4), qh words 8u + 4 half
        + i (BN, BU, 2, 4), the scales of pieces r = run (nibble 0) and 2 + run (nibble 1);
        rows past N (tiles past the last) load zeros."""
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        u = tl.arange(0, BLOCK_U)
        ok = (offs_n < N)[:, None] & (u < nu)[None, :]
        a2 = tl.arange(0, 2)
        a4 = tl.arange(0, 4)
        lw = (u[None, :, None, None, None] * 16 + a2[None, None, :, None, None] * 8
              + a2[None, None, None, :, None] * 4 + a4[None, None, None, None, :])  # fmt: skip
        wl = tl.load(ql_ptr + rows[:, None, None, None, None] * (nu * 16) + lw,
                     mask=ok[:, :, None, None, None], other=0)  # fmt: skip
        hw = u[None, :, None, None] * 8 + a2[None, None, :, None] * 4 + a4[None, None, None, :]
        wh = tl.load(qh_ptr + rows[:, None, None, None] * (nu * 8) + hw,
                     mask=ok[:, :, None, None], other=0)  # fmt: skip
        g0 = _q6k_scales(sc_ptr, d_ptr, rows, ok, nu, u, 0)
        g1 = _q6k_scales(sc_ptr, d_ptr, rows, ok, nu, u, 1)
        return wl, wh, g0, g1

    @triton.jit
    def _q6k_codes(xc_ptr, xs_ptr, nb, nu, LVL: tl.constexpr, NIB: tl.constexpr,
                   BLOCK_U: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
        """One level's codes of x-blocks 4u + 2 NIB + run (the pieces of nibble NIB): words
        (BU, 2 runs, 2 halves, 4), scales (BU, 2), and the codes' sums per 16-weight half
        (BU, 2, 2)."""
        u = tl.arange(0, BLOCK_U)
        a2 = tl.arange(0, 2)
        a4 = tl.arange(0, 4)
        u_ok = u < nu
        blk = u[:, None] * 4 + NIB * 2 + a2[None, :]  # (BU, 2)
        cw = blk[:, :, None, None] * 8 + a2[None, None, :, None] * 4 + a4[None, None, None, :]
        c = tl.load(xc_ptr + LVL * (nb * 8) + cw, mask=u_ok[:, None, None, None], other=0)
        s = tl.load(xs_ptr + LVL * nb + blk, mask=u_ok[:, None], other=0.0)
        ones = tl.full(c.shape, 0x01010101, tl.int32)
        t = tl.sum(qm._dp4a(ones, c, tl.zeros(c.shape, tl.int32), False, INTERP), axis=3)
        return c, s, t

    @triton.jit
    def _q6k_piece(wl, wh, NIB: tl.constexpr, ca, sa, ta, cb, sb, tb, INTERP: tl.constexpr):
        """(BN, BU, 2 runs, 2 halves) float32: sum over both levels of s * (sum_j q_j c_j - 32
        sum_j c_j) of the 16-weight halves of pieces r = 2 NIB + run, q the 6-bit quants: ql
        nibble NIB, qh bits 2r, 2r + 1."""
        run = tl.arange(0, 2)[None, None, :, None, None]
        q = ((wl >> (4 * NIB)) & 0x0F0F0F0F) | (((wh[:, :, None, :, :] >> (4 * NIB + 2 * run))
                                                 & 0x03030303) << 4)  # fmt: skip
        zero = tl.zeros(q.shape, tl.int32)
        da = tl.sum(qm._dp4a(q, ca[None], zero, False, INTERP), axis=4)  # |.| <= 16*63*127
        db = tl.sum(qm._dp4a(q, cb[None], zero, False, INTERP), axis=4)
        return ((da - 32 * ta[None]).to(tl.float32) * sa[None, :, :, None]
                + (db - 32 * tb[None]).to(tl.float32) * sb[None, :, :, None])  # fmt: skip

    @triton.jit
    def _q6k_pipe_kernel(
        xc_ptr, xs_ptr, ql_ptr, qh_ptr, sc_ptr, d_ptr, out_ptr, N, K, tiles,
        BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, RES: tl.constexpr, AHEAD: tl.constexpr,
        INTERP: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out[n] (+)= W[n] x for Q6_K rows (w = d sc (q - 32) per 16-weight sub-block) over
        two levels of x's codes, persistent and software-pipelined as `_codes_gemv_pipe_kernel`:
        x's codes of all of K (and their 16-weight sums) in registers, row tiles pid, pid +
        programs, ..., the loads of the tile AHEAD tiles on issued before the current one is
        computed; the first tile's before the PDL wait."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        nb = K // 32
        nu = K // 128
        wl, wh, g0, g1 = _q6k_tile(ql_ptr, qh_ptr, sc_ptr, d_ptr, pid, N, nu, BLOCK_N, BLOCK_U)
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        c00, s00, t00 = _q6k_codes(xc_ptr, xs_ptr, nb, nu, 0, 0, BLOCK_U, INTERP)
        c01, s01, t01 = _q6k_codes(xc_ptr, xs_ptr, nb, nu, 0, 1, BLOCK_U, INTERP)
        c10, s10, t10 = _q6k_codes(xc_ptr, xs_ptr, nb, nu, 1, 0, BLOCK_U, INTERP)
        c11, s11, t11 = _q6k_codes(xc_ptr, xs_ptr, nb, nu, 1, 1, BLOCK_U, INTERP)
        tile = pid
        if AHEAD == 2:
            wl2, wh2, g02, g12 = _q6k_tile(ql_ptr, qh_ptr, sc_ptr, d_ptr, pid + step, N, nu,
                                           BLOCK_N, BLOCK_U)  # fmt: skip
        while tile < tiles:
            nxt = _q6k_tile(ql_ptr, qh_ptr, sc_ptr, d_ptr, tile + AHEAD * step, N, nu, BLOCK_N,
                            BLOCK_U)  # fmt: skip
            part = (_q6k_piece(wl, wh, 0, c00, s00, t00, c10, s10, t10, INTERP) * g0
                    + _q6k_piece(wl, wh, 1, c01, s01, t01, c11, s11, t11, INTERP) * g1)  # fmt: skip
            y = tl.sum(tl.sum(tl.sum(part, axis=3), axis=2), axis=1)
            _store_tile(out_ptr, y, tile, N, BLOCK_N, RES)
            if AHEAD == 2:
                wl, wh, g0, g1 = wl2, wh2, g02, g12
                wl2, wh2, g02, g12 = nxt
            else:
                wl, wh, g0, g1 = nxt
            tile += step

    @triton.jit
    def _q4k_tile(qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tile, N, npairs,
                  BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
        """A row tile's loads for `_q4k_pipe_kernel`, all of K in 64-weight pairs p of 32-blocks
        (2p: the low nibbles of a 32-byte run of qs, 2p + 1 its high ones): qs words 8p + j
        (BN, BP, 1, 8), and each block's d sc and dmin mn (BN, BP, 2) float32; rows past N
        (tiles past the last) load zeros."""
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        p = tl.arange(0, BLOCK_P)
        ok = (offs_n < N)[:, None] & (p < npairs)[None, :]
        j = tl.arange(0, 8)
        words = p[None, :, None, None] * 8 + j[None, None, None, :]
        w = tl.load(qs_ptr + rows[:, None, None, None] * (npairs * 8) + words,
                    mask=ok[:, :, None, None], other=0)  # fmt: skip
        blk = p[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]  # (1, BP, 2)
        at = rows[:, None, None] * (npairs * 2) + blk
        sc = tl.load(sc_ptr + at, mask=ok[:, :, None], other=0).to(tl.float32)
        mn = tl.load(mn_ptr + at, mask=ok[:, :, None], other=0).to(tl.float32)
        sup = rows[:, None] * (npairs // 4) + p[None, :] // 4  # super-block of pair p
        d = tl.load(d_ptr + sup, mask=ok, other=0.0).to(tl.float32)
        dm = tl.load(dm_ptr + sup, mask=ok, other=0.0).to(tl.float32)
        return w, d[:, :, None] * sc, dm[:, :, None] * mn

    @triton.jit
    def _q4k_pipe_kernel(
        xc_ptr, xs_ptr, xt_ptr, qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, out_ptr, N, K, tiles,
        BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, RES: tl.constexpr, AHEAD: tl.constexpr,
        INTERP: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out[n] (+)= W[n] x for Q4_K rows as stored (w = d sc q - dmin mn per 32-block, q a
        nibble) over two levels of x's codes, persistent and software-pipelined as
        `_codes_gemv_pipe_kernel`; a block's sum is d sc sum_l s_l sum_j q_j c_lj - dmin mn
        sum_l s_l t_l (t the codes' sums)."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        nb = K // 32
        npairs = K // 64
        w, dsc, mmn = _q4k_tile(qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, pid, N, npairs,
                                BLOCK_N, BLOCK_P)  # fmt: skip
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        p = tl.arange(0, BLOCK_P)
        p_ok = p < npairs
        blk = p[:, None] * 2 + tl.arange(0, 2)[None, :]  # (BP, 2): x-blocks 2p, 2p + 1
        cw = blk[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        c0 = tl.load(xc_ptr + cw, mask=p_ok[:, None, None], other=0)
        c1 = tl.load(xc_ptr + nb * 8 + cw, mask=p_ok[:, None, None], other=0)
        s0 = tl.load(xs_ptr + blk, mask=p_ok[:, None], other=0.0)
        s1 = tl.load(xs_ptr + nb + blk, mask=p_ok[:, None], other=0.0)
        t0 = tl.load(xt_ptr + blk, mask=p_ok[:, None], other=0)
        t1 = tl.load(xt_ptr + nb + blk, mask=p_ok[:, None], other=0)
        xsum = t0.to(tl.float32) * s0 + t1.to(tl.float32) * s1  # sum_j x_j a block
        shift = 4 * tl.arange(0, 2)[None, None, :, None]  # block 2p + h: nibble h
        tile = pid
        if AHEAD == 2:
            w2, dsc2, mmn2 = _q4k_tile(qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, pid + step, N,
                                       npairs, BLOCK_N, BLOCK_P)  # fmt: skip
        while tile < tiles:
            nxt = _q4k_tile(qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tile + AHEAD * step, N,
                            npairs, BLOCK_N, BLOCK_P)  # fmt: skip
            q = (w >> shift) & 0x0F0F0F0F  # (BN, BP, 2, 8)
            zero = tl.zeros(q.shape, tl.int32)
            da = tl.sum(qm._dp4a(q, c0[None], zero, False, INTERP), axis=3)  # <= 32*15*127
            db = tl.sum(qm._dp4a(q, c1[None], zero, False, INTERP), axis=3)
            part = dsc * (da.to(tl.float32) * s0[None] + db.to(tl.float32) * s1[None])
            part -= mmn * xsum[None]
            _store_tile(out_ptr, tl.sum(tl.sum(part, axis=2), axis=1), tile, N, BLOCK_N, RES)
            if AHEAD == 2:
                w, dsc, mmn = w2, dsc2, mmn2
                w2, dsc2, mmn2 = nxt
            else:
                w, dsc, mmn = nxt
            tile += step
