"""Instruction mix of the decode GEMV's K loop, compiled for Hopper on a host without a GPU.

Triton's wheel carries ptxas and cuobjdump, so a kernel compiles to sm_90 SASS anywhere;
this counts the instructions of the GEMV's main loop (the largest backward branch) per weight
one thread handles in one K step. It cannot time anything: it shows where a kernel spends
issue slots (conversions, shuffles of cross-lane reductions, shared-memory layout changes)
before a device call is spent on it. Divisibility by 16 is assumed for every pointer and for
N, K and the row stride, as Triton's launcher specializes them at the decode shapes.

    python benchmarks/kernels/sass_count.py --type Q4_0 --tile 32x8 --warps 4 [--pro norm]
        [--q8x | --byte-twin] [--splits S] [--maxnreg N] [--dump FILE]

It also prints the registers a thread takes (cuobjdump -res-usage), which bound the warps an
SM keeps resident. See benchmarks/RESULTS.md (seventeenth session) for what the counts did and
did not predict.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels, do not interpret them

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llamapy.kernels.triton import qmatmul  # noqa: E402
from llamapy.quant.types import QuantType  # noqa: E402

_DIV16 = {"N", "K", "stride_xm"}
_PROLOGUES = {"none": 0, "norm": 1, "silu": 2, "gelu": 3, "merge": 4}
_QS_TYPES = {QuantType.Q8_0: "*i8", QuantType.F16: "*fp16", QuantType.BF16: "*bf16",
             QuantType.F32: "*fp32"}  # fmt: skip


def compile_for_hopper(
    fn, signature: dict[str, str], constexprs: dict, num_warps: int, maxnreg: int | None = None
):
    """A triton CompiledKernel for sm_90 (no GPU needed)."""
    div = [i for i, name in enumerate(signature) if signature[name].startswith("*")
           or name in _DIV16]  # fmt: skip
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})  # fmt: skip
    target = GPUTarget("cuda", 90, 32)
    options: dict[str, int] = {"num_warps": num_warps}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=target, options=options)


def sass(kernel, what: str) -> str:
    """cuobjdump's `what` (-sass, -res-usage) of the kernel, by the copy in Triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, what, f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def main_loop(text: str) -> collections.Counter:
    """Opcode counts of the largest loop (from a backward branch's target to the branch)."""
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    best: collections.Counter = collections.Counter()
    for addr, op in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", op)
        if not m or int(m.group(1), 16) >= addr:
            continue
        start = int(m.group(1), 16)
        body = collections.Counter(
            re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0]
            for a, o in ins
            if start <= a <= addr
        )
        if sum(body.values()) > sum(best.values()):
            best = body
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--type", default="Q4_0", help="legacy or float weight type")
    p.add_argument("--tile", default="32x8", help="BLOCK_N x BLOCK_B")
    p.add_argument("--rows", type=int, default=1, help="BLOCK_M (rows of x)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--pro", choices=sorted(_PROLOGUES), default="none")
    p.add_argument("--q8x", action="store_true", help="int8 activations, one level")
    p.add_argument(
        "--byte-twin",
        action="store_true",
        help="Q4_1 read from its quants one a byte (qmatmul.BYTE_TWIN_TYPES)",
    )
    p.add_argument(
        "--splits", type=int, default=4,
        help="--pro merge: the decode attention's key splits x merges (heads of 64)",
    )  # fmt: skip
    p.add_argument("--maxnreg", type=int, help="cap the registers a thread takes")
    p.add_argument("--dump", help="write the whole SASS here")
    args = p.parse_args()
    try:
        qtype = QuantType[args.type]
        block_n, block_b = (int(v) for v in args.tile.lower().split("x"))
    except (KeyError, ValueError):
        p.error(f"bad --type {args.type!r} or --tile {args.tile!r} (want e.g. Q4_0, 32x8)")
    if qtype not in qmatmul._CODES:
        p.error(f"{qtype.name} has no legacy GEMV kernel")
    if args.q8x and qtype not in qmatmul._Q8X_TYPES:
        p.error(f"--q8x needs a legacy quant type, got {qtype.name}")
    if args.byte_twin and (qtype not in qmatmul.BYTE_TWIN_TYPES or args.q8x):
        p.error(
            f"--byte-twin takes {', '.join(t.name for t in qmatmul.BYTE_TWIN_TYPES)} without --q8x"
        )
    if args.pro == "merge" and (args.q8x or args.splits < 1):
        p.error("--pro merge takes float32 x (no --q8x) and --splits >= 1")
    for name, v in (("tile", block_n), ("tile", block_b), ("rows", args.rows),
                    ("warps", args.warps)):  # fmt: skip
        if v < 1 or v & (v - 1):
            p.error(f"--{name} values must be powers of two, got {v}")
    qs = "*i32" if args.q8x else _QS_TYPES.get(qtype, "*u8")
    signature = {"x_ptr": "*fp32", "qs_ptr": qs, "qh_ptr": "*i32", "d_ptr": "*fp16",
                 "m_ptr": "*fp16", "bias_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*fp32",
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "steps_per_split": "i32", "eps": "fp32"}  # fmt: skip
    width = 16 if qtype in qmatmul._NIBBLE_TYPES and not args.byte_twin else 32
    code = qmatmul._Q4_1_BYTES if args.byte_twin else qmatmul._CODES[qtype]
    # RMS_CHUNK for the 1B's 2048-wide rows (K itself is a runtime argument here)
    constexprs = dict(QT=code, BLOCK_M=args.rows, BLOCK_N=block_n,
                      BLOCK_B=block_b, SPLIT=1, HAS_BIAS=False, PRO=_PROLOGUES[args.pro],
                      HAS_RES=False, INTERP=False, WB=width // (4 if args.q8x else 1), PF=0,
                      PDL=False, Q8X=int(args.q8x),
                      RMS_CHUNK=qmatmul.rms_chunk(2048, args.rows),
                      MERGE_S=args.splits if args.pro == "merge" else 1, HEAD_D=64)  # fmt: skip
    kernel = compile_for_hopper(
        qmatmul._gemv_kernel, signature, constexprs, args.warps, args.maxnreg
    )
    text = sass(kernel, "-sass")
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    body = main_loop(text)
    weights = args.rows * block_n * block_b * 32 / (32 * args.warps)  # per thread and step
    total = sum(body.values())
    usage = re.search(r"REG:(\d+) STACK:(\d+)", sass(kernel, "-res-usage"))
    regs = f"{usage.group(1)} registers, {usage.group(2)} B stack" if usage else "registers ?"
    print(
        f"{qtype.name} {block_n}x{block_b} rows={args.rows} warps={args.warps} "
        f"pro={args.pro} q8x={int(args.q8x)}{' bytes' * args.byte_twin}: {total} instructions "
        f"a K step, {weights:.0f} "
        f"weights a thread, {total / max(weights, 1):.2f} a weight; {regs}"
    )
    print("  " + ", ".join(f"{op} {n}" for op, n in body.most_common(16)))


if __name__ == "__main__":
    main()
