"""A/B of settings in one GPU call: `benchmarks/gpu_bench.py` run under each setting in turn
(environment variables), for several rounds, alternating, then one markdown row per file and
test with every round's t/s of every setting and each setting's mean over the first's.

    python benchmarks/gpu_ab.py --setting twins:LLAMAPY_GPU_KQUANT_TWINS=1 \
        --setting kquants:LLAMAPY_GPU_KQUANT_TWINS=0 [--rounds 2] [--md OUT.md] \
        -- FILES --no-check --tg 128 --pp 512 --reps 2 [--batch 64]

Everything after `--` goes to gpu_bench.py unchanged (its --json is added). A setting is
`NAME:VAR=VALUE[,VAR=VALUE...]` (a VALUE may hold commas not followed by `VAR=`), or
`NAME:` for the environment as it is. Alternating
settings within one call is what makes a few-percent difference readable: the card's clocks
and the host drift between calls and leases, not within a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.+")


def setting(text: str) -> tuple[str, dict[str, str]]:
    """`NAME:VAR=VALUE,VAR=VALUE` -> (NAME, {VAR: VALUE}); `NAME:` sets nothing."""
    name, sep, assignments = text.partition(":")
    if not sep or not name or not set(name) <= NAME_CHARS:
        raise argparse.ArgumentTypeError(
            f"expected NAME:VAR=VALUE[,VAR=VALUE...] with a plain NAME, got {text!r}"
        )
    env = {}
    for item in filter(None, re.split(r",(?=[A-Za-z_][A-Za-z0-9_]*=)", assignments)):
        var, eq, value = item.partition("=")
        if not eq or not var.isidentifier():
            raise argparse.ArgumentTypeError(f"expected VAR=VALUE in {text!r}, got {item!r}")
        env[var] = value
    return name, env


def rows(report: dict) -> dict[tuple[str, str], float]:
    """gpu_bench.py's --json output -> {(file name, test): t/s}."""
    return {
        (name, row["test"]): float(row["ts"])
        for name, res in report.items()
        for row in res.get("bench", [])
    }


def table(names: list[str], runs: dict[str, list[dict[tuple[str, str], float]]]) -> str:
    """Markdown: per (file, test) every round's t/s of each setting (in `names` order) and
    each later setting's mean over the first's."""
    first = names[0]
    keys = sorted({key for rounds in runs.values() for r in rounds for key in r})
    head = "| file | test | " + " | ".join(names)
    head += "".join(f" | {n} / {first}" for n in names[1:]) + " |"
    lines = [head, "|" + " --- |" * 2 + " ---: |" * (2 * len(names) - 1)]
    for key in keys:
        cells, means = [], {}
        for name in names:
            values = [r[key] for r in runs[name] if key in r]
            means[name] = statistics.mean(values) if values else None
            cells.append(" / ".join(f"{v:.1f}" for v in values) or "-")
        ratios = [
            f"{means[n] / means[first]:.3f}" if means[n] and means[first] else "-"
            for n in names[1:]
        ]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", type=setting, action="append", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--md", type=Path, help="also write the table here")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    if cut == len(argv):
        ap.error("after --: the files and gpu_bench.py's options")
    bench_args = argv[cut + 1 :]
    names = [name for name, _ in args.setting]
    if len(names) < 2 or len(set(names)) != len(names):
        ap.error("give at least two --setting, with different names")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if not bench_args or "--json" in bench_args:
        ap.error("after --: the files and gpu_bench.py's options (gpu_ab.py adds --json)")
    runs: dict[str, list[dict[tuple[str, str], float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for name, env in args.setting:
                out = Path(tmp) / f"{name}-{rnd}.json"
                cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), *bench_args,
                       "--json", str(out)]  # fmt: skip
                print(f"== round {rnd + 1}, {name} {env}", flush=True)
                done = subprocess.run(cmd, env={**os.environ, **env})
                if done.returncode:
                    sys.exit(f"gpu_bench.py failed under {name} (exit {done.returncode})")
                runs[name].append(rows(json.loads(out.read_text())))
    text = table(names, runs)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
