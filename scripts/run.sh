#!/usr/bin/env bash
# The main job (README "Quick start"): set up, then a local federated fine-tuning of SmolLM2 on
# Shakespeare roles through kfp.local with a local store. Arguments go to `hetlora run`
# (e.g. scripts/run.sh --config configs/smoke.yaml --out runs/smoke). Rerun to resume.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh python
exec "${HETLORA_VENV:-$ROOT/.venv}/bin/hetlora" run "$@"
