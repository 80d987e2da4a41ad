"""Sweep the GEMM tiles (batched decode and prefill) at real model shapes on a GPU.

Three stages, on a pool of spawned worker processes and then the main one:
1. every kernel of a statically pruned grid is built for sm_90 with Triton's bundled ptxas
   (no GPU needed) and dropped if it fails (shared memory) or spills badly (`keep_built`);
2. each remaining config runs once at every (shape, M) of its type (which fills Triton's
   disk cache for stage 3) and is checked against `qmatmul_reference` at the first shape;
3. the survivors and the current choice (`qmatmul_with` without a config) are timed at every
   (shape, M) as CUDA-graph replays over rotating weight copies larger than L2 (as
   tune_decode.py), float32 activations (the model's).
Prints one table row per (type, shape, M) and writes every timing as JSON; `--emit-python
JSON` turns such a file into the GEMM_TABLE literals of qmatmul.py / qmatmul_kquants.py.

    python benchmarks/kernels/tune_gemm.py --json gemm.json          # GPU, ~5 min on an H100
    python benchmarks/kernels/tune_gemm.py --emit-python gemm.json   # anywhere
    python benchmarks/kernels/tune_gemm.py --dry-run                 # the grid, anywhere
    python benchmarks/kernels/tune_gemm.py --dry-compile --types Q4_0  # sm_90 ptxas, no GPU
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from llamapy.quant.types import QuantType, block_size, row_nbytes, type_size

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune_decode import graph_time  # noqa: E402  (CUDA-graph replay timing)

# (name, N, K): the matrices of SmolLM2-135M and Llama-3.2-1B (QKV and gate/up fused).
SHAPES = [
    ("smol qkv", 960, 576),
    ("smol o", 576, 576),
    ("smol gate_up", 3072, 576),
    ("smol down", 576, 1536),
    ("1b qkv", 3072, 2048),
    ("1b o", 2048, 2048),
    ("1b gate_up", 16384, 2048),
    ("1b down", 2048, 8192),
]
MS = (64, 256, 512)  # batched decode (64, 256 sequences) and a prefill chunk (512 tokens)
KQUANTS = {QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K}
LEGACY = {QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1, QuantType.Q8_0}
NIBBLE = LEGACY - {QuantType.Q8_0}
# Byte offsets of the fp16 scale fields of each block (ggml's block_* structs).
FP16_FIELDS = {
    QuantType.Q4_0: (0,), QuantType.Q4_1: (0, 2), QuantType.Q5_0: (0,), QuantType.Q5_1: (0, 2),
    QuantType.Q8_0: (0,), QuantType.Q2_K: (80, 82), QuantType.Q3_K: (108,),
    QuantType.Q4_K: (0, 2), QuantType.Q5_K: (0, 2), QuantType.Q6_K: (208,),
}  # fmt: skip
REL_TOL = 5e-3  # normwise; TF32 operands: tests/kernels/test_qmatmul.py allows ~4e-3
MAX_REGS = 128  # float32 values per thread for one tile (accumulator, dequantized W, x)
SMEM_LIMIT = 227 * 1024  # sm_90 dynamic shared memory per block
# Configs whose sm_90 build spills more than this many bytes per thread are dropped unrun (a
# dry compile found most large tiles of these kernels at 255 registers and 100s of bytes).
MAX_SPILL = 128
ROTATE_BYTES = 256 << 20  # weight copies per timing: more bytes than an H100 / H200 L2 holds


# --------------------------------------------------------------------------- the grid


def shapes_for(qtype: QuantType) -> list[tuple[str, int, int]]:
    return [s for s in SHAPES if s[2] % block_size(qtype) == 0]


def legacy_grid(qtype: QuantType) -> list[dict[str, int]]:
    """Configs of qmatmul._gemm_kernel. BLOCK_B blocks of 32 weights per K step (the nibble
    types' dots take 16 of each block at a time, two dots per step)."""
    out = []
    bbs = (1, 2, 4, 8) if qtype in NIBBLE else (1, 2, 4)
    for bm, bn, bb, warps, stages in itertools.product(
        (32, 64, 128), (64, 128, 256), bbs, (4, 8), (1, 2, 3)
    ):
        threads = 32 * warps
        if bm * bn / threads > MAX_REGS:  # accumulator
            continue
        if bn * 32 * bb / threads > MAX_REGS or bm * 32 * bb / threads > MAX_REGS:  # W, x
            continue
        if bm * bn / threads < 16:  # a tile too small for 8 warps
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": bb, "GROUP_M": 8,
                    "num_warps": warps, "num_stages": stages})  # fmt: skip
    return out


def kquant_grid(qtype: QuantType) -> list[dict[str, int]]:
    """Configs of qmatmul_kquants._gemm_kernel (a unit of 256 weights per K step, 8 dots of
    32). split 0: the rule in gemm_config for the tiles (split-K when the grid is small)."""
    out = []
    for bm, bn, warps, stages, split in itertools.product(
        (32, 64, 128), (32, 64, 128, 256), (4, 8), (1, 2, 3), (0, 1)
    ):
        threads = 32 * warps
        if bm * bn / threads > MAX_REGS or bm * bn / threads < 8:
            continue
        out.append({"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages,
                    "split": split})  # fmt: skip
    return out


def grid_for(qtype: QuantType) -> list[dict[str, int]]:
    return kquant_grid(qtype) if qtype in KQUANTS else legacy_grid(qtype)


def block_m_of(cfg: dict[str, int]) -> int:
    return cfg.get("BLOCK_M", cfg.get("block_m", 0))


def compile_key(cfg: dict[str, int]) -> tuple:
    """The kernel's constexprs and launch options (split is a runtime argument)."""
    return tuple(sorted((k, v) for k, v in cfg.items() if k != "split"))


def label(cfg: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def cells(qtype: QuantType, cfg: dict[str, int] | None = None) -> list[tuple[str, int, int, int]]:
    """(shape, N, K, M) this config is timed at: block_m <= M."""
    return [
        (name, n, k, m)
        for (name, n, k), m in itertools.product(shapes_for(qtype), MS)
        if cfg is None or block_m_of(cfg) <= m
    ]


# --------------------------------------------------------------------------- data


def random_blocks(qtype: QuantType, n: int, k: int, gen: np.random.Generator) -> torch.Tensor:
    """(n, row_bytes) uint8 blocks: random quants, fp16 scales like a trained model's."""
    nb = n * k // block_size(qtype)
    blocks = gen.integers(0, 256, (nb, type_size(qtype)), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = (gen.standard_normal(nb) * 10.0 ** gen.uniform(-3, -1.5, nb)).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(nb, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


# --------------------------------------------------------------------------- workers


def _dry_compile_safe(qtype_name: str, cfg: dict[str, int]) -> str:
    try:
        return dry_compile(QuantType[qtype_name], cfg)
    except Exception as exc:  # the dry compile itself broke: let the real run decide
        return f"unknown ({type(exc).__name__})"


def spill_of(built: str) -> int:
    """Bytes spilled per thread from a `dry_compile` status (0 when not spilling)."""
    return int(built.split("stack=")[1].split()[0]) if built.startswith("spills") else 0


def keep_built(statuses: dict[tuple, str], max_spill: int) -> dict[tuple, bool]:
    """Which (type, compile key) builds to run: not failed, and spilling at most `max_spill`
    bytes or twice the least spill of the type's builds, whichever is more (a kernel that
    spills at every tile size still gets its least-spilling tiles timed)."""
    least: dict[str, int] = {}
    for (qname, _), built in statuses.items():
        if not built.startswith("fails"):
            least[qname] = min(least.get(qname, 1 << 30), spill_of(built))
    return {
        key: not built.startswith("fails")
        and spill_of(built) <= max(max_spill, 2 * least.get(key[0], 0))
        for key, built in statuses.items()
    }


@functools.cache
def _weight(qtype_name: str, n: int, k: int, device: str) -> tuple[torch.Tensor, object]:
    """Random blocks and their packed weight, made once per worker process."""
    from llamapy.kernels.triton.qmatmul import pack_weight

    qtype = QuantType[qtype_name]
    data = random_blocks(qtype, n, k, np.random.default_rng()).to(device)
    return data, pack_weight(data, qtype, (n, k))


def _check_one(
    qtype_name: str, cfg: dict[str, int], device: str = "cuda"
) -> tuple[str, dict[str, int], str]:
    """Compile and run `cfg` once per shape and M (fills the disk cache for the timing
    process) and check it against the float64 reference at the first shape.
    -> (type, cfg, "ok" or why not)."""
    from llamapy.kernels.triton.qmatmul import qmatmul_reference, qmatmul_with

    qtype = QuantType[qtype_name]
    try:
        for i, (_, n, k) in enumerate(shapes_for(qtype)):
            data, w = _weight(qtype_name, n, k, device)
            for m in MS:
                if block_m_of(cfg) > m:
                    continue
                x = torch.randn(m, k, device=device)
                y = qmatmul_with(x, w, path="gemm", gemm_config=cfg)
                if i == 0 and m == MS[0]:
                    ref = qmatmul_reference(x.double(), data, qtype, (n, k))
                    err = float((y.double() - ref).norm() / ref.norm())
                    if not err <= REL_TOL:
                        return qtype_name, cfg, f"wrong: relative error {err:.2e}"
            if device == "cuda":
                torch.cuda.synchronize()
    except Exception as exc:  # out of resources, compile errors: drop the config
        return qtype_name, cfg, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return qtype_name, cfg, "ok"


def check_configs(
    todo: list[tuple[str, dict[str, int]]], workers: int, max_spill: int
) -> dict[str, list[dict[str, int]]]:
    """Over a pool of spawned GPU processes: dry-compiles every kernel for sm_90 (CPU only),
    drops the builds `keep_built` rejects, then runs `_check_one` on the rest -> surviving
    configs by type."""
    good: dict[str, list[dict[str, int]]] = defaultdict(list)
    ctx = multiprocessing.get_context("spawn")
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        builds = {(q, compile_key(c)): (q, c) for q, c in todo}
        futures = {key: pool.submit(_dry_compile_safe, *qc) for key, qc in builds.items()}
        statuses = {key: fut.result() for key, fut in futures.items()}
        keep = keep_built(statuses, max_spill)
        for key, built in statuses.items():
            if not keep[key]:
                print(f"  drop {key[0]} {label(builds[key][1])}: {built}", flush=True)
        print(f"  dry compile: {sum(keep.values())}/{len(keep)} kernels kept "
              f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        runs = [pool.submit(_check_one, q, c) for q, c in todo if keep[(q, compile_key(c))]]
        for done, fut in enumerate(cf.as_completed(runs), 1):
            qname, cfg, status = fut.result()
            if status == "ok":
                good[qname].append(cfg)
            else:
                print(f"  drop {qname} {label(cfg)}: {status}", flush=True)
            if done % 50 == 0:
                print(f"  checked {done}/{len(runs)} ({time.time() - t0:.0f} s)", flush=True)
    return good


# --------------------------------------------------------------------------- timing


def time_type(
    qtype: QuantType,
    configs: list[dict[str, int]],
    results: list[dict],
    json_path: str | None,
    deadline: float,
    device: str = "cuda",
    timer: Callable[[list[Callable[[], object]]], float] = graph_time,
) -> None:
    """Times the current choice and `configs` at each (shape, M) of `qtype`: appends rows
    to `results` (and rewrites `json_path`), prints a table row per cell."""
    from llamapy.kernels.triton.qmatmul import pack_weight, qmatmul_with

    gpu = torch.cuda.get_device_name() if device == "cuda" else device

    gen = np.random.default_rng(0)
    for name, n, k in shapes_for(qtype):
        nbytes = n * row_nbytes(qtype, k)
        copies = max(2, min(32, math.ceil(ROTATE_BYTES / nbytes)))
        ws = [
            pack_weight(random_blocks(qtype, n, k, gen).to(device), qtype, (n, k))
            for _ in range(copies)
        ]
        for m in MS:
            if time.time() > deadline:
                print(f"  out of time: skipping {qtype.name} {name} M={m}", flush=True)
                continue
            x = torch.randn(m, k, device=device)
            out = torch.empty(m, n, device=device)

            def timed(cfg: dict[str, int] | None, x=x, out=out, ws=ws) -> float:
                return timer(
                    [functools.partial(qmatmul_with, x, w, out=out, gemm_config=cfg) for w in ws]
                )

            base = timed(None)
            row = {"qtype": qtype.name, "shape": name, "n": n, "k": k, "m": m}
            results.append(row | {"cfg": None, "us": base})
            best = (base, "current")
            for cfg in configs:
                if block_m_of(cfg) > m:
                    continue
                try:
                    t = timed(cfg)
                except Exception as exc:
                    print(f"  skip {label(cfg)}: {type(exc).__name__}", flush=True)
                    continue
                results.append(row | {"cfg": cfg, "us": t})
                best = min(best, (t, label(cfg)))
            tflops = 2 * m * n * k / (best[0] * 1e-6) / 1e12
            print(f"| {qtype.name} | {name} | {m} | {base:.1f} | {best[0]:.1f} | "
                  f"{base / best[0]:.2f}x | {tflops:.0f} | {best[1]} |", flush=True)  # fmt: skip
            if json_path:  # as we go: a timed-out sweep keeps what it measured
                with open(json_path, "w") as f:
                    json.dump({"device": gpu, "results": results}, f)
        del ws


# --------------------------------------------------------------------------- the tables


def best_table(results: list[dict], min_gain: float = 1.02) -> dict[str, dict]:
    """{"legacy" | "kquants": {key: cfg}} from the timings: per GEMM_TABLE key (type, M
    bucket, size class), the config with the least geometric mean of t / (best t of the cell)
    over the key's cells where it ran everywhere; kept when it beats the current choice's
    mean by `min_gain`. Keys follow qmatmul_kquants.gemm_key."""
    from llamapy.kernels.triton.qmatmul_kquants import gemm_key

    best_of: dict[tuple, float] = {}
    by_key: dict[tuple, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    cfgs: dict[str, dict | None] = {}
    for r in results:
        qtype = QuantType[r["qtype"]]
        key = gemm_key(qtype, r["m"], r["n"], r["k"])
        if key is None:
            continue
        cell = (r["shape"], r["m"])
        ident = json.dumps(r["cfg"], sort_keys=True)
        cfgs[ident] = r["cfg"]
        by_key[key][ident][cell] = r["us"]
        best_of[(key, cell)] = min(best_of.get((key, cell), math.inf), r["us"])
    tables: dict[str, dict] = {"legacy": {}, "kquants": {}}
    for key, per_cfg in sorted(by_key.items()):
        all_cells = set().union(*(set(c) for c in per_cfg.values()))

        def score(times: dict[tuple, float], key=key, all_cells=all_cells) -> float:
            if set(times) != all_cells:
                return math.inf
            ratios = [times[c] / best_of[(key, c)] for c in all_cells]
            return math.exp(sum(map(math.log, ratios)) / len(ratios))

        current = score(per_cfg.get("null", {}))
        ident, s = min(((i, score(t)) for i, t in per_cfg.items() if i != "null"),
                       key=lambda p: p[1], default=(None, math.inf))  # fmt: skip
        if ident is None or not s * min_gain <= current:
            continue
        family = "kquants" if QuantType[key[0]] in KQUANTS else "legacy"
        tables[family][key] = cfgs[ident] | {"_gain": current / s}
    return tables


def entry_lines(key: tuple[str, int, str], cfg: dict[str, int], note: str) -> list[str]:
    """`    ("Q4_0", 64, "small"): dict(BLOCK_M=64, ...),  # note`, wrapped at 100 columns."""
    head = f'    ("{key[0]}", {key[1]}, "{key[2]}"): dict('
    items = [f"{k}={v}" for k, v in cfg.items()]
    lines, line = [], head
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else f"),  # {note}")
        if len(line) + len(piece) + 1 > 100 and line.strip():
            lines.append(line.rstrip())
            line = " " * len(head)
        line += ("" if line.endswith("(") or not line.strip() else " ") + piece
    return [*lines, line]


def emit_python(path: str) -> str:
    """The GEMM_TABLE literals (one per module) of the best configs in a sweep's JSON."""
    with open(path) as f:
        doc = json.load(f)
    tables = best_table(doc["results"])
    out = [
        f"# benchmarks/kernels/tune_gemm.py on {doc.get('device', '?')[:50]}",
        "# (gain: the rule's geometric-mean time over the entry's, across the key's cells)",
    ]
    for family, module in (("legacy", "qmatmul.py"), ("kquants", "qmatmul_kquants.py")):
        out += [f"# {module}", "# fmt: off"]
        out.append("GEMM_TABLE: dict[tuple[str, int, str], dict[str, int]] = {")
        for key, cfg in tables[family].items():
            gain = cfg.pop("_gain")
            if cfg.get("split") == 0:
                del cfg["split"]  # the rule's split
            out += entry_lines(key, cfg, f"{gain:.2f}x")
        out += ["}", "# fmt: on"]
    return "\n".join(out)


# --------------------------------------------------------------------------- dry compile


def dry_compile(qtype: QuantType, cfg: dict[str, int]) -> str:
    """Compile cfg's kernel for sm_90 with Triton's bundled ptxas (no GPU) -> "ok ..." with
    registers, spills and shared memory, or why not."""
    import pathlib
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llamapy.kernels.triton import INTERPRET
    from llamapy.kernels.triton import qmatmul as qm
    from llamapy.kernels.triton import qmatmul_kquants as qk

    if INTERPRET:
        raise RuntimeError("no sm_90 build of interpreted kernels: unset TRITON_INTERPRET")
    if qtype in KQUANTS:
        fn = qk._gemm_kernel
        tmap = {torch.uint8: "*u8", torch.int8: "*i8", torch.float16: "*fp16"}
        fields = [tmap[f[1]] for f in qk._FIELDS[qtype]]
        fields += [fields[0]] * (6 - len(fields))
        sig = {"x_ptr": "*fp32", "out_ptr": "*fp32"}
        sig |= {nm: t for nm, t in zip("ABCDEF", fields, strict=True)}
        sig |= {"s" + nm: "i32" for nm in "ABCDEF"}
        sig |= dict.fromkeys(("M", "N", "U", "stride_xm", "stride_om", "stride_os"), "i32")
        sig["per_split"] = "i32"
        consts = dict(QTYPE=int(qtype), UNIT=block_size(qtype), L=qk._LANES[qtype],
                      BM=cfg["block_m"], BN=cfg["block_n"], INTERP=False)  # fmt: skip
    else:
        fn = qm._gemm_kernel
        qs = "*i8" if qtype == QuantType.Q8_0 else "*u8"
        sig = {"x_ptr": "*fp32", "qs_ptr": qs, "qh_ptr": "*i32", "d_ptr": "*fp16",
               "m_ptr": "*fp16", "bias_ptr": "*fp32", "out_ptr": "*fp32",
               "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}  # fmt: skip
        consts = dict(QT=qm._CODES[qtype], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_B=cfg["BLOCK_B"], GROUP_M=cfg["GROUP_M"], HAS_BIAS=False,
                      INTERP=False)  # fmt: skip
    sig |= dict.fromkeys(consts, "constexpr")
    where = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=where)
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    except Exception as exc:
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    shared = kernel.metadata.shared
    tool = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    regs, stack = (int(found.group(1)), int(found.group(2))) if found else (-1, -1)
    if shared > SMEM_LIMIT:
        return f"fails: {shared} B shared memory"
    if stack > 0:
        return f"spills: regs={regs} stack={stack} shared={shared}"
    return f"ok regs={regs} shared={shared}"


# --------------------------------------------------------------------------- main


def current_configs(qtype: QuantType) -> dict[int, dict[str, int]]:
    """The rule's GEMM config at each swept M (at the largest shape), as the grid writes it."""
    from llamapy.kernels.triton import qmatmul as qm
    from llamapy.kernels.triton import qmatmul_kquants as qk

    _, n, k = shapes_for(qtype)[-1]
    out = {}
    for m in MS:
        if qtype in KQUANTS:
            c = qk.gemm_config(qtype, m, n, k, 132)
            out[m] = {"block_m": c.block_m, "block_n": c.block_n, "num_warps": c.num_warps,
                      "num_stages": c.num_stages}  # fmt: skip
        else:
            out[m] = qm._gemm_config(qtype, m, n, k)
    return out


def dry(qtypes: list[QuantType], build: bool, workers: int, max_spill: int) -> None:
    """Lists the grid; with `build`, each kernel's sm_90 build (and the current rule's)."""
    statuses: dict[tuple, str] = {}
    if build:
        todo = {(q.name, compile_key(c)): (q.name, c) for q in qtypes for c in grid_for(q)}
        for q in qtypes:
            todo |= {(q.name, compile_key(c)): (q.name, c) for c in current_configs(q).values()}
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {key: pool.submit(_dry_compile_safe, *qc) for key, qc in todo.items()}
            statuses = {key: fut.result() for key, fut in futures.items()}
    keep = keep_built(statuses, max_spill)
    for qtype in qtypes:
        grid = grid_for(qtype)
        kernels = {compile_key(c) for c in grid}
        timings = sum(len(cells(qtype, c)) for c in grid)
        kept = sum(keep.get((qtype.name, ck), False) for ck in kernels)
        print(f"{qtype.name}: {len(grid)} configs, {len(kernels)} kernels"
              + (f" ({kept} kept)" if build else "")
              + f", {len(cells(qtype))} cells, {timings} timings")  # fmt: skip
        if build:
            for m, cfg in current_configs(qtype).items():
                print(f"  current M={m}: {label(cfg)}  {statuses[(qtype.name, compile_key(cfg))]}")
        for cfg in grid:
            key = (qtype.name, compile_key(cfg))
            status = f"{statuses[key]}{'' if keep[key] else '  (dropped)'}" if build else ""
            print(f"  {label(cfg)}  {status}".rstrip(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q6_K")
    parser.add_argument("--json", help="write every timing here (as the sweep goes)")
    parser.add_argument("--emit-python", metavar="JSON", help="print GEMM_TABLE literals")
    parser.add_argument("--dry-run", action="store_true", help="list the grid, run nothing")
    parser.add_argument("--dry-compile", action="store_true", help="sm_90 compile, no GPU")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--budget-s", type=float, default=330, help="stop timing after this")
    parser.add_argument("--max-spill", type=int, default=MAX_SPILL, help="bytes per thread")
    args = parser.parse_args()
    if args.emit_python:
        print(emit_python(args.emit_python))
        return
    try:
        qtypes = [QuantType[t] for t in args.types.split(",")]
    except KeyError as exc:
        sys.exit(f"tune_gemm: unknown type {exc}")
    bad = [q.name for q in qtypes if q not in LEGACY | KQUANTS]
    if bad:
        sys.exit(f"tune_gemm: no quantized GEMM kernel to tune for {', '.join(bad)}")
    if args.dry_run or args.dry_compile:
        dry(qtypes, args.dry_compile, args.workers, args.max_spill)
        return
    if not torch.cuda.is_available():
        sys.exit("tune_gemm: needs a CUDA GPU (try --dry-run or --dry-compile)")
    t0 = time.time()
    print(f"{torch.cuda.get_device_name()}; {args.workers} compile workers")
    todo = [(q.name, c) for q in qtypes for c in grid_for(q)]
    good = check_configs(todo, args.workers, args.max_spill)
    print(f"({time.time() - t0:.0f} s: {sum(map(len, good.values()))}/{len(todo)} configs ok)")
    print("| type | matrix | M | current us | best us | gain | best TFLOPS | best |")
    results: list[dict] = []
    for i, qtype in enumerate(qtypes):  # each type gets an equal share of the time left
        share = (t0 + args.budget_s - time.time()) / (len(qtypes) - i)
        deadline = time.time() + max(share, 15.0)  # late checks still leave each type a cell
        time_type(qtype, good.get(qtype.name, []), results, args.json, deadline)
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f)
        print(emit_python(args.json))


if __name__ == "__main__":
    main()
