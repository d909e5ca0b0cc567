#!/usr/bin/env bash
# Build the component image from images/Dockerfile without a Docker engine, and write it as an OCI
# archive that `ctr images import` (scripts/cluster-up.sh) takes.
#
#   sudo scripts/build-image.sh        build (skipped when the archive of the same inputs exists); prints its path
#
# How, on a machine whose registries are PyPI and Debian only:
# - the Dockerfile's FROM (python:3.11-slim-bookworm, on Docker Hub) is a Debian bookworm base made by
#   debootstrap with Python 3.11 and venv, tagged with that name in buildah's local storage;
# - buildah (Debian) runs the Dockerfile's own steps (its lock files, install.sh, user, entrypoint,
#   the prebuilt SmolLM2 cache) in chroot isolation;
# - TORCH=cuda: PyTorch's CPU index is unreachable, so torch is PyPI's CUDA build (it runs on CPUs;
#   the image is ~3 GB larger than the CPU variant);
# - the host's CA bundle and pip config are bind-mounted for the build's downloads only (a proxy's CA
#   may be needed to reach PyPI); they are not in the image.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${HETLORA_IMAGE_DIR:-/var/tmp/hetlora-image}"
TORCH="${HETLORA_IMAGE_TORCH:-cuda}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)"
TAG="${HETLORA_IMAGE_TAG:-ghcr.io/hetlora/hetlora:$VERSION}"
FROM="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$ROOT/images/Dockerfile" | tail -1)"
MIRROR="${HETLORA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] error: %s\n' "$*" >&2; exit 1; }

tools() {
  [[ "$(id -u)" == 0 ]] || die "needs root (debootstrap, buildah's storage)"
  command -v buildah >/dev/null && command -v debootstrap >/dev/null && return
  log "installing Debian's buildah and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap >/dev/null
}

base() {  # the Dockerfile's FROM, made here
  local full="docker.io/library/$FROM" ctr mnt
  if buildah images --quiet "$full" >/dev/null 2>&1; then return; fi
  log "making $FROM from Debian bookworm (debootstrap)"
  rm -rf "$W/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$W/rootfs" "$MIRROR" >"$W/debootstrap.log" 2>&1 || die "debootstrap failed: $W/debootstrap.log"
  ctr="$(buildah from scratch)"
  mnt="$(buildah mount "$ctr")"
  cp -a "$W/rootfs/." "$mnt/"
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 "$ctr"
  buildah commit --rm --quiet "$ctr" "$full" >/dev/null
  rm -rf "$W/rootfs"
}

inputs_hash() {  # what the image is made of: the Dockerfile, the locks, the project's sources
  (cd "$ROOT" && git ls-files -z images/Dockerfile images/install.sh images/'*.lock' pyproject.toml README.md \
     hetlora_core hetlora_kfp components pipelines | xargs -0 sha256sum; echo "$TORCH $TAG $FROM") | sha256sum | cut -c1-16
}

build() {
  local key out mounts=()
  key="$(inputs_hash)"
  out="$W/hetlora-$key.tar"
  if [[ -f "$out" ]]; then log "cached: $out"; echo "$out"; return; fi
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  [[ -f /etc/pip.conf ]] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
  log "building $TAG (TORCH=$TORCH) with buildah"
  local t0=$SECONDS
  buildah bud --isolation chroot --pull=never --layers=false --ignorefile "$ROOT/images/Dockerfile.dockerignore" \
    "${mounts[@]}" --build-arg "TORCH=$TORCH" --build-arg "VERSION=$VERSION" -f "$ROOT/images/Dockerfile" \
    -t "$TAG" "$ROOT" >"$W/build.log" 2>&1 || { tail -30 "$W/build.log" >&2; die "buildah bud failed: $W/build.log"; }
  local built=$((SECONDS - t0))
  rm -f "$W"/hetlora-*.tar
  # Uncompressed layers: containerd unpacks them without a gunzip pass, and they are local only.
  buildah push --quiet --disable-compression "$TAG" "oci-archive:$out:$TAG" >/dev/null
  log "built in ${built}s, archive written in $((SECONDS - t0 - built))s: $out ($(du -h "$out" | cut -f1))"
  echo "$out"
}

mkdir -p "$W"
tools
base
build
