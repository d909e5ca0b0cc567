"""One client's local update: a single readable training loop (AdamW) with the tail regulariser
(added to the loss, or applied as a proximal step after each optimiser step: ``pruning.form``).

``train_lora`` attaches the received adapter to the shared base model through peft, trains it for
``training.local_steps`` steps on seeded random windows of the client's text, and detaches again.
Pruning is a separate, model-free step (``pruning.self_prune``), so the pipeline can run it as a
cheap component of its own. ``train_full`` is the full fine-tuning baseline through the same loop.
Adapters and full deltas come in and go out as numpy (what the model-free steps use); torch stays here.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import attention, compiled, frozen_cast, lm_loss, peft_bridge, precision
from .adapter import LoraAdapter
from .config import HetLoRAConfig
from .data import Batch, ClientData, sample_batch
from .faults import failpoint
from .methods import method_for
from .pruning import tail_scores
from .regulariser import proximal_step, regulariser
from .threads import task_threads


@dataclass
class TrainResult:
    """Outcome of local training (before the prune decision)."""

    client_id: str
    adapter: LoraAdapter | None  # LoRA methods
    full_delta: dict[str, np.ndarray] | None  # full fine-tuning: trained weights minus base (float32)
    num_samples: int  # training windows of seq_len tokens the client holds
    num_tokens: int  # tokens processed in this update
    train_loss: float  # mean task loss over the local steps (without the regulariser)
    reg_loss: float  # mean regulariser value over the local steps
    seconds: float


class ClientTimeout(RuntimeError):
    """Local training passed ``federation.client_timeout_s``; the client drops out of the round."""


def client_seed(seed: int, rnd: int, client_id: str) -> int:
    """A stable per-(run, round, client) seed; crc32, not hash(), which changes per process."""
    return (seed * 1_000_003 + rnd * 7919 + zlib.crc32(client_id.encode())) % (2**63)


def autocast(cfg: HetLoRAConfig) -> contextlib.AbstractContextManager:
    """The forward pass's autocast for this process's precision decision (precision.py)."""
    return precision.resolve(cfg).autocast()


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (runtime.model placed them): batches go there."""
    return next(model.parameters()).device


@contextlib.contextmanager
def _step_kernels(model: torch.nn.Module, cfg: HetLoRAConfig) -> Iterator[None]:
    """How this training call's steps run, not what they compute: the attention kernel
    (``model.attention``, attention.py) and, on CPU in bf16, the frozen Linear weights held in bf16
    (frozen_cast.py; weights that train, as in full fine-tuning, stay as they are); with
    ``training.compile``, the decoder layers through torch.compile (compiled.py)."""
    prec = precision.resolve(cfg)
    kernel = attention.choose(cfg.model.attention, prec.device, prec.dtype, cfg.data.seq_len)
    with attention.using(model, kernel), frozen_cast.held_in(model, prec.torch_dtype, prec.device), \
            compiled.compiled_layers(model, cfg.training.compile):
        yield


def _loop(model: torch.nn.Module, params: list[torch.nn.Parameter], client: ClientData, cfg: HetLoRAConfig, rnd: int,
          reg_fn: Callable[[], torch.Tensor | None], after_step: Callable[[torch.optim.Optimizer], None] | None = None) -> tuple[float, float, int]:
    """The training loop shared by every method: returns (mean task loss, mean reg, tokens).

    ``reg_fn``: the penalty at the current weights, before the step, reported as ``reg_loss``; a
    differentiable one is added to the loss, one computed without grad is only reported.
    ``after_step``: run after each optimiser step that was taken (the proximal form's shrinkage)."""
    t = cfg.training
    seed = client_seed(cfg.federation.seed, rnd, client.client_id)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    prec, device = precision.resolve(cfg), _device_of(model)
    # float16 on CUDA: scale the loss so small gradients do not underflow (disabled: a no-op).
    scaler = torch.amp.GradScaler("cuda", enabled=prec.needs_scaler)
    losses, regs, tokens = [], [], 0
    deadline = time.monotonic() + cfg.federation.client_timeout_s
    # Dropout (a base model's own, or LoRA's) draws from torch's global generator: seeded per client
    # for the loop and restored after, so a client's update does not depend on what its process ran
    # before (a warm server's child, a task of its own, an in-process round: hetlora_core/warm_up.py).
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            torch.manual_seed(seed)
            model.train()
            for step in range(t.local_steps):
                if time.monotonic() > deadline:
                    raise ClientTimeout(f"client {client.client_id}: {step} of {t.local_steps} local steps done when "
                                        f"federation.client_timeout_s={cfg.federation.client_timeout_s} passed")
                failpoint("train_step", round=rnd, client=client.client_id, step=step)  # tests: a slow or dying client
                # Text: random windows, their own labels (unchanged); instruction data: masked, padded samples.
                # Sampled on the CPU generator (same windows on every device), then moved.
                batch = (Batch.lm(sample_batch(client.train_ids, t.batch_size, cfg.data.seq_len, gen)) if client.train_samples is None
                         else client.train_samples.draw(t.batch_size, gen)).to(device)
                with prec.autocast():
                    loss = lm_loss.causal_lm_loss(model, batch, prec.torch_dtype, t.chunked_loss)
                reg = reg_fn()
                total = loss.float() + (reg if reg is not None and reg.requires_grad else 0.0)
                opt.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                scale = scaler.get_scale() if after_step is not None else 0.0  # 1.0 when the scaler is disabled
                scaler.step(opt)  # plain opt.step() when the scaler is disabled
                scaler.update()
                # A float16 step with inf/nan gradients is skipped and the scale lowered: then skip the
                # proximal step too, as AdamW's own decoupled decay is skipped with the step.
                if after_step is not None and scaler.get_scale() >= scale:
                    after_step(opt)
                losses.append(float(loss.detach()))
                regs.append(float(reg.detach()) if reg is not None else 0.0)
                tokens += batch.num_tokens()
        finally:
            model.eval()  # also after a timeout or a crash: the shared base model must stay in eval mode
    return sum(losses) / len(losses), sum(regs) / len(regs), tokens


def train_lora(model: torch.nn.Module, received: LoraAdapter, client: ClientData, cfg: HetLoRAConfig, rnd: int) -> TrainResult:
    """Train ``received`` (already truncated to the client's rank) on the client's data."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(task_threads(cfg.training.threads))  # the CPUs this task may use (threads.py)
    start = time.perf_counter()
    peft_model = peft_bridge.attach(model, received, reuse=True)
    try:
        A, B = peft_bridge.lora_tensors(peft_model)
        ranks = received.ranks
        use_reg = method_for(cfg).prunes  # the one switch on the method (hetlora_core.methods)
        proximal = use_reg and cfg.pruning.form == "proximal"

        def reg_fn() -> torch.Tensor | None:
            if not use_reg:
                return None
            # Proximal form: the penalty is applied by after_step, not through the loss; its value is only reported.
            with torch.no_grad() if proximal else contextlib.nullcontext():
                return regulariser(A, B, ranks, cfg.pruning, cfg.ranks.r_min)

        # The prox skips a module received with a zero tail score (round 0: B = 0): it cannot prune (the
        # score cannot go down), and there the tail's A rows get no gradient, so Adam's metric is ~lr/eps
        # and the prox would zero them, leaving a dead component that no later round can regrow.
        live = [m for m, s in tail_scores(received.A, received.B, ranks, cfg.pruning).items() if s > 0] if proximal else []
        A_live, B_live = {m: A[m] for m in live}, {m: B[m] for m in live}

        def after_step(opt: torch.optim.Optimizer) -> None:  # the prox in the metric of the AdamW step just taken
            proximal_step(A_live, B_live, ranks, cfg.pruning, cfg.ranks.r_min, opt)

        with precision.checkpointing(model, cfg.model.gradient_checkpointing), _step_kernels(peft_model, cfg):
            loss, reg, tokens = _loop(peft_model, peft_bridge.lora_parameters(peft_model), client, cfg, rnd, reg_fn,
                                      after_step if proximal else None)
        trained = peft_bridge.extract(peft_model, received.scale)
    finally:
        peft_bridge.detach(peft_model)
        torch.set_num_threads(prev_threads)
    return TrainResult(client.client_id, trained, None, client.num_samples(cfg.data.seq_len), tokens, loss, reg,
                       time.perf_counter() - start)


def train_full(model: torch.nn.Module, global_delta: dict[str, np.ndarray], client: ClientData, cfg: HetLoRAConfig,
               rnd: int) -> TrainResult:
    """Full fine-tuning baseline: apply the global delta, train every weight, return the new delta."""
    start = time.perf_counter()
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if k in global_delta}
    params = [p for n, p in model.named_parameters() if n in global_delta]
    try:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in global_delta:
                    p.add_(peft_bridge.as_tensor(global_delta[n]).to(p.device))
                    p.requires_grad_(True)
        with _step_kernels(model, cfg):
            loss, reg, tokens = _loop(model, params, client, cfg, rnd, lambda: None)
        with torch.no_grad():
            delta = {n: (p.detach() - base[n]).float().cpu().numpy() for n, p in model.named_parameters() if n in global_delta}
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in base:
                    p.copy_(base[n])
                    p.requires_grad_(False)
    return TrainResult(client.client_id, None, delta, client.num_samples(cfg.data.seq_len), tokens, loss, reg,
                       time.perf_counter() - start)


def full_param_names(model: torch.nn.Module) -> list[str]:
    """Parameters full fine-tuning trains: all of them (tied embeddings appear once)."""
    return [n for n, _ in model.named_parameters()]
