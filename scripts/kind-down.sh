#!/usr/bin/env bash
# Delete the local HetLoRA kind cluster (everything in it: KFP, monitoring, MinIO data, secrets).
# The images stay in the local Docker engine.
#
#   scripts/kind-down.sh          (CLUSTER_NAME, default hetlora)
set -euo pipefail

CLUSTER_NAME="${CLUSTER_NAME:-hetlora}"

command -v kind >/dev/null 2>&1 || { echo "[kind-down] kind is not installed: nothing to delete" >&2; exit 0; }
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  kind delete cluster --name "$CLUSTER_NAME"
  echo "[kind-down] deleted cluster $CLUSTER_NAME" >&2
else
  echo "[kind-down] no kind cluster named $CLUSTER_NAME" >&2
fi
