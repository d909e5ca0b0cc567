#!/usr/bin/env bash
# Run every benchmark in this folder (benchmarks/bench_*.py) with the given flags, e.g.
#   benchmarks/run_all.sh --quick     # all quick variants (CI smoke: about 2-3 minutes on 2 cores)
#   benchmarks/run_all.sh             # the full measurements (tens of minutes; see README.md)
# Each script prints its table and writes bench-out/<name>[-quick].json. Stops at the first failure.
# BENCH_SKIP="pipeline_overhead flops" skips benchmarks by name; PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
skip=" ${BENCH_SKIP:-} "
summary=()
start_all=$(date +%s)
for script in benchmarks/bench_*.py; do
  name="$(basename "$script" .py)"
  name="${name#bench_}"
  if [[ "$skip" == *" $name "* ]]; then
    summary+=("$(printf '%-20s skipped' "$name")")
    continue
  fi
  echo "=== $name $*"
  t0=$(date +%s)
  "$py" "$script" "$@"
  summary+=("$(printf '%-20s %4d s' "$name" $(( $(date +%s) - t0 )))")
done
echo
echo "=== done in $(( $(date +%s) - start_all )) s (nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%s\n' "${summary[@]}"
