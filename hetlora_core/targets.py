"""Which modules get LoRA: ``model.target_modules`` (``auto``, ``all-linear`` or a list) resolved
against a concrete model, in one place, and checked before any round starts.

* ``auto``: peft's per-architecture default, keyed by ``config.model_type`` (q_proj/v_proj for the
  Llama family, SmolLM2 included; c_attn for GPT-2; ...). A model peft has no default for is a
  config error that lists the model's Linear layers (use ``all-linear`` or a list there).
* ``all-linear``: every Linear layer except the output head, as peft's own ``all-linear`` does.
* a list: module names, matched against the last part of each module path.

LoRA layers are Linear layers: ``torch.nn.Linear`` and transformers' ``Conv1D`` (GPT-2's
transposed Linear; peft wraps it with ``fan_in_fan_out``). ``check_model`` instantiates the model on
the meta device from its config.json (no weights, milliseconds), so the driver rejects a module
name the model does not have before any client trains; otherwise every client would fail softly
and the round would end in a quorum error.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .config import BUILTIN_MODELS, ConfigError, ModelConfig, model_name_kind
from .model_source import ModelError, model_folder


def linear_classes() -> tuple[type, ...]:
    """The module types LoRA can wrap: nn.Linear and (where transformers has it) GPT-2's Conv1D."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (torch.nn.Linear,)
    return (torch.nn.Linear, Conv1D)


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear-like module; Conv1D stores its weight transposed as (in, out)."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return int(w.shape[1]), int(w.shape[0])


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def linear_names(model: torch.nn.Module, include_head: bool = False) -> list[str]:
    """Sorted last-part names of the model's Linear layers (the output head left out unless asked)."""
    head, classes = _output_head(model), linear_classes()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, classes) and name and (include_head or m is not head)})


def _model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def resolve_target_modules(model: torch.nn.Module, target_modules: str | tuple[str, ...]) -> tuple[str, ...]:
    """The concrete module names ``target_modules`` stands for on ``model`` (sorted). Raises
    ``ConfigError`` naming ``model.target_modules``, the bad names and the Linear layers the model has."""
    have = linear_names(model, include_head=True)
    available = f"this model's Linear layers: {linear_names(model)}"
    if target_modules == "all-linear":
        names = linear_names(model)
        if not names:
            raise ConfigError(f"config: model.target_modules: all-linear found no Linear layer in {type(model).__name__}")
        return tuple(names)
    if target_modules == "auto":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        mtype = _model_type(model)
        if mtype not in DEFAULTS:
            raise ConfigError(f"config: model.target_modules: auto has no default for model type {mtype!r} (peft knows none); "
                              f"set all-linear or a list from {available}")
        names = [n for n in DEFAULTS[mtype] if n in have]
        if not names:
            raise ConfigError(f"config: model.target_modules: auto picks peft's {list(DEFAULTS[mtype])} for {mtype!r}, but the "
                              f"model has none of them; set all-linear or a list from {available}")
        return tuple(sorted(names))
    missing = sorted(set(target_modules) - set(have))
    if missing:
        raise ConfigError(f"config: model.target_modules: {missing} not found in {type(model).__name__}; {available}")
    return tuple(sorted(set(target_modules)))


def meta_model(cfg: ModelConfig, download: bool = False) -> torch.nn.Module | None:
    """``cfg``'s model built on the meta device from its config alone (no weights, no memory).
    None where the config is not at hand (a hub id neither cached nor downloadable here; the
    SmolLM2 cache not built yet: its names are known, it is a Llama)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import tiny_config

    if cfg.name == "tiny":
        config: Any = tiny_config(cfg.tiny_hidden, cfg.tiny_layers)
    else:
        if cfg.name == "smollm2-135m":
            from .models import _MODEL_DIR, _cached_folder

            folder = _cached_folder(_MODEL_DIR, "config.json")
        elif model_name_kind(cfg.name) == "hub":
            try:
                folder = model_folder(cfg.name, download=download)
            except ModelError:
                return None
        else:
            folder = model_folder(cfg.name)
        if not (folder / "config.json").is_file():
            return None
        try:
            # Security: trust_remote_code=False, as for the real load.
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ModelError(f"model.name: {folder}/config.json is not a model config AutoConfig can read ({e})") from None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except ValueError as e:  # not a causal LM architecture
            raise ModelError(f"model.name: {cfg.name!r} is not a causal language model AutoModelForCausalLM knows ({e})") from None


def check_model(cfg: ModelConfig, download: bool = False) -> tuple[str, ...] | None:
    """Resolve ``model.target_modules`` on the model's architecture (meta device), before any round.

    Returns the module names, or None when the model's config is not available here (a hub id the
    driver cannot see: the tasks resolve it when they load the model)."""
    model = meta_model(cfg, download=download)
    if model is None:
        if cfg.name in BUILTIN_MODELS:  # SmolLM2 not cached yet: a Llama, checked by name
            return resolve_target_modules(_smollm2_like(), cfg.target_modules)
        return None
    return resolve_target_modules(model, cfg.target_modules)


def _smollm2_like() -> torch.nn.Module:
    """A one-layer meta Llama: SmolLM2's module names, for checking before its cache exists."""
    from transformers import LlamaForCausalLM

    from .models import tiny_config

    with torch.device("meta"):
        return LlamaForCausalLM(tiny_config(64, 1))
