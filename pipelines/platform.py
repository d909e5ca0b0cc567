"""Kubernetes placement of pipeline tasks: small free functions, one concern each (as in
kfp-kubernetes). All values come from the typed config; credentials come only from a Secret."""

from __future__ import annotations

from typing import Literal

from kfp import kubernetes
from kfp.dsl import PipelineTask

from hetlora_core.config import HetLoRAConfig, TierConfig
from hetlora_core.threads import CONCURRENT_TASKS_ENV

# Env var names the store reads (hetlora_core.store.s3); the Secret holds keys accesskey/secretkey.
SECRET_KEYS = {"accesskey": "HETLORA_S3_ACCESS_KEY", "secretkey": "HETLORA_S3_SECRET_KEY"}
NON_ROOT_UID = 1000
# Caches: the image sets HOME, XDG_CACHE_HOME and HETLORA_CACHE under /tmp (images/Dockerfile), the
# writable emptyDir below. Not set per task: kfp.local applies task env vars too, and would then
# move a local run's model cache away from the user's ~/.cache/hetlora.


def set_tier_resources(task: PipelineTask, tier: TierConfig) -> PipelineTask:
    """Requests and limits matched to the tier's rank (measured: see `hetlora tiers measure`)."""
    task.set_cpu_request(tier.cpu_request).set_cpu_limit(tier.cpu_limit)
    task.set_memory_request(tier.memory_request).set_memory_limit(tier.memory_limit)
    if tier.gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(tier.gpu)
    return task


def place_on_tier(task: PipelineTask, tier: TierConfig) -> PipelineTask:
    """Node selector and tolerations of the tier's node pool, and a ``hetlora.io/tier`` pod label
    (for dashboards, NetworkPolicies, and admission policies: kfp-kubernetes 2.17 has no setter for
    priorityClassName, so ``priority_class`` is applied by such a policy, see docs/deploy.md)."""
    kubernetes.add_pod_label(task, "hetlora.io/tier", tier.name)
    for key, value in sorted(tier.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in tier.tolerations:
        kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator", "Equal"),
                                  value=tol.get("value"), effect=tol.get("effect"))
    return task


def place_on_gpu_tier(task: PipelineTask, tier: TierConfig) -> PipelineTask:
    """The evaluate task gets the largest tier's resources (it runs the model at r_max); when those
    include a GPU it also needs that tier's node pool (GPU nodes are usually tainted), and it runs
    on the tier's (CUDA) image. CPU-only: it stays unplaced, as before (any node with the room)."""
    return place_on_tier(task, tier) if tier.gpu else task


def use_store_secret(task: PipelineTask, cfg: HetLoRAConfig, role: Literal["server", "client"] = "server") -> PipelineTask:
    """Store credentials as env vars from a Kubernetes Secret: never a pipeline parameter, so they
    never appear in the compiled YAML, the run's parameters or the KFP UI. Security: client tasks
    (train, prune, evaluate-client) get the client role's Secret ``kubeflow.client_store_secret``
    when one is configured; on MinIO that user cannot write plans, globals or metrics (store/roles.py)."""
    if cfg.store.kind == "s3":
        kf = cfg.kubeflow
        name = (kf.client_store_secret or kf.store_secret) if role == "client" else kf.store_secret
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=dict(SECRET_KEYS))
    return task


def use_server_key(task: PipelineTask, cfg: HetLoRAConfig) -> PipelineTask:
    """Server tasks (aggregate, evaluate) only: the server key that signs and verifies server state
    (hetlora_core/store/signing.py), from the Secret ``kubeflow.server_key_secret`` (key ``key``)."""
    if cfg.kubeflow.server_key_secret:
        kubernetes.use_secret_as_env(task, secret_name=cfg.kubeflow.server_key_secret,
                                     secret_key_to_env={"key": cfg.store.server_key_env})
    return task


def withhold_server_key(task: PipelineTask, cfg: HetLoRAConfig) -> PipelineTask:
    """Client tasks: the server key's variable set empty. In the cluster they never have it; under
    kfp.local each task inherits the driver's environment, which holds the run's key, and a client
    holding the HMAC key could forge server state (store/signing.py)."""
    task.set_env_variable(cfg.store.server_key_env, "")
    return task


# The images' Hugging Face hub cache (HF_HOME=/tmp/hetlora/.cache/huggingface in images/Dockerfile*);
# a PVC mounted here is found with no env var, and kfp.local (which ignores mounts) is unaffected.
HF_HUB_CACHE_PATH = "/tmp/hetlora/.cache/huggingface/hub"


def use_model_cache(task: PipelineTask, cfg: HetLoRAConfig) -> PipelineTask:
    """Mount ``kubeflow.model_cache_pvc`` as the task's Hugging Face hub cache (model tasks only).
    Security: the tasks stay offline (the images set HF_HUB_OFFLINE=1) and get no hub token: only
    whatever filled the volume needs HF_TOKEN. Make the claim ReadOnlyMany where the storage allows."""
    if cfg.kubeflow.model_cache_pvc:
        # The claim is an HF_HOME (what `hf download` fills with HF_HOME on it): its hub/ folder is the cache.
        kubernetes.mount_pvc(task, pvc_name=cfg.kubeflow.model_cache_pvc, mount_path=HF_HUB_CACHE_PATH, sub_path="hub")
    return task


def share_cpus(task: PipelineTask, concurrent_tasks: int | None) -> PipelineTask:
    """Tell a model task how many tasks share its machine (kfp.local runs two at once); it then
    gives torch floor(CPUs / that) threads (hetlora_core.threads). Nothing is set for the cluster."""
    if concurrent_tasks:
        task.set_env_variable(CONCURRENT_TASKS_ENV, str(concurrent_tasks))
    return task


def harden(task: PipelineTask, timeout_s: int | None = None) -> PipelineTask:
    """Non-root, writable caches under /tmp, optional timeout; no caching (tasks write the store)."""
    kubernetes.set_security_context(task, run_as_user=NON_ROOT_UID, run_as_group=NON_ROOT_UID, run_as_non_root=True)
    kubernetes.empty_dir_mount(task, volume_name="tmp", mount_path="/tmp")
    if timeout_s:
        kubernetes.set_timeout(task, timeout_s)
    task.set_caching_options(False)
    return task


def set_small_resources(task: PipelineTask) -> PipelineTask:
    """Model-free steps (pruning, aggregation of adapters): a fraction of a core."""
    return task.set_cpu_request("250m").set_cpu_limit("1").set_memory_request("512Mi").set_memory_limit("2Gi")


def placement_tier(cfg: HetLoRAConfig, tier_name: str, rank: int) -> TierConfig:
    """The configured tier a client runs on: its own tier, or (explicit/uniform rank assignment)
    the smallest tier whose rank covers the client's rank, else the largest tier."""
    tiers = sorted(cfg.ranks.tiers, key=lambda t: t.rank)
    for t in tiers:
        if t.name == tier_name:
            return t
    return next((t for t in tiers if t.rank >= rank), tiers[-1])
