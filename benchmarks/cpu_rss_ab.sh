#!/usr/bin/env bash
# Peak RSS of `llamapy run` under two source trees, alternating (issue 7's memory target is
# measured with /usr/bin/time). Usage:
#   bash benchmarks/cpu_rss_ab.sh BEFORE_SRC AFTER_SRC ROUNDS "MODEL N [FLAGS]" ["MODEL N [FLAGS]" ...]
# e.g. git worktree add /tmp/before <rev>; bash benchmarks/cpu_rss_ab.sh /tmp/before/src src 2 \
#   "smollm2-135m 1" "gemma3-270m 256" "/tmp/1b-Q4_0.gguf 32 -c 1024"
set -euo pipefail
before=$(realpath "$1") after=$(realpath "$2") rounds=$3
shift 3
prompt="Write a long story about a dragon who learns to read."
cd /tmp  # neither tree is importable from the working directory
for _ in $(seq "$rounds"); do
  for case in "$@"; do
    read -r model n flags <<<"$case"
    for label in before after; do
      src=$before; [ "$label" = after ] && src=$after
      # shellcheck disable=SC2086  # the flags split into words
      peak=$(PYTHONPATH=$src /usr/bin/time -f "%e s %M KB" python -m llamapy run -m "$model" \
        -n "$n" $flags -t 2 --temp 0 "$prompt" 2>&1 >/dev/null | tail -1)
      echo "$label $model -n $n $flags: $peak"
    done
  done
done
