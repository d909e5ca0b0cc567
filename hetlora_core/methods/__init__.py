"""The one switch on ``strategy.name``: every place whose behaviour depends on the method asks the
``Method`` object that ``method_for(cfg)`` returns, instead of testing the name itself.

``lora.py`` holds the LoRA family (HetLoRA, zero-padding, HomLoRA, Recon+SVD: they differ only in
the aggregation math of ``strategies.py``); ``full_ft.py`` holds full fine-tuning. Both modules
import torch only inside the methods that run the model, so the model-free steps (plan, prune,
aggregate) stay torch-free.
"""

from __future__ import annotations

from ..config import HetLoRAConfig
from .base import ClientUpdate, Method, Spec, UploadError

__all__ = ["ClientUpdate", "Method", "Spec", "UploadError", "method_for"]


def method_for(cfg: HetLoRAConfig) -> Method:
    """The method object for ``cfg.strategy.name`` (the only place the name is dispatched on)."""
    if cfg.strategy.name == "full_ft":
        from .full_ft import FullFineTuning

        return FullFineTuning(cfg)
    from .lora import LoraMethod

    return LoraMethod(cfg)
