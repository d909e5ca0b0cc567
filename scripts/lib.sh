#!/usr/bin/env bash
# What the scripts here share; sourced, never run:
#
#   # shellcheck source-path=SCRIPTDIR source=lib.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# (The shebang, strict mode and exec bit are what tests/test_scripts.py asks of every scripts/*.sh;
# strict mode is the sourcing script's anyway.) It only sets variables and defines functions, so
# sourcing it has no side effect.
set -euo pipefail

# The checkout (this file's folder's parent) and where built tools are cached between runs
# (scripts/setup.sh fills $BIN; tests/server_process.py and tests/real_cluster.py look there).
# shellcheck disable=SC2034  # used by the scripts that source this file
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${HETLORA_CACHE:-$HOME/.cache/hetlora}"
# shellcheck disable=SC2034
BIN="$CACHE/bin"
