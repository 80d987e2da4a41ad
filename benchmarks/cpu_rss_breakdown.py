"""What a CPU generation's resident set is made of (issue 7's memory target): load a model
with the Python API, generate N greedy tokens, then print /proc/self/smaps_rollup's split
(anonymous memory: what the process owns; clean file pages: mostly shared libraries' code)
and the largest mappings by Rss.

    python benchmarks/cpu_rss_breakdown.py MODEL [-n 32] [-c 1024] [-t 2] [--top 8]

Linux only (it reads /proc/self).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from llamapy import LLM, SamplingParams

PROMPT = "Write a long story about a dragon who learns to read."


def rollup() -> dict[str, int]:
    """/proc/self/smaps_rollup's fields, KB."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0])
    return fields


def by_mapping() -> collections.Counter[str]:
    """Rss KB summed by the mapped file's name ([anon], [heap], ... for the others)."""
    rss: collections.Counter[str] = collections.Counter()
    name = "?"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            rss[name] += int(line.split()[1])
    return rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-c", type=int, default=1024)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    llm = LLM(args.model, n_ctx=args.c, n_threads=args.t)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=args.n))
    r = rollup()
    print(f"Rss {r['Rss']:,} KB = anonymous {r['Anonymous']:,} KB + clean file pages "
          f"{r['Private_Clean'] + r['Shared_Clean']:,} KB (+ dirty file pages "
          f"{r['Private_Dirty'] + r['Shared_Dirty'] - r['Anonymous']:,} KB)")  # fmt: skip
    for name, kb in by_mapping().most_common(args.top):
        print(f"{kb // 1024:8,} MiB  {name}")


if __name__ == "__main__":
    main()
