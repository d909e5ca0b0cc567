"""scripts/oci_image.py: OCI image-layout tars for the Docker-free cluster (containerd imports them
in tests/test_cluster.py; here the format, reproducibility and the library closure)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "oci_image.py"


def build(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / f"{name}.tar"
    subprocess.run([sys.executable, str(SCRIPT), "--name", f"hetlora.local/{name}:1", "--out", str(out), *args],
                   check=True, capture_output=True, text=True)
    return out


def read_layout(path: Path) -> tuple[dict, dict, dict, tarfile.TarFile]:
    """(index, manifest, config, layer tar) after checking every blob against its digest."""
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    blob = lambda d: files["blobs/sha256/" + d["digest"].split(":", 1)[1]]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]))
    config = json.loads(blob(manifest["config"]))
    raw = gzip.decompress(blob(manifest["layers"][0]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    return index, manifest, config, tarfile.open(fileobj=io.BytesIO(raw))


def test_image_is_a_valid_layout_named_for_containerd(tmp_path: Path) -> None:
    src = tmp_path / "tool"
    src.write_bytes(b"#!/bin/sh\necho hi\n")
    src.chmod(0o750)
    index, _, config, layer = read_layout(build(tmp_path, "t", "--add", f"{src}:/usr/bin/tool", "--dir", "/tmp:1777",
                                                "--user", "65532:65532", "--entrypoint", '["/usr/bin/tool"]'))
    ann = index["manifests"][0]["annotations"]
    assert ann["io.containerd.image.name"] == "hetlora.local/t:1" and ann["org.opencontainers.image.ref.name"] == "1"
    assert config["config"]["User"] == "65532:65532" and config["config"]["Entrypoint"] == ["/usr/bin/tool"]
    members = {m.name: m for m in layer.getmembers()}
    assert set(members) == {"usr", "usr/bin", "usr/bin/tool", "tmp"}
    assert members["usr/bin/tool"].mode == 0o750 and members["tmp"].mode == 0o1777
    assert all(m.uid == 0 and m.mtime == 0 for m in members.values())
    assert layer.extractfile("usr/bin/tool").read() == src.read_bytes()  # type: ignore[union-attr]


def test_same_inputs_give_the_same_digest(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    a = build(tmp_path, "a", "--add", f"{src}:/f")
    b = tmp_path / "b.tar"
    shutil.copy(a, b)
    src.touch()  # a new mtime on the host file changes nothing in the image
    c = build(tmp_path, "a", "--add", f"{src}:/f")
    assert a.read_bytes() == c.read_bytes() == b.read_bytes()


def test_with_libs_adds_what_a_dynamic_binary_needs(tmp_path: Path) -> None:
    binary = Path(shutil.which("env") or "/usr/bin/env")
    if "not a dynamic" in subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout:
        pytest.skip(f"{binary} is static here")
    *_, layer = read_layout(build(tmp_path, "d", "--with-libs", "--add", f"{binary}:/bin/env"))
    names = layer.getnames()
    assert any(n.split("/")[-1].startswith("libc.so") for n in names), names
    assert any("ld-linux" in n for n in names), names  # the ELF interpreter too


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--name", "x:1", "--out", str(tmp_path / "x.tar"), "--add",
                          f"{tmp_path / 'nope'}:/nope"], capture_output=True, text=True)
    assert res.returncode != 0 and "--add" in res.stderr and "nope" in res.stderr
