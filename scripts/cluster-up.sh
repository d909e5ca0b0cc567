#!/usr/bin/env bash
# A real Kubernetes cluster on one machine without Docker: the Docker-free counterpart of
# scripts/kind-up.sh. One control plane (etcd, kube-apiserver, controller-manager, scheduler,
# kube-proxy, CoreDNS) and one real node per rank tier plus a platform node, each node a kubelet
# with its own containerd, in network and mount namespaces this script creates and removes.
#
#   scripts/cluster-up.sh            build/install what is missing (cached), start, apply the
#                                    overlay manifests/overlays/cluster (MinIO, Pushgateway, ...)
#   scripts/cluster-up.sh status     nodes and platform pods
#   scripts/cluster-up.sh env        print `export KUBECONFIG=...` for this cluster
#   scripts/cluster-up.sh tools      only build/install what it needs (scripts/setup.sh runs this)
#   scripts/cluster-down.sh          stop everything and remove the namespaces and state
#
# What it touches on the host: the network namespace $NETNS, one veth pair (host side $VETH_HOST,
# 10.77.0.1/24) so the host reaches the API server at https://10.77.0.2:6443, its state under
# $HETLORA_CLUSTER_DIR (default /var/tmp/hetlora-cluster) and cgroups under /hetlora-<node>. It
# never changes a host sysctl: the values the kubelet insists on are shown to it in its private
# mount namespace. Needs root, Linux with cgroup v1 or v2, and (installed here from Debian if
# missing) containerd, runc, the CNI plugins, etcd, iptables, openssl.
#
# Quirks of container-based VMs this handles (docs/deploy.md, "A real cluster without Docker"):
# cgroup v1 (kubelet failCgroupV1: false), no CAP_SYS_RESOURCE (containerd
# restrict_oom_score_adj), sysctls the kubelet wants to write, a node IP that may not be loopback.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # ROOT, CACHE, BIN
D="${HETLORA_CLUSTER_DIR:-/var/tmp/hetlora-cluster}"
NETNS="${HETLORA_CLUSTER_NETNS:-hetlora-cluster}"
VETH_HOST=hlc-host
VETH_NS=hlc0
HOST_IP=10.77.0.1
API_IP=10.77.0.2
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
POD_CIDR=10.244.0.0/16
# Node name -> index; the index gives its IP (10.77.0.1<i>) and pod subnet (10.244.<i>.0/24).
NODES=(platform small medium large)
COREDNS_VERSION="${HETLORA_COREDNS_VERSION:-v1.15.0}"
# The project's venv (scripts/setup.sh) has PyYAML for the manifest filter; a bare python3 may not.
PYTHON="${PYTHON:-$( [[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"
PAUSE_IMAGE=hetlora.local/pause:1
COREDNS_IMAGE="hetlora.local/coredns:$COREDNS_VERSION"
TOOLBOX_IMAGE=hetlora.local/toolbox:1
# Images for every node beyond the small ones built here, e.g. the component image of
# scripts/build-image.sh (space-separated OCI layout folders, paths without spaces). Each is unpacked
# once, into a seed containerd root kept under $SEED, and every node's containerd root starts as a
# hard-linked copy of it: no second unpack and no second copy on disk for a ~7 GB image (seed_images;
# a plain copy where $SEED and the cluster's state are on different filesystems).
EXTRA_IMAGES="${HETLORA_CLUSTER_IMAGES:-}"
SEED="${HETLORA_CLUSTER_SEED:-$CACHE/containerd-seed}"
# Host paths each node sees a private copy of (start.sh); their mount points are made if missing.
HOST_DIRS="run/containerd run/netns var/lib/cni etc/cni/net.d var/lib/kubelet var/log/containers"

log() { printf '[cluster-up] %s\n' "$*" >&2; }
die() { printf '[cluster-up] error: %s\n' "$*" >&2; exit 1; }
nsrun() { nsenter --net="/run/netns/$NETNS" -- "$@"; }
kc() { "$BIN/kubectl" --kubeconfig "$D/admin.kubeconfig" "$@"; }
node_ip() { echo "10.77.0.1$1"; }

# ------------------------------------------------------------------ tools

install_debs() {
  local want=() p
  for p in containerd:containerd runc:runc /usr/lib/cni/ptp:containernetworking-plugins etcd:etcd-server \
           iptables:iptables openssl:openssl nsenter:util-linux conntrack:conntrack busybox:busybox-static \
           prometheus-pushgateway:prometheus-pushgateway; do
    if [[ "${p%%:*}" == /* ]]; then [[ -e "${p%%:*}" ]] || want+=("${p#*:}")
    else command -v "${p%%:*}" >/dev/null || want+=("${p#*:}"); fi
  done
  ((${#want[@]})) || return 0
  log "installing from Debian: ${want[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
}

build_coredns() {  # CoreDNS from its Go module with the plugins a cluster DNS needs, cached by version
  local out="$BIN/coredns" marker="$BIN/.coredns.version" work
  if [[ -x "$out" && -f "$marker" && "$(cat "$marker")" == "$COREDNS_VERSION" ]]; then return; fi
  log "building CoreDNS $COREDNS_VERSION (first time only, a few minutes)"
  work="$(mktemp -d)"
  cat >"$work/main.go" <<'EOF'
// CoreDNS with only the plugins a cluster DNS uses (the upstream build links every plugin).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	"github.com/coredns/coredns/coremain"
)

func init() {
	dnsserver.Directives = []string{"errors", "health", "ready", "kubernetes", "cache", "loop"}
}

func main() { coremain.Run() }
EOF
  (
    cd "$work"
    go mod init hetlora.local/coredns >/dev/null 2>&1
    go get "github.com/coredns/coredns@$COREDNS_VERSION" >/dev/null 2>&1
    GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp" .
  ) || { rm -rf "$work"; die "CoreDNS $COREDNS_VERSION did not build"; }
  rm -rf "$work"
  mv "$out.tmp" "$out"
  echo "$COREDNS_VERSION" >"$marker"
}

tools() {  # what the cluster needs beyond scripts/setup.sh's tools; setup.sh calls this (cached)
  [[ "$(id -u)" == 0 ]] || die "needs root (Debian packages, then namespaces, cgroups, containerd)"
  install_debs
  bash "$ROOT/scripts/build-apiserver.sh" --cluster >/dev/null
  build_coredns
}

ensure_tools() {
  tools
  local c
  for c in kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl coredns minio kustomize; do
    [[ -x "$BIN/$c" ]] || die "$BIN/$c is missing: run scripts/setup.sh tools"
  done
}

# ------------------------------------------------------------------ images

build_images() {  # the small images the platform node runs, as OCI tars under $D/images
  local py="$PYTHON" img="$D/images"
  mkdir -p "$img"
  if [[ ! -f "$img/pause.tar" ]]; then
    gcc -static -O2 -o "$img/pause" "$ROOT/images/pause/pause.c"
    "$py" "$ROOT/scripts/oci_image.py" --name "$PAUSE_IMAGE" --out "$img/pause.tar" \
      --add "$img/pause:/pause" --entrypoint '["/pause"]' >/dev/null
  fi
  local minio_version
  minio_version="$(sed -n 's/^MINIO_VERSION="\(.*\)"$/\1/p' "$ROOT/scripts/setup.sh")"
  [[ -f "$img/minio.tar" ]] || "$py" "$ROOT/scripts/oci_image.py" --name "ghcr.io/hetlora/minio:$minio_version" \
    --out "$img/minio.tar" --add "$BIN/minio:/usr/bin/minio" --dir /tmp:1777 --dir /data:0777 --user 65532:65532 \
    --entrypoint '["/usr/bin/minio"]' >/dev/null
  [[ -f "$img/pushgateway.tar" ]] || "$py" "$ROOT/scripts/oci_image.py" --name hetlora.local/pushgateway:debian \
    --out "$img/pushgateway.tar" --with-libs --add /usr/bin/prometheus-pushgateway:/bin/pushgateway \
    --dir /data:0777 --user 65534:65534 --entrypoint '["/bin/pushgateway"]' >/dev/null
  # A small debugging image on every node (busybox: sh, wget, nslookup), e.g. for the tests' probes.
  [[ -f "$img/toolbox.tar" ]] || "$py" "$ROOT/scripts/oci_image.py" --name "$TOOLBOX_IMAGE" --out "$img/toolbox.tar" \
    --add "$(command -v busybox):/bin/busybox" --dir /tmp:1777 --entrypoint '["/bin/busybox"]' >/dev/null
  [[ -f "$img/coredns.tar" ]] || "$py" "$ROOT/scripts/oci_image.py" --name "$COREDNS_IMAGE" \
    --out "$img/coredns.tar" --add "$BIN/coredns:/coredns" --user 65532:65532 --entrypoint '["/coredns"]' >/dev/null
}

# ------------------------------------------------------------------ network

net_up() {
  [[ -e "/run/netns/$NETNS" ]] || ip netns add "$NETNS"
  if ! ip link show "$VETH_HOST" >/dev/null 2>&1; then
    ip link add "$VETH_HOST" type veth peer name "$VETH_NS"
    ip link set "$VETH_NS" netns "$NETNS"
    ip addr add "$HOST_IP/24" dev "$VETH_HOST"
    ip link set "$VETH_HOST" up
  fi
  nsrun ip link set lo up
  nsrun ip link set "$VETH_NS" up
  local i
  nsrun ip addr replace "$API_IP/24" dev "$VETH_NS"
  for i in "${!NODES[@]}"; do nsrun ip addr replace "$(node_ip "$i")/24" dev "$VETH_NS"; done
  nsrun ip route replace default via "$HOST_IP" dev "$VETH_NS"
  # Inside the namespace only: pods route between the nodes' pod subnets through it.
  nsrun sysctl -qw net.ipv4.ip_forward=1
}

# ------------------------------------------------------------------ certificates and credentials

pki() {
  local p="$D/pki"
  [[ -f "$p/done" ]] && return
  mkdir -p "$p"; chmod 700 "$p"
  openssl req -x509 -new -nodes -newkey rsa:2048 -keyout "$p/ca.key" -out "$p/ca.crt" -days 3650 \
    -subj /CN=hetlora-cluster-ca 2>/dev/null
  sign() {  # sign NAME SUBJ EXT
    openssl req -new -nodes -newkey rsa:2048 -keyout "$p/$1.key" -out "$p/$1.csr" -subj "$2" 2>/dev/null
    openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 3650 \
      -out "$p/$1.crt" -extfile <(printf '%s\n' "$3") 2>/dev/null
  }
  sign apiserver /CN=kube-apiserver "subjectAltName=IP:$API_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  # The API server's client certificate towards the kubelets (logs, exec); kubelets trust the CA.
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  # Static bearer tokens, one identity per component (RBAC's default bindings name these users;
  # nodes are system:node:<name> in system:nodes, so the Node authorizer limits each to its own pods).
  local n
  tok() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
  {
    echo "$(tok),admin,admin,system:masters"
    echo "$(tok),system:kube-controller-manager,system:kube-controller-manager"
    echo "$(tok),system:kube-scheduler,system:kube-scheduler"
    echo "$(tok),system:kube-proxy,system:kube-proxy"
    for n in "${NODES[@]}"; do echo "$(tok),system:node:hetlora-$n,system:node:hetlora-$n,system:nodes"; done
  } >"$p/tokens.csv"
  chmod 600 "$p"/*
  touch "$p/done"
}

kubeconfig() {  # kubeconfig FILE USER
  local token
  token="$(awk -F, -v u="$2" '$2 == u {print $1}' "$D/pki/tokens.csv")"
  umask 077
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
current-context: hetlora
clusters:
- name: hetlora
  cluster: {server: "https://$API_IP:6443", certificate-authority: "$D/pki/ca.crt"}
users:
- name: $2
  user: {token: "$token"}
contexts:
- name: hetlora
  context: {cluster: hetlora, user: "$2"}
EOF
  umask 022
}

# ------------------------------------------------------------------ processes

ours() {  # ours PID: a live process of this cluster (its command line names the state directory)
  [[ -r "/proc/$1/cmdline" ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF "$D/"
}

spawn() {  # spawn NAME CMD... : a process in the cluster's network namespace, its own session and log
  local name="$1"; shift
  mkdir -p "$D/logs" "$D/pids"
  # A pid file can outlive its process (a reboot, a kill -9): running means running *and* ours.
  if [[ -f "$D/pids/$name" ]] && ours "$(cat "$D/pids/$name")"; then return; fi
  setsid nsenter --net="/run/netns/$NETNS" -- "$@" >"$D/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$D/pids/$name"
}

wait_for() {  # wait_for WHAT SECONDS CMD...
  local what="$1" secs="$2" t; shift 2
  for ((t = 0; t < secs * 4; t++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "$what not ready after ${secs}s (logs: $D/logs)"
}

control_plane() {
  local p="$D/pki"
  spawn etcd etcd --name hetlora --data-dir "$D/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster hetlora=http://127.0.0.1:2380 --log-level warn
  spawn kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address="$API_IP" --secure-port=6443 \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" --client-ca-file="$p/ca.crt" \
    --token-auth-file="$p/tokens.csv" --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction --allow-privileged=false \
    --kubelet-client-certificate="$p/apiserver-kubelet-client.crt" --kubelet-client-key="$p/apiserver-kubelet-client.key" \
    --service-account-key-file="$p/sa.key" --service-account-signing-key-file="$p/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range="$SERVICE_CIDR" \
    --kubelet-preferred-address-types=InternalIP --profiling=false --v=1 \
    --feature-gates=WatchList=false
  # WatchList off: Debian's etcd (3.4.23) lacks RequestWatchProgress, so the API server answers a
  # streaming list (sendInitialEvents) with a watch that fails at once, and a client that asked for
  # one (Argo Workflows 4.0's controller) retries it forever instead of falling back to LIST+WATCH:
  # its pods ran to completion while the workflow never saw them. With the gate off the request is
  # refused up front and clients fall back.
  kubeconfig "$D/admin.kubeconfig" admin
  wait_for kube-apiserver 90 kc get --raw /readyz
  kubeconfig "$D/controller-manager.kubeconfig" system:kube-controller-manager
  kubeconfig "$D/scheduler.kubeconfig" system:kube-scheduler
  kubeconfig "$D/kube-proxy.kubeconfig" system:kube-proxy
  spawn kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$D/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$D/controller-manager.kubeconfig" --authorization-kubeconfig="$D/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" --controllers='*,-nodeipam' \
    --profiling=false --v=1
  spawn kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$D/scheduler.kubeconfig" \
    --authentication-kubeconfig="$D/scheduler.kubeconfig" --authorization-kubeconfig="$D/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --profiling=false --v=1
}

# The kernel settings the kubelet checks at start (pkg/kubelet/cm: setupKernelTunables). It writes
# any that differ; these are host-wide, so each node sees the expected values in files bind-mounted
# over /proc/sys in its private mount namespace instead, and the host's stay as they are.
KUBELET_SYSCTLS=(vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1
                 kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000)

node_config() {  # node_config NAME INDEX: containerd, CNI and kubelet files for one node
  local n="$1" i="$2" nd="$D/nodes/$1" ip
  ip="$(node_ip "$i")"
  mkdir -p "$nd"/{cni,containerd,kubelet,pod-logs,sysctl}
  node_root "$nd/containerd/root" "$n"
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # No CAP_SYS_RESOURCE in these VMs: never lower a container's OOM score below containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
  # Point-to-point pod networking: every pod a veth with a /32 route in the cluster's namespace, so
  # pods of all nodes route to each other there and kube-proxy's rules see every packet.
  cat >"$nd/cni/10-hetlora.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "hetlora-$n", "plugins": [
  {"type": "ptp", "ipMasq": false, "mtu": 1500,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$nd/cni-ipam"}},
  {"type": "loopback"}]}
EOF
  local taints=""
  if [[ "$n" != platform ]]; then
    taints="registerWithTaints: [{key: hetlora.io/tier, value: $n, effect: NoSchedule}]"
  fi
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: $ip
healthzPort: 10248
cgroupDriver: cgroupfs
cgroupRoot: /hetlora-$n
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$nd/containerd.sock
podLogsDir: $nd/pod-logs
clusterDNS: [$DNS_SERVICE_IP]
clusterDomain: cluster.local
resolvConf: $D/resolv.conf
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $D/pki/ca.crt}
authorization: {mode: Webhook}
# The host disk is shared by every node and may be well used: evict only when it is really full,
# and never garbage-collect the imported images (no registry to pull them back from).
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
staticPodPath: ""
$taints
EOF
  local kv
  for kv in "${KUBELET_SYSCTLS[@]}"; do
    mkdir -p "$nd/sysctl/$(dirname "${kv%%=*}")"
    echo "${kv#*=}" >"$nd/sysctl/${kv%%=*}"
  done
  # The platform node runs the platform's images; tier nodes only client tasks (the pause image here).
  local images="$D/images/pause.tar $D/images/toolbox.tar" labels="hetlora.io/tier=$n"
  if [[ "$n" == platform ]]; then
    images+=" $D/images/minio.tar $D/images/pushgateway.tar $D/images/coredns.tar"
    labels="hetlora.io/role=platform"
  fi
  kubeconfig "$nd/kubelet.kubeconfig" "system:node:hetlora-$n"
  cat >"$nd/start.sh" <<EOF
#!/usr/bin/env bash
# Node $n: runs in its own mount namespace inside the cluster's network namespace.
set -euo pipefail
mount --make-rprivate /
for kv in ${KUBELET_SYSCTLS[*]}; do mount --bind "$nd/sysctl/\${kv%%=*}" "/proc/sys/\${kv%%=*}"; done
# Host paths the runtime writes with no setting to move them: containerd's shims and runc
# (/run/containerd), the pods' network namespaces (/run/netns), the CNI result cache and lock
# (/var/lib/cni, /etc/cni/net.d), the kubelet's serving certificate and device-plugin socket
# (/var/lib/kubelet) and its container log links (/var/log/containers). Each node gets its own, so
# nothing lands in (or lingers on) the host's.
for d in $HOST_DIRS; do
  mkdir -p "$nd/host/\$d" && mount --bind "$nd/host/\$d" "/\$d"
done
containerd --config "$nd/containerd.toml" >"$D/logs/containerd-$n.log" 2>&1 &
for _ in \$(seq 120); do [[ -S "$nd/containerd.sock" ]] && break; sleep 0.25; done
for t in $images; do ctr -a "$nd/containerd.sock" -n k8s.io images import "\$t" >/dev/null; done
exec "$BIN/kubelet" --config="$nd/kubelet.yaml" --kubeconfig="$nd/kubelet.kubeconfig" --root-dir="$nd/kubelet" \\
  --hostname-override=hetlora-$n --node-ip=$ip --node-labels=$labels --v=1
EOF
  chmod +x "$nd/start.sh"
}

IMAGE_LOCKS=()
unlock_images() {
  local fd
  for fd in "${IMAGE_LOCKS[@]}"; do exec {fd}<&-; done
  IMAGE_LOCKS=()
}

seed_images() {  # EXTRA_IMAGES unpacked into the seed root, once per set of images
  [[ -n "$EXTRA_IMAGES" ]] || return 0
  local key i names=""
  for i in $EXTRA_IMAGES; do
    [[ -f "$i/index.json" ]] || die "HETLORA_CLUSTER_IMAGES: $i is not an OCI layout folder (no index.json)"
    # A shared lock on each layout while it is read: scripts/build-image.sh rewrites its own under an
    # exclusive one. Released when seeding ends (the nodes started later never hold it).
    exec {fd}<"$i"
    IMAGE_LOCKS+=("$fd")
    flock -s -w 1800 "$fd" || die "HETLORA_CLUSTER_IMAGES: $i stayed locked by a build for 30 min"
    names+=" $("$PYTHON" -c 'import json, sys; print(" ".join(m["annotations"]["org.opencontainers.image.ref.name"] for m in json.load(open(sys.argv[1]))["manifests"]))' "$i/index.json")"
  done
  key="$(for i in $EXTRA_IMAGES; do cat "$i/index.json"; done | sha256sum | cut -c1-16)"
  if [[ "$(cat "$SEED/key" 2>/dev/null)" == "$key" ]]; then unlock_images; return 0; fi
  local t0=$SECONDS
  log "unpacking $EXTRA_IMAGES into the nodes' seed root $SEED (once per image)"
  rm -f "$SEED/key"
  mkdir -p "$SEED/root" "$D/seed"
  cat >"$D/seed/containerd.toml" <<EOF
version = 2
root = "$SEED/root"
state = "$D/seed/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$D/seed/containerd.sock"
[ttrpc]
  address = "$D/seed/containerd.sock.ttrpc"
EOF
  cat >"$D/seed/seed.sh" <<EOF
#!/usr/bin/env bash
# The seed containerd: in a private mount namespace, like a node, so nothing lands in the host's
# paths; stopped however this script ends (a live one would hold the seed's database lock).
set -euo pipefail
mount --make-rprivate /
for d in $HOST_DIRS; do mkdir -p "$D/seed/host/\$d" && mount --bind "$D/seed/host/\$d" "/\$d"; done
containerd --config "$D/seed/containerd.toml" >"$D/logs/containerd-seed.log" 2>&1 &
pid=\$!
trap 'kill "\$pid" 2>/dev/null; wait "\$pid" 2>/dev/null || true' EXIT
for _ in \$(seq 120); do [[ -S "$D/seed/containerd.sock" ]] && break; sleep 0.25; done
[[ -S "$D/seed/containerd.sock" ]] || { echo "the seed containerd did not start" >&2; exit 1; }
c() { ctr -a "$D/seed/containerd.sock" -n k8s.io "\$@"; }
gc() {  # containerd's garbage collector, run to its end (a synchronous delete of a throw-away tag)
  local first
  first="\$(c images ls -q | head -1)"
  [[ -z "\$first" ]] || { c images tag "\$first" hetlora.local/seed-gc:1 >/dev/null && c images rm --sync hetlora.local/seed-gc:1 >/dev/null; }
}
# First collect what an earlier seeding left unreferenced, so no collection runs during the imports.
gc
for i in $EXTRA_IMAGES; do c images import <(tar -C "\$i" -cf - .) >/dev/null; done
# Images of an earlier set, and a previous build imported under the same tag, are unreferenced
# now: a synchronous delete runs containerd's garbage collector, which removes their layers and
# snapshots (those the current images share stay).
for old in \$(c images ls -q); do
  case " $names " in *" \$old "*) ;; *) c images rm "\$old" >/dev/null ;; esac
done
gc
EOF
  chmod +x "$D/seed/seed.sh"
  if ! unshare --mount --propagation unchanged "$D/seed/seed.sh"; then
    # Seen once after several re-seeds: an import failing on "parent snapshot ... does not exist"
    # (containerd's metadata and its snapshotter's disagreeing). The seed is only a cache: rebuild it.
    log "seeding into the existing seed root failed: unpacking into a new one"
    rm -rf "$SEED/root"
    mkdir -p "$SEED/root"
    unshare --mount --propagation unchanged "$D/seed/seed.sh" || die "seeding $EXTRA_IMAGES failed: $D/logs/containerd-seed.log"
  fi
  echo "$key" >"$SEED/key"
  unlock_images
  log "seed root ready in $((SECONDS - t0)) s ($(du -sh "$SEED/root" | cut -f1))"
}

node_root() {  # node_root DIR NODE: a node's containerd root made from the seed, unless it has this seed's
  [[ -n "$EXTRA_IMAGES" ]] || return 0
  local key
  key="$(cat "$SEED/key")"
  [[ "$(cat "$1.seed-key" 2>/dev/null)" == "$key" ]] && return 0
  if [[ -e "$1" ]]; then
    if [[ -f "$D/pids/node-$2" ]] && ours "$(cat "$D/pids/node-$2")"; then
      log "node $2 runs with images of an earlier seed: restart the cluster (cluster-down.sh --keep; cluster-up.sh) to get the new ones"
      return 0
    fi
    rm -rf "$1"  # an earlier seed's, or a copy interrupted halfway
  fi
  rm -rf "$1.part"
  if [[ "$(stat -c %d "$SEED/root")" == "$(stat -c %d "$(dirname "$1")")" ]]; then
    cp -al "$SEED/root" "$1.part"
  else
    log "$SEED and $D are on different filesystems: copying the seed root ($(du -sh "$SEED/root" | cut -f1) per node) instead of linking it"
    cp -a "$SEED/root" "$1.part"
  fi
  # Content blobs and committed layers are never written once there, so links are safe. What
  # containerd writes in place is each node's own: the bolt databases (copied, not linked), its
  # instance id (made anew at start) and partial downloads (none should be left; dropped). Done
  # before the root gets its name, so an interrupted copy is never used.
  local db
  for db in "$1.part"/io.containerd.metadata.v1.bolt/meta.db "$1.part"/io.containerd.snapshotter.v1.*/metadata.db; do
    [[ -f "$db" ]] && cp "$db" "$db.own" && mv -f "$db.own" "$db"
  done
  rm -rf "$1.part/io.containerd.grpc.v1.introspection/uuid" "$1.part"/io.containerd.content.v1.content/ingest/*
  mv "$1.part" "$1"
  echo "$key" >"$1.seed-key"
}

cgroups_up() {  # each node's cgroup root (kubelet cgroupRoot), in every hierarchy the kubelet uses
  local n c
  for n in "${NODES[@]}"; do
    if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
      mkdir -p "/sys/fs/cgroup/hetlora-$n"
      continue
    fi
    for c in /sys/fs/cgroup/*/; do
      c="${c%/}"
      [[ -L "$c" || "$c" == */unified ]] && continue
      mkdir -p "$c/hetlora-$n"
      if [[ "$c" == */cpuset ]]; then  # a new v1 cpuset has no CPUs or memory nodes until given some
        cat "$c/cpuset.cpus" >"$c/hetlora-$n/cpuset.cpus"
        cat "$c/cpuset.mems" >"$c/hetlora-$n/cpuset.mems"
      fi
    done
  done
}

nodes_up() {
  echo "nameserver $HOST_IP" >"$D/resolv.conf"
  cgroups_up
  # The mount points of the nodes' private copies of these (start.sh): made here if the host has
  # none, listed so that cluster-down.sh removes them again.
  local d
  for d in $HOST_DIRS; do
    [[ -d "/$d" ]] || { mkdir -p "/$d"; echo "/$d" >>"$D/host-dirs-made"; }
  done
  # The seed is shared by every cluster on this host (a CI job beside another, a developer's beside a
  # test's): one re-seeds or copies it at a time. A process a killed run left holding the lock (its
  # seed containerd) keeps it until cluster-down.sh of that run stops it.
  [[ -z "$EXTRA_IMAGES" ]] || { mkdir -p "$SEED"; exec 7<"$SEED"; flock -w 1800 7 || die "the seed $SEED stayed locked for 30 min: $(fuser -v "$SEED" 2>&1 | tail -n +2 | head -3)"; }
  seed_images
  local i
  for i in "${!NODES[@]}"; do node_config "${NODES[$i]}" "$i"; done
  [[ -z "$EXTRA_IMAGES" ]] || exec 7<&-  # released before the nodes start, so they never hold it
  for i in "${!NODES[@]}"; do
    spawn "node-${NODES[$i]}" unshare --mount --propagation unchanged "$D/nodes/${NODES[$i]}/start.sh"
  done
  cat >"$D/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $D/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: hetlora-platform
bindAddress: $API_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# conntrack limits are host-wide: leave them alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  spawn kube-proxy "$BIN/kube-proxy" --config="$D/kube-proxy.yaml" --v=1
  for i in "${NODES[@]}"; do wait_for "node hetlora-$i" 120 kc wait --for=condition=Ready "node/hetlora-$i" --timeout=1s; done
}

# ------------------------------------------------------------------ cluster objects

dns_up() {
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
        loop
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      nodeSelector: {hetlora.io/role: platform}
      securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports: [{containerPort: 1053, protocol: UDP, name: dns}, {containerPort: 1053, protocol: TCP, name: dns-tcp}]
        readinessProbe: {httpGet: {path: /ready, port: 8181}}
        livenessProbe: {httpGet: {path: /health, port: 8080}}
        resources: {requests: {cpu: 20m, memory: 32Mi}, limits: {memory: 128Mi}}
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_SERVICE_IP
  selector: {k8s-app: kube-dns}
  ports: [{name: dns, port: 53, targetPort: 1053, protocol: UDP}, {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}]
EOF
}

platform_up() {
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: hetlora}
EOF
  # The store's root credentials: made once, kept with the cluster's state (0600), never printed.
  if ! kc -n hetlora get secret hetlora-store >/dev/null 2>&1; then
    kc -n hetlora create secret generic hetlora-store \
      --from-literal=accesskey="hetlora-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')" \
      --from-literal=secretkey="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >/dev/null
  fi
  # MinIO's volume: a hostPath PV on the platform node (no dynamic provisioner in this cluster),
  # bound to the StatefulSet's claim by name.
  mkdir -p "$D/volumes/minio-data"
  chown 65532:65532 "$D/volumes/minio-data"
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: hetlora-minio-data}
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  claimRef: {namespace: hetlora, name: data-minio-0}
  hostPath: {path: $D/volumes/minio-data, type: Directory}
  nodeAffinity:
    required:
      nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [hetlora-platform]}]}]
EOF
  # Everything of the overlay but the ServiceMonitor: no Prometheus Operator runs here.
  "$BIN/kustomize" build "$ROOT/manifests/overlays/cluster" |
    "$PYTHON" -c 'import sys, yaml; print(yaml.safe_dump_all([o for o in yaml.safe_load_all(sys.stdin) if o and o.get("kind") != "ServiceMonitor"]))' |
    kc apply -f - >/dev/null
  kc -n kube-system rollout status deploy/coredns --timeout=120s >/dev/null
  kc -n hetlora rollout status statefulset/minio --timeout=180s >/dev/null
  kc -n hetlora rollout status deploy/pushgateway --timeout=120s >/dev/null
}

status() {
  kc get nodes -o wide
  kc get pods -A -o wide
}

up() {
  local t0=$SECONDS
  ensure_tools
  mkdir -p "$D"; chmod 700 "$D"
  build_images
  net_up
  pki
  control_plane
  nodes_up
  dns_up
  platform_up
  log "up in $((SECONDS - t0)) s: export KUBECONFIG=$D/admin.kubeconfig (API https://$API_IP:6443)"
}

case "${1:-up}" in
  up) up ;;
  tools) tools ;;
  status) status ;;
  env) echo "export KUBECONFIG=$D/admin.kubeconfig" ;;
  *) die "usage: $0 [up|status|env|tools]" ;;
esac
