#!/usr/bin/env bash
# Stop the cluster of scripts/cluster-up.sh and remove what it made: its processes (control plane,
# kubelets, containerds, their shims and every container), the node cgroups, the network
# namespace and veth pair, and its state directory. Safe to run twice or on a half-started cluster.
#
#   scripts/cluster-down.sh            stop and remove everything
#   scripts/cluster-down.sh --keep     stop, but keep the state directory (logs, images, PKI)
set -euo pipefail

D="${HETLORA_CLUSTER_DIR:-/var/tmp/hetlora-cluster}"
NETNS="${HETLORA_CLUSTER_NETNS:-hetlora-cluster}"
VETH_HOST=hlc-host
NODES=(platform small medium large)

log() { printf '[cluster-down] %s\n' "$*" >&2; }

cgroup_dirs() {  # every cgroup directory of the nodes, deepest first
  local n
  for n in "${NODES[@]}"; do
    find /sys/fs/cgroup/*/"hetlora-$n" /sys/fs/cgroup/"hetlora-$n" -depth -type d 2>/dev/null || true
  done
}

kill_cgroups() {  # everything still running in the nodes' cgroups: the containers
  local dir pid
  for dir in $(cgroup_dirs); do
    [[ -f "$dir/cgroup.procs" ]] || continue
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$dir/cgroup.procs"
  done
}

ours() {  # ours PID: a live process of this cluster (its command line names the state directory)
  [[ -r "/proc/$1/cmdline" ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF "$D/"
}

stop_processes() {
  local f pid
  # Only process groups led by a process of ours: a stale pid file (after a reboot) may name a pid
  # that is now someone else's, and this runs as root.
  for f in "$D"/pids/*; do
    [[ -f "$f" ]] || continue
    pid="$(cat "$f")"
    if ours "$pid"; then kill -TERM -- "-$pid" 2>/dev/null || true; else rm -f "$f"; fi
  done
  sleep 1
  for f in "$D"/pids/*; do
    [[ -f "$f" ]] || continue
    pid="$(cat "$f")"
    if ours "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    rm -f "$f"
  done
  # containerd's shims run in sessions of their own: find them by the node socket they serve.
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $D/nodes/" 2>/dev/null || true
  # Any other process of this cluster, found by its command line: the seed containerd and its script
  # run in the host's namespaces with no pid file (a run killed while seeding leaves them).
  for f in /proc/[0-9]*; do
    pid="${f#/proc/}"
    [[ "$pid" == "$$" || "$pid" == "$PPID" ]] || { ours "$pid" && kill -KILL "$pid" 2>/dev/null; } || true
  done
  # Whatever still runs in the cluster's network namespace is the cluster's, even when its pid files
  # are gone (a test run killed before it could stop its cluster); never this script or its caller.
  if [[ -e "/run/netns/$NETNS" ]]; then
    for pid in $(ip netns pids "$NETNS" 2>/dev/null); do
      [[ "$pid" == "$$" || "$pid" == "$PPID" ]] || kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  kill_cgroups
}

remove_cgroups() {
  local dir
  for _ in 1 2 3 4 5; do
    for dir in $(cgroup_dirs); do rmdir "$dir" 2>/dev/null || true; done
    [[ -z "$(cgroup_dirs)" ]] && return
    kill_cgroups
    sleep 1
  done
  log "some cgroups could not be removed: $(cgroup_dirs | head -3 | tr '\n' ' ')"
}

[[ "$(id -u)" == 0 ]] || { log "needs root"; exit 1; }
stop_processes
remove_cgroups
ip netns del "$NETNS" 2>/dev/null || true
ip link del "$VETH_HOST" 2>/dev/null || true
if [[ "${1:-}" != "--keep" && -d "$D" ]]; then
  # Mounts made by the nodes live in their mount namespaces, gone with their processes; an umount
  # pass covers a mount that leaked into this one.
  if [[ -f "$D/host-dirs-made" ]]; then xargs -r rmdir --ignore-fail-on-non-empty <"$D/host-dirs-made" || true; fi
  { grep -o " $D/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$D"
fi
log "stopped${1:+ ($1)}"
