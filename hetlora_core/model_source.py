"""Where a ``model.name`` that is not built in comes from: a local folder or a Hugging Face hub id.

Everything that loads a model ends up with a local folder (config.json, weights, tokenizer):

* a local folder is used as it is (``ModelConfig`` made its path absolute and checked config.json);
* a hub id is looked up in the Hugging Face cache first (``local_files_only``: a cache mounted
  from a PVC or filled by an init step serves it with no network), and downloaded only where the
  hub is reachable and ``HF_HUB_OFFLINE`` is not set. Where neither works it fails with one line
  that says how to provide the model (a folder, or a filled cache through ``HF_HOME``).

Only the standard library is imported at module level (``huggingface_hub`` lazily), so config
checks and the model-free steps can use the helpers here cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import model_name_kind

# What a download fetches: configs, tokenizer files and safetensors weights. Security: no pickled
# ``*.bin``/``*.pt`` weights (unpickling runs code) and no ``*.py`` (remote code is never trusted).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


class ModelError(RuntimeError):
    """The base model or tokenizer cannot be loaded; the message says how to fix it."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now: huggingface_hub reads it once at import."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), so a cache mounted after import is found."""
    if os.environ.get("HF_HUB_CACHE", "").strip():
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME", "").strip()
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def _unavailable(repo_id: str, why: str) -> ModelError:
    return ModelError(
        f"model.name: hub id {repo_id!r} is not in the Hugging Face cache at {hf_cache_dir()} and {why}; "
        f"give model.name a local folder (e.g. `hf download {repo_id} --local-dir DIR`, then model.name: DIR) "
        f"or mount a cache that holds it and point HF_HOME (or HF_HUB_CACHE) at it, with HF_HUB_OFFLINE=1")


def hub_folder(repo_id: str, download: bool = True) -> Path:
    """The local snapshot folder of ``repo_id``: from the cache, else downloaded (if ``download``
    and the hub is allowed). The hub token, if any, comes from ``HF_TOKEN`` (a Secret in the cluster)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        folder = Path(str(snapshot_download(repo_id, cache_dir=cache, local_files_only=True)))
        if (folder / "config.json").is_file():
            return folder
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if hub_offline():
        raise _unavailable(repo_id, "HF_HUB_OFFLINE is set")
    if not download:
        raise _unavailable(repo_id, "this step does not download")
    try:
        return Path(str(snapshot_download(repo_id, cache_dir=cache, allow_patterns=DOWNLOAD_PATTERNS)))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end in the same one-line advice
        raise _unavailable(repo_id, f"the hub cannot be reached or refused it ({type(e).__name__})") from None


def model_folder(name: str, download: bool = True) -> Path:
    """The local folder a non-built-in ``model.name`` loads from."""
    kind = model_name_kind(name)
    if kind == "folder":
        return Path(name).expanduser().resolve()
    if kind == "hub":
        return hub_folder(name, download)
    raise ModelError(f"model.name: {name!r} is not a model folder or hub id (kind {kind})")
