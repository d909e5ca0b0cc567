"""The round DAG: per non-empty rank tier a ParallelFor of (train -> self-prune) on that tier's
node pool, fan-in with ``dsl.Collected`` into aggregation, then evaluation.

The DAG is built per round from the driver's plan, so tiers with no selected client are simply
absent (a ParallelFor over an empty list fails under kfp.local) and each tier's resources are
static per executor, the most robust form across KFP backends."""

# No `from __future__ import annotations` here: KFP reads the pipeline function's annotations as types.

from collections.abc import Callable  # noqa: I001
from typing import Any

from kfp import compiler, dsl

from hetlora_core.config import ConfigError, HetLoRAConfig, TierConfig, image_for
from hetlora_core.steps.plan import RoundPlan
from hetlora_kfp.components import MAX_TIERS, Components, build

from . import platform

PIPELINE_NAME = "hetlora-round"
EVALUATE_PIPELINE_NAME = "hetlora-evaluate"
# The client enforces federation.client_timeout_s itself (a soft failure: the round goes on);
# the pod's activeDeadlineSeconds is a hard backstop a little later (start-up, uploads).
HARD_TIMEOUT_GRACE_S = 600


def tier_groups(cfg: HetLoRAConfig, plan: RoundPlan) -> list[tuple[Any, list[str]]]:
    """(TierConfig, selected client ids) for every tier with at least one client, in tier order."""
    groups: dict[str, tuple[Any, list[str]]] = {}
    for c in plan.clients:
        tier = platform.placement_tier(cfg, c.tier, c.rank)
        groups.setdefault(tier.name, (tier, []))[1].append(c.client_id)
    order = {t.name: i for i, t in enumerate(cfg.ranks.tiers)}
    out = sorted(groups.values(), key=lambda g: order.get(g[0].name, 0))
    if len(out) > MAX_TIERS:
        raise ConfigError(f"config: ranks.tiers: a round pipeline supports at most {MAX_TIERS} tiers, got {len(out)}")
    return out


def components_by_image(cfg: HetLoRAConfig, comps: Components | None) -> Callable[[TierConfig | None], Components]:
    """The components for a tier's image (None: the default image). In KFP v2 the image belongs to
    the component definition, so each distinct image gets its own set (compiled as train-client,
    train-client-2, ...). An explicit ``comps`` is used for every tier (tests, custom images)."""
    made: dict[str, Components] = {}

    def get(tier: TierConfig | None) -> Components:
        if comps is not None:
            return comps
        image = image_for(tier, cfg.kubeflow) if tier is not None else cfg.kubeflow.image
        if image not in made:
            made[image] = build(image)
        return made[image]

    return get


def build_round_pipeline(cfg: HetLoRAConfig, plan: RoundPlan, comps: Components | None = None,
                         concurrent_tasks: int | None = None) -> Callable[..., Any]:
    """A ``@dsl.pipeline`` for round ``plan.round``; defaults embed the (credential-free) config.
    ``concurrent_tasks``: how many tasks one machine runs at once (kfp.local), so each model task
    sizes its torch threads to its share of the CPUs; None in the cluster (a pod's own quota counts)."""
    comps_for = components_by_image(cfg, comps)
    default = comps_for(None)
    groups = tier_groups(cfg, plan)
    largest = max(cfg.ranks.tiers, key=lambda t: t.rank)

    @dsl.pipeline(name=PIPELINE_NAME, description=f"HetLoRA round {plan.round} of {cfg.experiment}",
                  pipeline_root=cfg.kubeflow.pipeline_root)
    def round_pipeline(config_json: str = cfg.to_json(), round_index: int = plan.round, round_started_at: float = 0.0):
        collected = {}
        for i, (tier, ids) in enumerate(groups):
            with dsl.ParallelFor(ids, parallelism=max(1, len(ids))) as client_id:
                train = comps_for(tier).train(config_json=config_json, round_index=round_index, client_id=client_id)
                train.set_display_name(f"train-{tier.name}")
                platform.set_tier_resources(train, tier)
                platform.place_on_tier(train, tier)
                platform.use_store_secret(train, cfg)
                platform.use_model_cache(train, cfg)
                platform.harden(train, cfg.federation.client_timeout_s + HARD_TIMEOUT_GRACE_S)
                train.set_retry(num_retries=2, backoff_duration="30s")  # preemption: re-run overwrites the same keys
                platform.share_cpus(train, concurrent_tasks)
                prune = default.prune(config_json=config_json, round_index=round_index, client_id=client_id).after(train)
                prune.set_display_name(f"prune-{tier.name}")
                platform.set_small_resources(prune)
                platform.use_store_secret(prune, cfg)
                platform.harden(prune)
            collected[f"tier_{i}"] = dsl.Collected(prune.output)
        agg = default.aggregate(config_json=config_json, round_index=round_index, **collected)
        agg.set_display_name("aggregate")
        platform.set_small_resources(agg)
        platform.use_store_secret(agg, cfg)
        platform.harden(agg)
        agg.set_retry(num_retries=2, backoff_duration="10s")
        ev = comps_for(largest).evaluate(config_json=config_json, round_index=round_index,
                                         round_started_at=round_started_at).after(agg)
        ev.set_display_name("evaluate")
        platform.set_tier_resources(ev, largest)  # evaluation runs the model at r_max
        platform.place_on_gpu_tier(ev, largest)
        platform.share_cpus(ev, concurrent_tasks)
        platform.use_store_secret(ev, cfg)
        platform.use_model_cache(ev, cfg)
        platform.harden(ev)

    return round_pipeline


def build_evaluate_pipeline(cfg: HetLoRAConfig, rnd: int, comps: Components | None = None) -> Callable[..., Any]:
    """A one-task pipeline that evaluates committed round ``rnd`` (and records the baseline if it
    is missing): what the round runner submits when a round committed but was never evaluated."""
    largest = max(cfg.ranks.tiers, key=lambda t: t.rank)

    @dsl.pipeline(name=EVALUATE_PIPELINE_NAME, description=f"HetLoRA: evaluate round {rnd} of {cfg.experiment}",
                  pipeline_root=cfg.kubeflow.pipeline_root)
    def evaluate_pipeline(config_json: str = cfg.to_json(), round_index: int = rnd):
        ev = components_by_image(cfg, comps)(largest).evaluate(config_json=config_json, round_index=round_index)
        ev.set_display_name("evaluate")
        platform.set_tier_resources(ev, largest)
        platform.place_on_gpu_tier(ev, largest)
        platform.use_store_secret(ev, cfg)
        platform.use_model_cache(ev, cfg)
        platform.harden(ev)

    return evaluate_pipeline


def compile_round(cfg: HetLoRAConfig, plan: RoundPlan, out_path: str) -> str:
    """Compile the round pipeline to KFP IR YAML (PipelineSpec + platform spec)."""
    compiler.Compiler().compile(build_round_pipeline(cfg, plan), package_path=out_path)
    return out_path


def compile_evaluate(cfg: HetLoRAConfig, rnd: int, out_path: str) -> str:
    """Compile the evaluate-only pipeline of round ``rnd`` to KFP IR YAML."""
    compiler.Compiler().compile(build_evaluate_pipeline(cfg, rnd), package_path=out_path)
    return out_path
