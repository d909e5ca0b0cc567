#!/usr/bin/env python3
"""Write a container image as an OCI image-layout tar, without a Docker engine or a registry.

scripts/cluster-up.sh runs its cluster's small images from binaries built or installed on this
machine (the pod sandbox's pause, MinIO from its Go module, Debian's Pushgateway) and imports the
tar into each node's containerd with ``ctr images import``. The layer is reproducible: entries
sorted, owner root, mtime 0, gzip without a timestamp, so the same inputs give the same digest.

    scripts/oci_image.py --name hetlora.local/pause:1 --out pause.tar --add /tmp/pause:/pause \\
        --entrypoint '["/pause"]'
    scripts/oci_image.py --name hetlora.local/pushgateway:1.5.1 --out pg.tar --with-libs \\
        --add /usr/bin/prometheus-pushgateway:/bin/pushgateway --dir /data:0777 --user 65534 \\
        --entrypoint '["/bin/pushgateway"]'

``--with-libs`` adds the shared libraries (and the ELF interpreter) that ``ldd`` lists for every
added executable, at their host paths, so a dynamically linked binary from Debian runs in an
otherwise empty image.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

LDD_PATH = re.compile(r"(/\S+)")


def shared_libs(binary: Path) -> list[Path]:
    """The absolute paths ``ldd`` resolves for ``binary`` (none for a static one)."""
    res = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if res.returncode != 0 or "not a dynamic executable" in res.stdout + res.stderr:
        return []
    missing = [ln.strip() for ln in res.stdout.splitlines() if "not found" in ln]
    if missing:
        sys.exit(f"oci_image: {binary} needs libraries that are not on this machine: {missing}")
    return sorted({Path(m) for ln in res.stdout.splitlines() for m in LDD_PATH.findall(ln.split("=>")[-1])})


def _info(name: str, *, mode: int, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name.lstrip("/"))
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, link
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = 0
    return ti


def layer(files: dict[str, Path], dirs: dict[str, int]) -> bytes:
    """An uncompressed layer tar: the files (dereferenced, modes kept), their parent directories
    (0755) and the extra directories with their modes (e.g. /tmp 1777)."""
    parents: dict[str, int] = {}
    for dest in list(files) + list(dirs):
        p = Path(dest).parent
        while str(p) != "/":
            parents.setdefault(str(p), 0o755)
            p = p.parent
    entries = {**parents, **dirs}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(entries):
            tar.addfile(_info(d, mode=entries[d], kind=tarfile.DIRTYPE))
        for dest in sorted(files):
            data = files[dest].read_bytes()
            tar.addfile(_info(dest, mode=files[dest].stat().st_mode & 0o7777, size=len(data)), io.BytesIO(data))
    return buf.getvalue()


def image_tar(name: str, raw_layer: bytes, config: dict[str, object]) -> bytes:
    """The OCI layout (oci-layout, index.json, blobs/sha256/...) as a tar, the index naming the
    image for containerd (``io.containerd.image.name``) and for OCI tools (``ref.name``)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    gz = gzip.compress(raw_layer, mtime=0)
    cfg = {"architecture": "amd64", "os": "linux", "config": config,
           "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw_layer).hexdigest()]},
           "history": [{"created_by": "scripts/oci_image.py"}]}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(cfg, sort_keys=True).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(gz)}]}
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(json.dumps(manifest, sort_keys=True).encode()),
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag}}]}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in [("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
                           ("index.json", json.dumps(index, sort_keys=True).encode())] + \
                          [(f"blobs/sha256/{d.split(':', 1)[1]}", b) for d, b in sorted(blobs.items())]:
            tar.addfile(_info(path, mode=0o644, size=len(data)), io.BytesIO(data))
    return out.getvalue()


def parse_mode(s: str) -> int:
    return int(s, 8)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="image reference, e.g. hetlora.local/pause:1")
    ap.add_argument("--out", required=True, type=Path, help="the OCI layout tar to write")
    ap.add_argument("--add", action="append", default=[], metavar="SRC:DEST", help="a host file copied to DEST (repeatable)")
    ap.add_argument("--dir", action="append", default=[], metavar="DEST:MODE", help="an empty directory, octal mode (repeatable)")
    ap.add_argument("--with-libs", action="store_true", help="add the shared libraries ldd lists for each added file")
    ap.add_argument("--entrypoint", default="[]", help="JSON list")
    ap.add_argument("--cmd", default="[]", help="JSON list")
    ap.add_argument("--user", default="", help="user[:group] the image runs as")
    ap.add_argument("--env", action="append", default=[], metavar="K=V")
    ap.add_argument("--workdir", default="/")
    args = ap.parse_args(argv)
    files: dict[str, Path] = {}
    for spec in args.add:
        src, _, dest = spec.partition(":")
        if not dest.startswith("/") or not Path(src).is_file():
            sys.exit(f"oci_image: --add {spec!r}: want HOST_FILE:/ABSOLUTE/DEST with an existing file")
        files[dest] = Path(src)
    if args.with_libs:
        for src in list(files.values()):
            for lib in shared_libs(src):
                files.setdefault(str(lib), lib.resolve())
    dirs = {d: parse_mode(m or "755") for d, _, m in (s.partition(":") for s in args.dir)}
    config: dict[str, object] = {"Entrypoint": json.loads(args.entrypoint), "Cmd": json.loads(args.cmd) or None,
                                 "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", *args.env], "WorkingDir": args.workdir}
    if args.user:
        config["User"] = args.user
    args.out.write_bytes(image_tar(args.name, layer(files, dirs), {k: v for k, v in config.items() if v is not None}))
    print(f"{args.out}: {args.name}, {len(files)} files, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
