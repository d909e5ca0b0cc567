#!/usr/bin/env bash
# Build the component image from images/Dockerfile without a Docker engine, and write it as an OCI
# archive that `ctr images import` (scripts/cluster-up.sh) takes.
#
#   sudo scripts/build-image.sh        build (skipped when the image of the same inputs exists); prints
#                                      the OCI layout it wrote (scripts/cluster-up.sh: HETLORA_CLUSTER_IMAGES)
#
# How, on a machine whose registries are PyPI and Debian only:
# - the Dockerfile's FROM (python:3.11-slim-bookworm, on Docker Hub) is a Debian bookworm base made by
#   debootstrap with Python 3.11 and venv, tagged with that name in buildah's local storage;
# - buildah (Debian) runs the Dockerfile's own steps (its lock files, install.sh, user, entrypoint,
#   the prebuilt SmolLM2 cache) in chroot isolation, with its layer cache kept under $W/storage:
#   a code change rebuilds the project's layers only, not the ~6 GB layer of locked dependencies;
# - the image goes to an OCI layout ($W/oci, uncompressed layers: containerd unpacks them without a
#   gunzip pass); a layer already there is not written again, blobs no longer referenced are removed;
# - TORCH=cuda: PyTorch's CPU index is unreachable, so torch is PyPI's CUDA build (it runs on CPUs;
#   the image is ~3 GB larger than the CPU variant);
# - the host's CA bundle and pip config are bind-mounted for the build's downloads only (a proxy's CA
#   may be needed to reach PyPI); they are not in the image.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # ROOT, CACHE
W="${HETLORA_IMAGE_DIR:-$CACHE/image}"
TORCH="${HETLORA_IMAGE_TORCH:-cuda}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)"
TAG="${HETLORA_IMAGE_TAG:-ghcr.io/hetlora/hetlora:$VERSION}"
FROM="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$ROOT/images/Dockerfile" | tail -1)"
MIRROR="${HETLORA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# buildah's storage and run state kept with the image, not in the host's /var/lib/containers.
bh() { buildah --root "$W/storage" --runroot "$W/run" "$@"; }
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
  if bh images --quiet "$full" >/dev/null 2>&1; then return; fi
  log "making $FROM from Debian bookworm (debootstrap)"
  rm -rf "$W/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$W/rootfs" "$MIRROR" >"$W/debootstrap.log" 2>&1 || die "debootstrap failed: $W/debootstrap.log"
  ctr="$(bh from scratch)"
  mnt="$(bh mount "$ctr")"
  cp -a "$W/rootfs/." "$mnt/"
  bh umount "$ctr" >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 "$ctr"
  bh commit --rm --quiet "$ctr" "$full" >/dev/null
  rm -rf "$W/rootfs"
}

inputs_hash() {  # what the image is made of: the Dockerfile, the locks, the project's sources
  (cd "$ROOT" && git ls-files -z images/Dockerfile images/install.sh images/'*.lock' pyproject.toml README.md \
     hetlora_core hetlora_kfp components pipelines | xargs -0 sha256sum; echo "$TORCH $TAG $FROM") | sha256sum | cut -c1-16
}

build() {
  local key out="$W/oci" mounts=()
  # One build at a time writes the layout, and never while a cluster-up.sh reads it (a shared lock there).
  mkdir -p "$out"
  exec 8<"$out"
  flock -w 3600 8 || die "$out stayed locked for an hour (another build, or a cluster-up.sh reading it)"
  key="$(inputs_hash)"
  if [[ -f "$out/hetlora.key" && "$(cat "$out/hetlora.key")" == "$key" ]]; then log "cached: $out"; echo "$out"; return; fi
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  [[ -f /etc/pip.conf ]] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
  log "building $TAG (TORCH=$TORCH) with buildah"
  local t0=$SECONDS
  bh bud --isolation chroot --pull=never --layers=true --ignorefile "$ROOT/images/Dockerfile.dockerignore" \
    "${mounts[@]}" --build-arg "TORCH=$TORCH" --build-arg "VERSION=$VERSION" -f "$ROOT/images/Dockerfile" \
    -t "$TAG" "$ROOT" >"$W/build.log" 2>&1 || { tail -30 "$W/build.log" >&2; die "buildah bud failed: $W/build.log"; }
  local built=$((SECONDS - t0))
  # The previous build's image and layers, now untagged, go (the cached dependency layer stays: the new image uses it).
  bh rmi --prune >/dev/null 2>&1 || true
  rm -f "$out/hetlora.key"
  bh push --quiet --disable-compression "$TAG" "oci:$out:$TAG" >/dev/null
  "${PYTHON:-python3}" - "$out" "$TAG" <<'PY'
import json, pathlib, sys
# Keep only the tag just pushed and the blobs it references (the layout would otherwise grow by the
# project's layers at every build).
out, tag = pathlib.Path(sys.argv[1]), sys.argv[2]
index = json.loads((out / "index.json").read_text())
index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
keep = set()
for m in index["manifests"]:
    keep.add(m["digest"])
    manifest = json.loads((out / "blobs" / "sha256" / m["digest"].split(":")[1]).read_text())
    keep.update(d["digest"] for d in [manifest["config"], *manifest["layers"]])
for blob in (out / "blobs" / "sha256").iterdir():
    if f"sha256:{blob.name}" not in keep:
        blob.unlink()
(out / "index.json").write_text(json.dumps(index))
PY
  echo "$key" >"$out/hetlora.key"
  log "built in ${built}s, OCI layout written in $((SECONDS - t0 - built))s: $out ($(du -sh "$out" | cut -f1))"
  echo "$out"
}

mkdir -p "$W"
tools
base
build
