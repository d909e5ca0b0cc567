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

# ------------------------------------------------------------------ Go modules built from source
# `go install module@version` refuses a module whose go.mod has replace directives, and Go ignores a
# dependency's replaces anyway. So a module like that (SeaweedFS in setup.sh, k8s.io/kubernetes in
# build-apiserver.sh) is built from a throwaway wrapper module that requires it and repeats its
# replaces, so the build resolves exactly as the module's own would.

# go_module_gomod MODULE VERSION: print the path of MODULE@VERSION's go.mod in Go's module cache
# (downloading it if needed); fail, saying so through the caller's log, when it cannot be had.
go_module_gomod() {
  local gomod
  gomod="$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [[ -f "$gomod" ]] || { log "cannot download $1@$2"; return 1; }
  echo "$gomod"
}

# go_wrapper_mod NAME MODULE VERSION GOMOD [LOCAL_VERSION]: print the go.mod of the wrapper module
# hetlora.local/NAME-build: GOMOD's go line, `require MODULE VERSION`, and GOMOD's replace directives
# in one block. A replace to a local path (`=> ./...`, a directory inside the module's own checkout)
# cannot be repeated: with LOCAL_VERSION it becomes `path => path LOCAL_VERSION` (the published
# module at that version: k8s.io/kubernetes's staging modules), without it it is left out.
go_wrapper_mod() {
  local name="$1" mod="$2" ver="$3" gomod="$4" local_version="${5:-}"
  printf 'module hetlora.local/%s-build\n\n%s\n\nrequire %s %s\n\n' "$name" "$(grep -m1 '^go ' "$gomod")" "$mod" "$ver"
  awk -v local_version="$local_version" '
    /^replace[[:space:]]*\($/ { blk = 1; next }
    blk && /^\)/ { blk = 0; next }
    blk && /^[[:space:]]*(\/\/.*)?$/ { next }
    blk || /^replace[[:space:]]/ {
      r = $0
      if (!blk) sub(/^replace[[:space:]]+/, "", r)
      sub(/^[[:space:]]+/, "", r)
      if (r ~ /=>[[:space:]]*\./) {
        if (local_version == "") next
        split(r, f)
        r = f[1] " => " f[1] " " local_version
      }
      out[++n] = r
    }
    END { if (n) { print "replace ("; for (i = 1; i <= n; i++) print "\t" out[i]; print ")" } }' "$gomod"
}
