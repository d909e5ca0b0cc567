#!/usr/bin/env bash
# A local HetLoRA deployment on kind: a cluster with one tainted worker per rank tier, Kubeflow
# Pipelines standalone, kube-prometheus-stack (Prometheus + Grafana), the HetLoRA images and the
# kind overlay (MinIO, Pushgateway, ServiceMonitor, dashboard, PriorityClasses, RBAC, policies).
#
#   scripts/kind-up.sh            create (or update) everything; safe to re-run
#   scripts/kind-up.sh forward    port-forward the UIs to localhost until Ctrl-C
#   scripts/kind-up.sh urls       print the URLs and port-forward commands again
#
# Needs Docker (running), kind, kubectl, helm and make; the machine needs ~8 GB of memory.
# Environment: CLUSTER_NAME (hetlora), KFP_VERSION, KPS_CHART_VERSION, BUILD_CUDA=1 to also build
# the CUDA image, SKIP_IMAGES=1 to reuse images already loaded.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # ROOT, CACHE, BIN
CLUSTER_NAME="${CLUSTER_NAME:-hetlora}"
# Pinned versions. KFP's backend matches the kfp / kfp-server-api SDK in images/requirements.lock.
KFP_VERSION="${KFP_VERSION:-2.17.3}"
KPS_CHART_VERSION="${KPS_CHART_VERSION:-92.1.1}"  # prometheus-community/kube-prometheus-stack
KIND_TESTED_VERSION="v0.33.0"                     # its default node image is in manifests/kind/cluster.yaml
KPS_RELEASE="kps"                                 # Helm release and fullnameOverride: kps-prometheus, kps-grafana
MONITORING_NS="monitoring"
TIERS=(small medium large)

log() { printf '[kind-up] %s\n' "$*" >&2; }
die() { printf '[kind-up] error: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required ($2)"; }
kc() { kubectl --context "kind-$CLUSTER_NAME" "$@"; }

kustomize_build() {  # kustomize_build DIR
  if [[ -x "$BIN/kustomize" ]]; then
    "$BIN/kustomize" build "$1"
  elif command -v kustomize >/dev/null 2>&1; then
    kustomize build "$1"
  else
    kc kustomize "$1"
  fi
}

random_secret() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

check_tools() {
  need docker "https://docs.docker.com/engine/install/"
  docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (docker info failed)"
  need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
  need kubectl "https://kubernetes.io/docs/tasks/tools/"
  need helm "https://helm.sh/docs/intro/install/"
  need make "your distribution's make package"
  local kind_version
  kind_version="$(kind version | awk '{print $2}')"
  [[ "$kind_version" == "$KIND_TESTED_VERSION" ]] ||
    log "kind $kind_version found; these scripts were written for $KIND_TESTED_VERSION"
}

create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    log "cluster $CLUSTER_NAME exists"
  else
    log "creating cluster $CLUSTER_NAME (control plane + one worker per tier)"
    kind create cluster --name "$CLUSTER_NAME" --config "$ROOT/manifests/kind/cluster.yaml" --wait 180s
  fi
  # The platform runs on the control plane: make sure kubeadm's taint is gone (the cluster config
  # asks for no taints; older kind versions may ignore that).
  kc taint nodes -l node-role.kubernetes.io/control-plane node-role.kubernetes.io/control-plane:NoSchedule- \
    >/dev/null 2>&1 || true
  local tier
  for tier in "${TIERS[@]}"; do
    [[ -n "$(kc get nodes -l "hetlora.io/tier=$tier" -o name)" ]] || die "no node labelled hetlora.io/tier=$tier"
  done
  log "tier nodes: $(kc get nodes -l hetlora.io/tier -o jsonpath='{range .items[*]}{.metadata.labels.hetlora\.io/tier}={.metadata.name} {end}')"
}

install_kfp() {
  log "installing Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
  kc apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
  kc wait --for condition=established --timeout=60s crd/applications.app.k8s.io
  kc apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
  log "waiting for KFP's deployments (first start pulls many images: several minutes)"
  kc -n kubeflow wait --for=condition=Available deployment --all --timeout=20m
}

install_monitoring() {
  log "installing kube-prometheus-stack $KPS_CHART_VERSION into $MONITORING_NS"
  helm repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update >/dev/null
  local args=(
    --kube-context "kind-$CLUSTER_NAME" --namespace "$MONITORING_NS" --create-namespace
    --version "$KPS_CHART_VERSION" --wait --timeout 15m
    --set "fullnameOverride=$KPS_RELEASE"
    --set alertmanager.enabled=false
    # pick up ServiceMonitors without the release label (ours lives in the hetlora namespace)
    --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false
    # the dashboard sidecar loads ConfigMaps labelled grafana_dashboard: "1" from every namespace
    --set grafana.sidecar.dashboards.enabled=true
    --set grafana.sidecar.dashboards.label=grafana_dashboard
    --set-string grafana.sidecar.dashboards.labelValue=1
    --set grafana.sidecar.dashboards.searchNamespace=ALL
    --set grafana.sidecar.dashboards.folderAnnotation=grafana_folder
    --set grafana.sidecar.dashboards.provider.foldersFromFilesStructure=true
  )
  if ! helm status "$KPS_RELEASE" --kube-context "kind-$CLUSTER_NAME" -n "$MONITORING_NS" >/dev/null 2>&1; then
    args+=(--set-string "grafana.adminPassword=$(random_secret)")  # first install only; kept on upgrades
  fi
  helm upgrade --install "$KPS_RELEASE" prometheus-community/kube-prometheus-stack "${args[@]}"
}

build_and_load_images() {
  local names cpu cuda minio
  mapfile -t names < <(make -s -C "$ROOT" image-names)
  cpu="${names[0]}" cuda="${names[1]}" minio="${names[2]}"
  if [[ "${SKIP_IMAGES:-0}" != 1 ]]; then
    log "building images $cpu and $minio"
    make -C "$ROOT" images-kind
    [[ "${BUILD_CUDA:-0}" != 1 ]] || make -C "$ROOT" image-cuda
  fi
  log "loading images into the kind nodes"
  kind load docker-image --name "$CLUSTER_NAME" "$cpu" "$minio"
  [[ "${BUILD_CUDA:-0}" != 1 ]] || kind load docker-image --name "$CLUSTER_NAME" "$cuda"
}

store_secret() {
  # The store credentials, in the hetlora namespace (MinIO, the driver) and in kubeflow (the tasks).
  # Generated once and never written to disk; an existing Secret is kept (MinIO's data depends on it).
  local ns access secret
  for ns in hetlora kubeflow; do
    kc create namespace "$ns" --dry-run=client -o yaml | kc apply -f - >/dev/null
  done
  if kc -n hetlora get secret hetlora-store >/dev/null 2>&1; then
    access="$(kc -n hetlora get secret hetlora-store -o jsonpath='{.data.accesskey}' | base64 -d)"
    secret="$(kc -n hetlora get secret hetlora-store -o jsonpath='{.data.secretkey}' | base64 -d)"
  else
    access="hetlora" secret="$(random_secret)"
  fi
  for ns in hetlora kubeflow; do
    kc -n "$ns" create secret generic hetlora-store --from-literal=accesskey="$access" \
      --from-literal=secretkey="$secret" --dry-run=client -o yaml | kc apply -f - >/dev/null
  done
  log "Secret hetlora-store present in hetlora and kubeflow"
}

store_roles() {
  # Issue 13's two store roles and the server key, made through MinIO's admin API by
  # `hetlora store roles` (root credentials: the Secret MinIO itself reads), as the Secrets that
  # configs/kind.yaml names: hetlora-store-server (server tasks), hetlora-store-client (client tasks:
  # they write only their own upload keys) and hetlora-server-key (server tasks and the driver, which
  # signs the plans: export HETLORA_SERVER_KEY from it before `hetlora submit`). An existing server
  # key is kept (rotating it would make every signed round of a running experiment unverifiable);
  # the users' passwords are rotated on every run and the Secrets updated with them.
  local dir pid key
  dir="$(mktemp -d)"
  chmod 700 "$dir"
  kc -n hetlora port-forward svc/minio 19000:9000 >/dev/null &
  pid=$!
  # shellcheck disable=SC2064  # expand now: the trap must remove this call's folder and forwarder
  trap "kill $pid 2>/dev/null || true; rm -rf '$dir'" RETURN
  sleep 3
  if key="$(kc -n kubeflow get secret hetlora-server-key -o jsonpath='{.data.key}' 2>/dev/null | base64 -d)" && [[ -n "$key" ]]; then
    (umask 077; printf 'key=%s\n' "$key" >"$dir/server-key.env")
  fi
  MINIO_ROOT_USER="$(kc -n hetlora get secret hetlora-store -o jsonpath='{.data.accesskey}' | base64 -d)" \
  MINIO_ROOT_PASSWORD="$(kc -n hetlora get secret hetlora-store -o jsonpath='{.data.secretkey}' | base64 -d)" \
    "${HETLORA_VENV:-$ROOT/.venv}/bin/hetlora" store roles -c "$ROOT/configs/kind.yaml" \
      --set store.endpoint=localhost:19000 -o "$dir" >/dev/null
  local name file
  for name in hetlora-store-server:server.env hetlora-store-client:client.env hetlora-server-key:server-key.env; do
    file="${name#*:}" name="${name%%:*}"
    kc -n kubeflow create secret generic "$name" --from-env-file="$dir/$file" --dry-run=client -o yaml | kc apply -f - >/dev/null
  done
  log "store roles: Secrets hetlora-store-server, hetlora-store-client and hetlora-server-key in kubeflow"
}

deploy_hetlora() {
  log "applying manifests/overlays/kind"
  kustomize_build "$ROOT/manifests/overlays/kind" | kc apply -f -
  kc -n hetlora rollout status statefulset/minio --timeout=5m
  kc -n hetlora rollout status deployment/pushgateway --timeout=5m
}

print_urls() {
  cat <<EOF

HetLoRA on kind ($CLUSTER_NAME) is up. Forward the ports (all at once: scripts/kind-up.sh forward):

  KFP UI       kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80             http://localhost:8080
  KFP API      kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888              http://localhost:8888  (kubeflow.host)
  Prometheus   kubectl -n $MONITORING_NS port-forward svc/$KPS_RELEASE-prometheus 9090:9090   http://localhost:9090
  Grafana      kubectl -n $MONITORING_NS port-forward svc/$KPS_RELEASE-grafana 3000:80        http://localhost:3000  (dashboard "HetLoRA / Federated rounds")
  Pushgateway  kubectl -n hetlora port-forward svc/pushgateway 9091:9091               http://localhost:9091
  MinIO (S3)   kubectl -n hetlora port-forward svc/minio 9000:9000                     localhost:9000

Grafana login: admin / \$(kubectl --context kind-$CLUSTER_NAME -n $MONITORING_NS get secret $KPS_RELEASE-grafana -o jsonpath='{.data.admin-password}' | base64 -d)

Inside the cluster the tasks reach the store at minio.hetlora.svc.cluster.local:9000 (Secret
hetlora-store) and the Pushgateway at http://pushgateway.hetlora.svc.cluster.local:9091.
Tier nodes: nodeSelector hetlora.io/tier=<tier>, toleration hetlora.io/tier=<tier>:NoSchedule.
EOF
}

forward() {
  local pids=()
  trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
  kc -n kubeflow port-forward svc/ml-pipeline-ui 8080:80 >/dev/null & pids+=("$!")
  kc -n kubeflow port-forward svc/ml-pipeline 8888:8888 >/dev/null & pids+=("$!")
  kc -n "$MONITORING_NS" port-forward "svc/$KPS_RELEASE-prometheus" 9090:9090 >/dev/null & pids+=("$!")
  kc -n "$MONITORING_NS" port-forward "svc/$KPS_RELEASE-grafana" 3000:80 >/dev/null & pids+=("$!")
  kc -n hetlora port-forward svc/pushgateway 9091:9091 >/dev/null & pids+=("$!")
  kc -n hetlora port-forward svc/minio 9000:9000 >/dev/null & pids+=("$!")
  log "forwarding: KFP UI :8080, KFP API :8888, Prometheus :9090, Grafana :3000, Pushgateway :9091, MinIO :9000 (Ctrl-C stops)"
  wait
}

main() {
  case "${1:-up}" in
    up)
      check_tools
      create_cluster
      install_kfp
      install_monitoring
      build_and_load_images
      store_secret
      deploy_hetlora
      store_roles
      print_urls
      ;;
    forward) need kubectl "https://kubernetes.io/docs/tasks/tools/"; forward ;;
    urls) print_urls ;;
    *) echo "usage: $0 [up|forward|urls]" >&2; exit 2 ;;
  esac
}

main "$@"
