"""Bring-up time and memory of the Docker-free cluster (scripts/cluster-up.sh), measured here.

Starts a cluster of its own (state in a temp dir, its own network namespace), times
``cluster-up.sh`` from the cached binaries to every node Ready and MinIO, the Pushgateway and
CoreDNS rolled out, then sums the resident memory of everything the cluster runs: the processes in
its network namespace (control plane, kubelets, containerds, their shims) and those in the nodes'
cgroups (the pods' containers), by command name. Then tears it down and times that too.

    .venv/bin/python benchmarks/bench_cluster.py          # needs root and scripts/setup.sh's tools
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _common import OUT, ROOT, machine

sys.path.insert(0, str(ROOT / "tests"))
from real_cluster import RealCluster, missing_prerequisites  # noqa: E402


def cluster_processes(netns: str) -> dict[int, tuple[str, int]]:
    """pid -> (command name, RSS bytes) of every process in the cluster's netns or node cgroups."""
    ns_inode = os.stat(f"/run/netns/{netns}").st_ino
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            in_ns = os.stat(d / "ns" / "net").st_ino == ns_inode
            in_cg = "/hetlora-" in (d / "cgroup").read_text()
            if not (in_ns or in_cg):
                continue
            status = dict(ln.split(":", 1) for ln in (d / "status").read_text().splitlines() if ":" in ln)
        except OSError:
            continue
        rss_kb = int(status.get("VmRSS", "0 kB").split()[0])
        out[int(d.name)] = (status["Name"].strip(), rss_kb * 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT), help="where cluster.json goes")
    ap.add_argument("--quick", action="store_true", help="the same measurement (a cluster has no smaller variant)")
    args = ap.parse_args()
    why = missing_prerequisites()
    if why:
        sys.exit(f"bench_cluster: {why}")
    cluster = RealCluster()
    if why := cluster.claim():
        shutil.rmtree(cluster.dir, ignore_errors=True)
        sys.exit(f"bench_cluster: {why}")
    facts = machine()
    try:
        cluster.up()
        time.sleep(5)  # let the first probes and syncs settle before reading memory
        procs = cluster_processes(cluster.env["HETLORA_CLUSTER_NETNS"])
    finally:
        t = time.monotonic()
        cluster.down()
        down_s = time.monotonic() - t
    by_name: dict[str, int] = collections.defaultdict(int)
    for name, rss in procs.values():
        by_name[name] += rss
    total = sum(by_name.values())
    res = {"up_s": cluster.up_s, "down_s": down_s, "rss_total_mb": total / 2**20, "processes": len(procs),
           "rss_mb_by_command": {k: v / 2**20 for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}, **facts,
           "load_avg_end": os.getloadavg()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cluster.json").write_text(json.dumps(res, indent=1))
    print(f"cluster up in {cluster.up_s:.1f} s (cached binaries), down in {down_s:.1f} s; "
          f"{len(procs)} processes, {total / 2**20:.0f} MiB RSS in all:")
    for k, v in list(res["rss_mb_by_command"].items())[:12]:
        print(f"  {k:24s} {v:7.1f} MiB")


if __name__ == "__main__":
    main()
