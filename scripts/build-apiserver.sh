#!/usr/bin/env bash
# Build kube-apiserver from the k8s.io/kubernetes Go module and install Debian's etcd-server, so the
# preflight tests (tests/test_preflight.py) run against a real API server. Idempotent: a cached
# binary whose marker names the same version is reused (a rerun costs well under a second).
#
#   scripts/build-apiserver.sh            build (first time ~10+ minutes on 2 cores) and print the path
#   scripts/build-apiserver.sh --cluster  also the rest of a cluster for scripts/cluster-up.sh (kubelet,
#                                         kube-controller-manager, kube-scheduler, kube-proxy, kubectl),
#                                         all six in one go build (~17 minutes cold on 2 cores; 6 more
#                                         when only kube-apiserver was built), cached the same way
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and
# replaces them with ./staging/... paths, which Go ignores in a dependency. A small wrapper module
# therefore pins each staging module to the published v0.<minor>.<patch> that matches the release.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # ROOT, CACHE, BIN
K8S_VERSION="${HETLORA_K8S_VERSION:-v1.37.2}"
OUT="$BIN/kube-apiserver"
MARKER="$BIN/.kube-apiserver.version"
CLUSTER_CMDS=(kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl)
CLUSTER_MARKER="$BIN/.kube-cluster.version"

log() { printf '[build-apiserver] %s\n' "$*" >&2; }

install_etcd() {
  command -v etcd >/dev/null && return 0
  if [[ "$(id -u)" == 0 ]]; then
    log "installing Debian's etcd-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
    # Debian starts a system etcd on 2379; the tests run their own on free ports.
    if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
      systemctl stop etcd || true
    fi
  else
    log "not root: install etcd-server with apt (the real-server tests skip without it)"
  fi
}

# build_k8s MARKER CMD...: build k8s.io/kubernetes/cmd/CMD for each CMD into $BIN in one go build
# (shared packages compile once), unless MARKER already names $K8S_VERSION.
build_k8s() {
  local marker="$1"; shift
  local cmds=("$@") c missing=0
  for c in "${cmds[@]}"; do [[ -x "$BIN/$c" ]] || missing=1; done
  if [[ "$missing" == 0 && -f "$marker" && "$(cat "$marker")" == "$K8S_VERSION" ]]; then
    log "${cmds[*]} $K8S_VERSION cached ($BIN)"; return
  fi
  command -v go >/dev/null || { log "go is not installed: cannot build ${cmds[*]}"; return 1; }
  local staging="v0.${K8S_VERSION#v1.}" work gomod
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  log "building ${cmds[*]} $K8S_VERSION (staging modules at $staging; first time takes 10+ minutes)"
  gomod="$(go_module_gomod k8s.io/kubernetes "$K8S_VERSION")" || return 1
  # The ./staging/... replaces become the published staging modules at $staging (scripts/lib.sh).
  go_wrapper_mod apiserver k8s.io/kubernetes "$K8S_VERSION" "$gomod" "$staging" >"$work/go.mod"
  cat >"$work/tools.go" <<'EOF'
//go:build tools

package tools

EOF
  for c in "${cmds[@]}"; do echo "import _ \"k8s.io/kubernetes/cmd/$c\"" >>"$work/tools.go"; done
  mkdir -p "$BIN" "$work/out"
  (
    cd "$work"
    # Only staging modules that the apiserver's import graph needs must resolve; the others stay
    # as replace lines that Go never consults.
    GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>"$work/tidy.log" || { cat "$work/tidy.log" >&2; exit 1; }
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
      -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)" \
      -o "$work/out/" "${cmds[@]/#/k8s.io/kubernetes/cmd/}"
  )
  for c in "${cmds[@]}"; do mv "$work/out/$c" "$BIN/$c"; done
  echo "$K8S_VERSION" >"$marker"
  log "built ${cmds[*]} in $BIN"
}

install_etcd
if [[ "${1:-}" == "--cluster" ]]; then
  # One build for all six: on a cold machine the packages they share compile once.
  build_k8s "$CLUSTER_MARKER" "${CLUSTER_CMDS[@]}"
  cp "$CLUSTER_MARKER" "$MARKER"
else
  build_k8s "$MARKER" kube-apiserver
fi
echo "$OUT"
