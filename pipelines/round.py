"""The round DAG: per non-empty rank tier a ParallelFor of (train -> self-prune) on that tier's
node pool, all inside one exit handler whose exit task is aggregation (it runs once every client
task has finished, failed or not: a hard client failure is a dropped client, the quorum decides).
Evaluation is a second pipeline the driver runs after each committed round. Folder data is evaluated
federated: per tier a ParallelFor of evaluate-client over ALL the run's clients of that tier (each
on its own data, on its tier's node pool), fanned in to the evaluate task that combines their sums.

The DAG is built per round from the driver's plan, so tiers with no selected client are simply
absent (a ParallelFor over an empty list fails under kfp.local) and each tier's resources are
static per executor, the most robust form across KFP backends."""

# No `from __future__ import annotations` here: KFP reads the pipeline function's annotations as types.

from collections.abc import Callable  # noqa: I001
from typing import Any

from kfp import compiler, dsl

from hetlora_core.config import ConfigError, HetLoRAConfig, TierConfig, image_for
from hetlora_core import store as st
from hetlora_core.steps.plan import ClientPlan, RoundPlan, load_plan
from hetlora_kfp.components import MAX_TIERS, Components, build

from . import platform

PIPELINE_NAME = "hetlora-round"
EVALUATE_PIPELINE_NAME = "hetlora-evaluate"
# The client enforces federation.client_timeout_s itself (a soft failure: the round goes on);
# the pod's activeDeadlineSeconds is a hard backstop a little later (start-up, uploads).
HARD_TIMEOUT_GRACE_S = 600
# KFP-level retries (num_retries, backoff): client tasks for preemption (a re-run overwrites the
# same keys), aggregation for a store outage past its own retry deadline.
CLIENT_RETRIES: tuple[int, str] = (2, "30s")
AGGREGATE_RETRIES: tuple[int, str] = (2, "10s")


def on_client_pool(task: Any, name: str, tier: TierConfig, cfg: HetLoRAConfig, concurrent_tasks: int | None) -> None:
    """The settings every client-side task (train, evaluate-client) gets: its tier's resources and
    node pool, the store Secret and model cache, the hardened pod with the client's hard timeout,
    and retries (preemption; a re-run overwrites the same keys)."""
    task.set_display_name(name)
    platform.set_tier_resources(task, tier)
    platform.place_on_tier(task, tier)
    platform.use_store_secret(task, cfg, "client")  # the client role; never the server key
    platform.withhold_server_key(task, cfg)
    platform.use_model_cache(task, cfg)
    platform.harden(task, cfg.federation.client_timeout_s + HARD_TIMEOUT_GRACE_S)
    task.set_retry(num_retries=CLIENT_RETRIES[0], backoff_duration=CLIENT_RETRIES[1])
    platform.share_cpus(task, concurrent_tasks)


def loop_share(concurrent_tasks: int | None, clients_in_loop: int) -> int | None:
    """How many tasks of one tier's loop run at once on the local machine. kfp.local runs the tiers'
    loops one after another and at most ``concurrent_tasks`` iterations of a loop at once, so a loop
    of one client runs alone and its task gets every CPU (sharing them made a lone train task of the
    default config take 1.8x as long on 2 cores); None (the cluster) stays None. An odd number of
    clients leaves the loop's last task alone on its share (a known, small loss: the env is per task
    of the loop, not per iteration). tests/test_threads.py checks kfp.local's cap of two."""
    return None if concurrent_tasks is None else max(1, min(concurrent_tasks, clients_in_loop))


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


def eval_groups(cfg: HetLoRAConfig, state: dict[str, dict[str, Any]]) -> list[tuple[Any, list[str]]]:
    """(TierConfig, client ids) of EVERY client of the run (``state``: each client's tier and rank
    at the round's start, ``RoundPlan.state``) for federated evaluation, non-empty tiers only."""
    everyone = [ClientPlan(c, str(s["tier"]), int(s["rank"])) for c, s in sorted(state.items())]
    return tier_groups(cfg, RoundPlan(cfg.experiment, 0, everyone, state))


def add_client_evals(cfg: HetLoRAConfig, comps_for: Callable[[TierConfig | None], Components], state: dict[str, dict[str, Any]],
                     config_json: Any, round_index: Any, concurrent_tasks: int | None = None) -> dict[str, Any]:
    """Folder data: per tier a ParallelFor of evaluate-client over all of that tier's clients (each
    reads only its own data), placed like the tier's train tasks; returns the evaluate task's
    ``evals_<i>`` inputs (``dsl.Collected`` statuses: they order evaluate after every client).
    Shakespeare: none (its evaluation stays central)."""
    if cfg.data.source != "folder":
        return {}
    collected = {}
    for i, (tier, ids) in enumerate(eval_groups(cfg, state)):
        with dsl.ParallelFor(ids, parallelism=max(1, len(ids))) as client_id:
            evc = comps_for(tier).evaluate_client(config_json=config_json, round_index=round_index, client_id=client_id)
            on_client_pool(evc, f"evaluate-{tier.name}", tier, cfg, loop_share(concurrent_tasks, len(ids)))  # a re-run overwrites the same report key
        collected[f"evals_{i}"] = dsl.Collected(evc.output)
    return collected


def add_evaluate(cfg: HetLoRAConfig, comps_for: Callable[[TierConfig | None], Components], evals: dict[str, Any],
                 concurrent_tasks: int | None = None, **params: Any) -> Any:
    """The evaluate task. Shakespeare: it runs the model at r_max on every client's data, with the
    largest tier's resources (and its GPU pool). Folder data: it only combines the clients' sums
    (``evals``), model-free, so it gets small resources and no model cache."""
    largest = max(cfg.ranks.tiers, key=lambda t: t.rank)
    # Folder data: the model-free combine runs on the default (CPU) image, never a GPU tier's CUDA one.
    ev = comps_for(None if evals else largest).evaluate(**params, **evals)
    ev.set_display_name("evaluate")
    platform.use_store_secret(ev, cfg)
    platform.use_server_key(ev, cfg)  # verifies the global, signs the metrics
    platform.harden(ev)
    if evals:
        platform.set_small_resources(ev)
        return ev
    platform.set_tier_resources(ev, largest)  # evaluation runs the model at r_max
    platform.place_on_gpu_tier(ev, largest)
    # Nothing else of the round runs beside it (it waits for aggregate, which waits for every client):
    # under kfp.local it takes every CPU instead of a share.
    platform.share_cpus(ev, 1 if concurrent_tasks else None)
    platform.use_model_cache(ev, cfg)
    return ev


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

    @dsl.pipeline(name=PIPELINE_NAME, description=f"HetLoRA round {plan.round} of {cfg.experiment}",
                  pipeline_root=cfg.kubeflow.pipeline_root or None)
    def round_pipeline(config_json: str = cfg.to_json(), round_index: int = plan.round):
        # A client is untrusted and may die hard (OOM, preemption) after its retries: that must drop
        # the client, not fail the round. So aggregation is the exit task of the group of client
        # loops: it runs once every client task has finished, whatever its outcome, and takes no data
        # from the loops (a failed loop has no Collected output, and the task reports were never
        # trusted anyway): it reads the uploads from the store, verifies them and checks
        # federation.quorum itself, so too many failed clients still fail the round, with the reason.
        # Why an exit handler and not ignore_upstream_failure after the loops: Kubeflow's Argo
        # compiler (backend/src/v2/compiler/argocompiler/dag.go, KFP 2.15-2.17) turns a task with
        # triggerPolicy ALL_UPSTREAM_TASKS_COMPLETED into an exit hook on each task it depends on,
        # and iteratorTask() never attaches it to a ParallelFor: aggregation would never run, and a
        # task after it would depend on a task absent from the workflow. An ExitHandler's group is a
        # plain sub-DAG, the case that compiler supports. Nothing may follow an exit task, so the
        # round's evaluation is a pipeline of its own (build_evaluate_pipeline), run by the driver.
        agg = default.aggregate(config_json=config_json, round_index=round_index)
        agg.set_display_name("aggregate")
        platform.set_small_resources(agg)
        platform.use_store_secret(agg, cfg)
        platform.use_server_key(agg, cfg)  # verifies the plan and the previous global, signs the commit
        platform.harden(agg)
        agg.set_retry(num_retries=AGGREGATE_RETRIES[0], backoff_duration=AGGREGATE_RETRIES[1])
        with dsl.ExitHandler(agg, name="clients"):
            for tier, ids in groups:
                with dsl.ParallelFor(ids, parallelism=max(1, len(ids))) as client_id:
                    train = comps_for(tier).train(config_json=config_json, round_index=round_index, client_id=client_id)
                    # a re-run (retry) overwrites the same keys
                    on_client_pool(train, f"train-{tier.name}", tier, cfg, loop_share(concurrent_tasks, len(ids)))
                    prune = default.prune(config_json=config_json, round_index=round_index, client_id=client_id).after(train)
                    prune.set_display_name(f"prune-{tier.name}")
                    platform.set_small_resources(prune)
                    platform.use_store_secret(prune, cfg, "client")
                    platform.withhold_server_key(prune, cfg)
                    platform.harden(prune)

    return round_pipeline


def build_evaluate_pipeline(cfg: HetLoRAConfig, rnd: int, comps: Components | None = None,
                            state: dict[str, dict[str, Any]] | None = None, concurrent_tasks: int | None = None) -> Callable[..., Any]:
    """A pipeline that evaluates committed round ``rnd`` (and records the baseline if it is
    missing): what the round runner submits after every committed round (the round pipeline ends
    with its aggregation, an exit task nothing may follow), and to catch up a round committed but
    never evaluated. ``round_started_at`` (0: unknown) makes the round's recorded duration. Folder
    data: every client's evaluate-client task first (``state``: each client's tier and rank at the
    round's start; read from the round's stored plan when not given). ``concurrent_tasks``: as in
    ``build_round_pipeline`` (kfp.local)."""
    if cfg.data.source == "folder" and state is None:
        state = load_plan(cfg, st.open_store(cfg.store), rnd).state

    @dsl.pipeline(name=EVALUATE_PIPELINE_NAME, description=f"HetLoRA: evaluate round {rnd} of {cfg.experiment}",
                  pipeline_root=cfg.kubeflow.pipeline_root or None)
    def evaluate_pipeline(config_json: str = cfg.to_json(), round_index: int = rnd, round_started_at: float = 0.0):
        comps_for = components_by_image(cfg, comps)
        evals = add_client_evals(cfg, comps_for, state or {}, config_json, round_index, concurrent_tasks=concurrent_tasks)
        add_evaluate(cfg, comps_for, evals, concurrent_tasks, config_json=config_json, round_index=round_index,
                     round_started_at=round_started_at)

    return evaluate_pipeline


def compile_round(cfg: HetLoRAConfig, plan: RoundPlan, out_path: str) -> str:
    """Compile the round pipeline to KFP IR YAML (PipelineSpec + platform spec)."""
    compiler.Compiler().compile(build_round_pipeline(cfg, plan), package_path=out_path)
    return out_path


def compile_evaluate(cfg: HetLoRAConfig, rnd: int, out_path: str) -> str:
    """Compile the evaluate-only pipeline of round ``rnd`` to KFP IR YAML."""
    compiler.Compiler().compile(build_evaluate_pipeline(cfg, rnd), package_path=out_path)
    return out_path
