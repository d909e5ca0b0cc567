"""Where and in what precision the model runs: one decision per process, made from the config and the machine.

``decide`` is a pure function of the request (``model.device``, ``model.dtype``, ``model.quantize``)
and of what the machine has (CUDA, bf16 on that GPU, the CPU's flags, bitsandbytes), so every
branch is testable on fake flags. ``resolve`` is the thin impure wrapper that probes the machine.

Why the CPU flags: bf16 pays only where the hardware multiplies bf16 natively. On an AVX2-only EPYC
a bf16 matmul measured 28x slower than float32 (PyTorch emulates it; docs/benchmarks.md); on an AMX
Xeon of the same size 4.4x faster (a figure from issue 11, measured on another machine of this project,
not by a benchmark here). So ``auto`` picks bf16 on CPU only with ``amx_bf16`` or ``avx512_bf16``.

How a dtype is applied: the frozen base weights and the LoRA parameters stay float32 and the
forward pass runs under ``torch.autocast(device, dtype)``. That keeps float32 runs bit-identical
to before (autocast is not entered at all), keeps the optimizer state and the adapters that leave
the client in float32 (aggregation and truncation never see low precision), and is the same code
on CPU and GPU. The memory cost is the float32 base (4 bytes/parameter: 1.7B -> 7 GB); for
multi-billion models on small GPUs use ``model.quantize: 4bit`` (QLoRA: NF4 base, ~0.5 byte/parameter).
float16 (GPUs without bf16: V100, T4) needs a gradient scaler, which ``needs_scaler`` says.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, HetLoRAConfig, ModelConfig, TrainingConfig

NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The decision: ``device`` ("cpu" | "cuda"), ``dtype`` (compute dtype name) and why."""

    device: str
    dtype: str
    reason: str
    quantize: str = "none"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        """float16 gradients underflow without loss scaling; bf16 has float32's exponent range."""
        return self.dtype == "float16" and self.device == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's context: nothing at all for float32 (bit-identical to no autocast)."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.torch_dtype)

    def as_dict(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype, "quantize": self.quantize, "reason": self.reason}


def requested_dtype(mcfg: ModelConfig, tcfg: TrainingConfig) -> str:
    """``model.dtype`` with the legacy ``training.bf16`` folded in: true means bfloat16 autocast,
    false (what old configs wrote) pins float32, null (the default) defers to ``model.dtype``."""
    if tcfg.bf16 is None:
        return mcfg.dtype
    return "bfloat16" if tcfg.bf16 else "float32"


def decide(req_device: str, req_dtype: str, cuda_available: bool, cuda_bf16: bool, cpu_flags: frozenset[str] | set[str],
           quantize: str = "none", bnb_available: bool = False) -> Precision:
    """The pure decision. Raises ``ConfigError`` naming the field for a request the machine cannot serve."""
    if req_device == "cuda" and not cuda_available:
        raise ConfigError("config: model.device: 'cuda' requested but torch sees no CUDA device here "
                          "(torch.cuda.is_available() is False); use model.device: auto (falls back to cpu) or cpu")
    device = "cuda" if req_device == "cuda" or (req_device == "auto" and cuda_available) else "cpu"
    why_dev = "requested" if req_device != "auto" else ("CUDA available" if device == "cuda" else "no CUDA device")
    if quantize == "4bit":
        if device != "cuda":
            raise ConfigError(f"config: model.quantize: '4bit' needs a CUDA device (bitsandbytes NF4 kernels), but the device is "
                              f"cpu ({why_dev}); use model.quantize: none on CPU")
        if not bnb_available:
            raise ConfigError("config: model.quantize: '4bit' needs the bitsandbytes package, which is not installed here; "
                              "install it (pip install bitsandbytes; for the cluster add it to images/torch-cuda.lock) or use model.quantize: none")
    if device == "cuda":
        if req_dtype == "auto":
            dtype = "bfloat16" if cuda_bf16 else "float16"
            why = "GPU supports bf16" if cuda_bf16 else "GPU has no bf16 (pre-Ampere): float16 with a gradient scaler"
        else:
            if req_dtype == "bfloat16" and not cuda_bf16:
                raise ConfigError("config: model.dtype: 'bfloat16' requested but this GPU does not support bf16 "
                                  "(torch.cuda.is_bf16_supported() is False); use float16 or auto")
            dtype, why = req_dtype, "requested"
    else:
        native = sorted(set(cpu_flags) & NATIVE_BF16_FLAGS)
        if req_dtype == "float16":
            raise ConfigError("config: model.dtype: 'float16' is not supported on cpu (no float16 matmul kernels worth "
                              "using; float16 also needs a CUDA gradient scaler); use auto, float32 or bfloat16")
        if req_dtype == "auto":
            dtype = "bfloat16" if native else "float32"
            why = (f"CPU has native bf16 ({', '.join(native)})" if native
                   else "CPU has no native bf16 (no amx_bf16/avx512_bf16): bf16 would be emulated and slower")
        else:
            dtype = req_dtype
            why = "requested" + ("" if dtype == "float32" or native else "; emulated on this CPU (no amx_bf16/avx512_bf16): slow")
    return Precision(device, dtype, f"device {device}: {why_dev}; dtype {dtype}: {why}", quantize)


# ---------------------------------------------------------------- the machine (impure)


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is missing (macOS: float32)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def _machine() -> tuple[bool, bool, frozenset[str], bool]:
    cuda = torch.cuda.is_available()
    return (cuda, bool(cuda and torch.cuda.is_bf16_supported()), cpu_flags(),
            importlib.util.find_spec("bitsandbytes") is not None)


def resolve_model(mcfg: ModelConfig, tcfg: TrainingConfig) -> Precision:
    cuda, bf16, flags, bnb = _machine()
    return decide(mcfg.device, requested_dtype(mcfg, tcfg), cuda, bf16, flags, mcfg.quantize, bnb)


def resolve(cfg: HetLoRAConfig) -> Precision:
    """This process's decision for ``cfg`` (what the client, the evaluation and the model placement use)."""
    return resolve_model(cfg.model, cfg.training)


def quantization_config(mcfg: ModelConfig | str) -> Any:
    """The ``BitsAndBytesConfig`` for ``model.quantize: 4bit`` (QLoRA: NF4 base weights, bf16 compute
    where the GPU has it), None otherwise. Pass it as ``from_pretrained(..., quantization_config=...)``.
    Takes the model section or just its ``quantize`` value (the loaders' process cache keys on strings)."""
    if (mcfg if isinstance(mcfg, str) else mcfg.quantize) != "4bit":
        return None
    from transformers import BitsAndBytesConfig  # bitsandbytes itself is imported by transformers at load

    _, bf16, _, _ = _machine()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)


def from_pretrained_kwargs(mcfg: ModelConfig | str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: for 4bit the quantization config and the whole model
    on GPU 0 (a bitsandbytes model is placed at load and cannot be moved with ``.to`` later)."""
    q = quantization_config(mcfg)
    return {} if q is None else {"quantization_config": q, "device_map": {"": 0}}


def place(model: torch.nn.Module, mcfg: ModelConfig, prec: Precision) -> torch.nn.Module:
    """Put the (frozen, float32) base model on the decided device, once per process; prepare a 4bit
    model for k-bit training (float32 norms, no gradients into the base)."""
    if prec.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        # checkpointing is switched per training call (checkpointing() below), not here
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for p in model.parameters():  # the base stays frozen: only LoRA trains
            p.requires_grad_(False)
        return model
    return model.to(prec.device)


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """Gradient checkpointing for one training call (``model.gradient_checkpointing``), off again
    after: the base model is shared per process by everything that uses the same weights."""
    enable, disable = getattr(model, "gradient_checkpointing_enable", None), getattr(model, "gradient_checkpointing_disable", None)
    if not (on and callable(enable) and callable(disable)):
        yield
        return
    # Non-reentrant checkpointing works with a frozen base: the reentrant variant needs an input
    # that requires grad (peft's enable_input_require_grads) or LoRA gets no gradient.
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        disable()
