#!/usr/bin/env bash
# The test command (README "Quick start"; CI's .ci/run calls exactly this).
# Sets everything up first (idempotent: venv, MinIO, SeaweedFS and kustomize builds, Prometheus), then runs
# the fast suite and the slow end-to-end tests (real SmolLM2, kfp.local + MinIO).
#   scripts/test.sh            everything (what CI runs)
#   scripts/test.sh --fast     skip the slow end-to-end tests
#   scripts/test.sh -- ARGS    extra pytest arguments (e.g. -- -k store)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
fast=0
if [[ "${1:-}" == "--fast" ]]; then fast=1; shift; fi
[[ "${1:-}" == "--" ]] && shift
scripts/setup.sh
PY="${HETLORA_VENV:-$ROOT/.venv}/bin/python"
if [[ $fast == 1 ]]; then
  exec "$PY" -m pytest -m "not slow" "$@"
fi
exec "$PY" -m pytest "$@"
