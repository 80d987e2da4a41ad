"""The CPU decode step's two threads under GOMP_SPINCOUNT settings, idle or beside busy
processes (issue 7; benchmarks/RESULTS.md, twenty-second and twenty-third sessions).

torch's libgomp runs the native step's parallel regions; a waiting thread spins
GOMP_SPINCOUNT times (300,000 by default) before it sleeps. Beside a busy process the thread
it waits for is often descheduled, and the spinning burns the time it needs. The count is read
when libgomp loads, so each run is a fresh `llamapy bench` process with the setting in its
environment; the settings alternate within each round, pinned with `taskset` to CORES, and
busy processes (`python -c "while True: pass"`) share those cores.

    python benchmarks/cpu_spin_bench.py MODEL idle|busy [--cores 0,1] [--rounds 3]
        [--settings default,100000,30000,10000,1000,0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def bench(model: str, cores: str, spin: str | None, args: list[str], limit: float):
    """t/s of each test of one `llamapy bench` run, or None past `limit` seconds."""
    env = dict(os.environ)
    env.pop("GOMP_SPINCOUNT", None)
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    cmd = ["taskset", "-c", cores, sys.executable, "-m", "llamapy", "bench", "-m", model,
           "-t", "2", "-o", "json", *args]  # fmt: skip
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode:
        print(out.stderr[-2000:], flush=True)
        return None
    return [r["avg_ts"] for r in json.loads(out.stdout)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("mode", choices=("idle", "busy"))
    parser.add_argument("--cores", default="0,1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default="default,100000,30000,10000,1000,0")
    args = parser.parse_args()
    settings = [None if s == "default" else s for s in args.settings.split(",")]
    t0 = time.time()
    warm = bench(args.model, args.cores, None, ["-p", "16", "-n", "16", "-r", "1"], 600)
    print(f"warm-up {warm} in {time.time() - t0:.0f} s", flush=True)
    res: dict[tuple[str, str | None], list[float | None]] = {}

    def record(key: str, spin: str | None, value: float | None) -> None:
        res.setdefault((key, spin), []).append(value)
        print(key, spin, value, flush=True)

    if args.mode == "idle":
        for _ in range(args.rounds):
            for spin in settings:
                r = bench(args.model, args.cores, spin, ["-p", "0", "-n", "128", "-r", "3"], 120)
                record("idle tg128", spin, r[0] if r else None)
                r = bench(args.model, args.cores, spin, ["-p", "512", "-n", "0", "-r", "2"], 120)
                record("idle pp512", spin, r[0] if r else None)
    else:
        for nbusy in (1, 2):
            spin_cmd = [sys.executable, "-c", "while True: pass"]
            procs = [subprocess.Popen(["taskset", "-c", args.cores, *spin_cmd])
                     for _ in range(nbusy)]  # fmt: skip
            try:
                for _ in range(args.rounds):
                    for spin in settings:
                        r = bench(args.model, args.cores, spin, ["-p", "0", "-n", "64", "-r", "2"],
                                  30)  # fmt: skip
                        record(f"busy{nbusy} tg64", spin, r[0] if r else None)
            finally:
                for p in procs:
                    p.kill()
    keys = sorted({k for k, _ in res})
    print("\n| GOMP_SPINCOUNT | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for spin in settings:
        cells = []
        for key in keys:
            vals = res[(key, spin)]
            ok = [v for v in vals if v is not None]
            med = f"{statistics.median(ok):.1f}" if ok else "-"
            runs = " / ".join("past limit" if v is None else f"{v:.1f}" for v in vals)
            cells.append(f"{med} ({runs})")
        print(f"| {spin or 'default (300000)'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
