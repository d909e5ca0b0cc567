"""Compile the round pipeline and assert on its PipelineSpec and Kubernetes platform spec
(the way kfp-kubernetes tests itself): per tier node selector, tolerations and resources; the
store Secret as env vars on every task; no credential value anywhere in the YAML."""

from __future__ import annotations

import json

import pytest
import yaml
from hetlora_kfp.pipelines.round import build_evaluate_pipeline, compile_evaluate, compile_round, tier_groups
from kfp import compiler

from hetlora_core import store as st
from hetlora_core.config import config_from_dict
from hetlora_core.config_load import replace
from hetlora_core.steps.plan import ClientPlan, RoundPlan

TIERS = [
    {"name": "small", "rank": 2, "node_selector": {"hetlora.io/tier": "small"},
     "tolerations": [{"key": "hetlora.io/tier", "operator": "Equal", "value": "small", "effect": "NoSchedule"}],
     "cpu_request": "500m", "cpu_limit": "1", "memory_request": "1Gi", "memory_limit": "2Gi"},
    {"name": "medium", "rank": 4, "node_selector": {"hetlora.io/tier": "medium"},
     "tolerations": [{"key": "hetlora.io/tier", "operator": "Equal", "value": "medium", "effect": "NoSchedule"}],
     "cpu_request": "1", "cpu_limit": "2", "memory_request": "2Gi", "memory_limit": "3Gi"},
    {"name": "large", "rank": 8, "node_selector": {"hetlora.io/tier": "large", "cloud.example/pool": "gpu"},
     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
     "cpu_request": "2", "cpu_limit": "4", "memory_request": "4Gi", "memory_limit": "6Gi", "gpu": 1},
]


def make_cfg(**store):
    return config_from_dict({
        "experiment": "compile-test", "model": {"name": "tiny"}, "data": {"num_clients": 6},
        "ranks": {"r_min": 2, "r_max": 8, "tiers": TIERS},
        "store": {"kind": "s3", "endpoint": "minio.hetlora:9000", **store},
        "kubeflow": {"store_secret": "my-store-secret", "image": "registry.example/hetlora:9.9",
                     "cuda_image": "registry.example/hetlora-cuda:9.9"},
    })


def make_plan(tiers=("small", "small", "medium", "large")):
    ranks = {t["name"]: t["rank"] for t in TIERS}
    clients = [ClientPlan(f"c{i}", t, ranks[t]) for i, t in enumerate(tiers)]
    return RoundPlan("compile-test", 3, clients, {c.client_id: {"rank": c.rank, "tier": c.tier} for c in clients})


@pytest.fixture
def compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", "AKIA-super-secret-access")
    monkeypatch.setenv("HETLORA_S3_SECRET_KEY", "very-secret-key-value-123")
    path = tmp_path / "round.yaml"
    compile_round(make_cfg(), make_plan(), str(path))
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def executors_for(spec: dict, tier: str) -> list[str]:
    """Executors of the train tasks whose display name names ``tier``."""
    out = []

    def walk(dag):
        for task in dag.get("tasks", {}).values():
            name = task.get("taskInfo", {}).get("name", "")
            comp = task["componentRef"]["name"]
            if name == f"train-{tier}":
                out.append(spec["components"][comp]["executorLabel"])
            if "dag" in spec["components"].get(comp, {}):
                walk(spec["components"][comp]["dag"])

    walk(spec["root"]["dag"])
    return out


@pytest.mark.parametrize("tier", TIERS, ids=[t["name"] for t in TIERS])
def test_each_tier_has_its_placement_and_resources(compiled, tier):
    _, spec, k8s = compiled
    (exe,) = executors_for(spec, tier["name"])
    res = spec["deploymentSpec"]["executors"][exe]["container"]["resources"]
    assert res["resourceCpuRequest"] == tier["cpu_request"] and res["resourceCpuLimit"] == tier["cpu_limit"]
    assert res["resourceMemoryRequest"] == tier["memory_request"] and res["resourceMemoryLimit"] == tier["memory_limit"]
    if tier.get("gpu"):
        assert res["accelerator"]["resourceCount"] == str(tier["gpu"])
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    else:
        assert "accelerator" not in res
    plat = k8s[exe]
    assert plat["nodeSelector"]["labels"] == tier["node_selector"]
    tol = tier["tolerations"][0]
    assert plat["tolerations"] == [{k: v for k, v in tol.items()}]
    assert plat["activeDeadlineSeconds"] == "4200"  # client_timeout_s + grace
    # GPU tiers default to the CUDA image (the CPU image's torch cannot use the GPU the pod requests)
    want = "registry.example/hetlora-cuda:9.9" if tier.get("gpu") else "registry.example/hetlora:9.9"
    assert spec["deploymentSpec"]["executors"][exe]["container"]["image"] == want


def _evaluate_spec(cfg, tmp_path, rnd: int = 3) -> tuple[dict, dict]:
    """(IR, kubernetes executors) of the evaluate pipeline the driver runs after round ``rnd``."""
    path = tmp_path / f"evaluate-{rnd}.yaml"
    compile_evaluate(cfg, rnd, str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _task_executor(spec: dict, display: str) -> str:
    """The executor of the (top-level) task named ``display``."""
    (task,) = [t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == display]
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def test_tier_image_override_and_gpu_evaluate_on_the_cuda_image(tmp_path):
    """A tier's own image wins; the model-free tasks stay on the CPU image; evaluation (the largest
    tier's resources: here a GPU) runs on the CUDA image, on the GPU pool, requesting the GPU."""
    tiers = [dict(TIERS[0], image="registry.example/custom-small:1"), *TIERS[1:]]
    cfg = config_from_dict({**make_cfg().to_dict(), "ranks": {"r_min": 2, "r_max": 8, "tiers": tiers}})
    path = tmp_path / "r.yaml"
    compile_round(cfg, make_plan(), str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    exe = spec["deploymentSpec"]["executors"]
    image = {t["name"]: exe[executors_for(spec, t["name"])[0]]["container"]["image"] for t in TIERS}
    assert image == {"small": "registry.example/custom-small:1", "medium": "registry.example/hetlora:9.9",
                     "large": "registry.example/hetlora-cuda:9.9"}
    assert exe[_task_executor(spec, "aggregate")]["container"]["image"] == "registry.example/hetlora:9.9"
    espec, ek8s = _evaluate_spec(cfg, tmp_path)
    ev, eexe = _task_executor(espec, "evaluate"), espec["deploymentSpec"]["executors"]
    assert eexe[ev]["container"]["image"] == "registry.example/hetlora-cuda:9.9"
    acc = eexe[ev]["container"]["resources"]["accelerator"]
    assert (acc["resourceCount"], acc["resourceType"]) == ("1", "nvidia.com/gpu")
    assert ek8s[ev]["nodeSelector"]["labels"] == TIERS[2]["node_selector"]
    # three distinct images -> three train component definitions
    assert len({executors_for(spec, t["name"])[0] for t in TIERS}) == 3


def test_cpu_only_tiers_use_one_image_and_leave_evaluate_unplaced(tmp_path):
    tiers = [dict(t, gpu=0) for t in TIERS]
    cfg = config_from_dict({**make_cfg().to_dict(), "ranks": {"r_min": 2, "r_max": 8, "tiers": tiers}})
    path = tmp_path / "r.yaml"
    compile_round(cfg, make_plan(), str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/hetlora:9.9"}
    espec, ek8s = _evaluate_spec(cfg, tmp_path)
    ev = _task_executor(espec, "evaluate")
    assert espec["deploymentSpec"]["executors"][ev]["container"]["image"] == "registry.example/hetlora:9.9"
    assert "nodeSelector" not in ek8s[ev]
    assert "accelerator" not in espec["deploymentSpec"]["executors"][ev]["container"]["resources"]


def test_secret_as_env_on_every_task_and_no_credentials_in_yaml(compiled):
    text, spec, k8s = compiled
    assert set(k8s) == set(spec["deploymentSpec"]["executors"])  # every executor has platform config
    for plat in k8s.values():
        (sec,) = plat["secretAsEnv"]
        assert sec["secretName"] == "my-store-secret"
        assert {e["envVar"] for e in sec["keyToEnv"]} == {"HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY"}
        assert plat["securityContext"]["runAsNonRoot"] is True
    assert "AKIA-super-secret-access" not in text and "very-secret-key-value-123" not in text


def test_empty_tiers_are_left_out_and_aggregate_follows_the_client_loop(tmp_path):
    path = tmp_path / "r.yaml"
    compile_round(make_cfg(), make_plan(("large", "large")), str(path))
    spec, _ = yaml.safe_load_all(path.read_text())
    assert executors_for(spec, "large") and not executors_for(spec, "small") and not executors_for(spec, "medium")
    agg = spec["root"]["dag"]["tasks"]["aggregate-round"]
    (group,) = agg["dependentTasks"]
    loops = spec["components"][spec["root"]["dag"]["tasks"][group]["componentRef"]["name"]]["dag"]["tasks"]
    assert len(loops) == 1 and all("parameterIterator" in t for t in loops.values())


def _all_tasks(spec: dict) -> list[tuple[dict, dict]]:
    """(task, the DAG's tasks it sits in) for every task of every DAG of the pipeline."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return [(t, d["tasks"]) for d in dags for t in d["tasks"].values()]


@pytest.mark.parametrize("build", ["round", "evaluate"])
def test_dag_uses_only_what_kubeflows_argo_compiler_runs(build, tmp_path):
    """Aggregation must run after failed client tasks. Kubeflow's Argo compiler (KFP 2.15-2.17,
    backend/src/v2/compiler/argocompiler/dag.go) makes a task with triggerPolicy
    ALL_UPSTREAM_TASKS_COMPLETED an exit hook of each task it depends on and never attaches one to a
    ParallelFor (iteratorTask), so such a task may depend only on one plain sub-DAG (an ExitHandler's
    group), and nothing may depend on it (it is not a task of the workflow's DAG)."""
    cfg, plan = make_cfg(), make_plan()
    path = tmp_path / "p.yaml"
    compile_round(cfg, plan, str(path)) if build == "round" else compile_evaluate(cfg, 3, str(path))
    spec, _ = yaml.safe_load_all(path.read_text())
    tasks = _all_tasks(spec)
    hooks = {name for t, dag in tasks for name, tt in dag.items()
             if tt is t and t.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"}
    for t, dag in tasks:
        assert not set(t.get("dependentTasks", [])) & hooks, "a task depends on an exit task"
        if t.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED":
            (dep,) = t["dependentTasks"]
            assert "parameterIterator" not in dag[dep] and "dag" in spec["components"][dag[dep]["componentRef"]["name"]]
    assert bool(hooks) == (build == "round"), "the round's aggregation is its one exit task"


def test_pipeline_defaults_embed_the_config_and_round():
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        compile_round(make_cfg(), make_plan(), f.name)
        spec, _ = yaml.safe_load_all(open(f.name).read())
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["round_index"]["defaultValue"] == 3
    assert json.loads(params["config_json"]["defaultValue"])["experiment"] == "compile-test"
    assert "defaultPipelineRoot" not in spec  # KFP's own default root, which exists wherever KFP does
    with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        compile_round(replace(make_cfg(), **{"kubeflow.pipeline_root": "minio://mlpipeline/hetlora"}), make_plan(), f.name)
        spec, _ = yaml.safe_load_all(open(f.name).read())
    assert spec["defaultPipelineRoot"] == "minio://mlpipeline/hetlora"


def test_tier_groups_place_explicit_ranks_on_covering_tier():
    cfg = make_cfg()
    plan = RoundPlan("x", 0, [ClientPlan("a", "rank-3", 3), ClientPlan("b", "rank-8", 8), ClientPlan("c", "small", 2)], {})
    groups = {t.name: ids for t, ids in tier_groups(cfg, plan)}
    assert groups == {"small": ["c"], "medium": ["a"], "large": ["b"]}


def test_model_cache_pvc_is_mounted_on_the_model_tasks_only(tmp_path):
    """kubeflow.model_cache_pvc: the Hugging Face cache volume behind a hub-id model.name goes to
    train and evaluate (which load the model), not to prune and aggregate (model-free)."""
    from hetlora_kfp.pipelines.platform import HF_HUB_CACHE_PATH

    from hetlora_core.config import replace

    path = tmp_path / "r.yaml"
    compile_round(replace(make_cfg(), **{"kubeflow.model_cache_pvc": "hf-cache"}), make_plan(), str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {ex for ex, plat in k8s.items()
               if any(m.get("constant") == "hf-cache" and m["mountPath"] == HF_HUB_CACHE_PATH and m.get("subPath") == "hub"
                      for m in plat.get("pvcMount", []))}
    model_tasks = {ex for ex in k8s if "train" in ex or "evaluate" in ex}
    assert model_tasks and mounted == model_tasks, (mounted, sorted(k8s))
    with pytest.raises(ValueError, match="kubeflow.model_cache_pvc"):
        replace(make_cfg(), **{"kubeflow.model_cache_pvc": "Bad_Name"})


def test_compile_rejects_a_target_module_the_model_lacks(tmp_path):
    from click.testing import CliRunner
    from hetlora_kfp.pipelines.cli import main

    out = tmp_path / "r.yaml"
    res = CliRunner().invoke(main, ["compile", "--set", "model.name=tiny", "--set", "model.target_modules=[q_proj, qkv]",
                                    "--out", str(out)])
    assert res.exit_code != 0 and "model.target_modules: ['qkv'] not found" in res.output and "'o_proj'" in res.output
    assert not out.exists() and "Traceback" not in res.output


def _tasks_named(spec: dict, display: str) -> list[tuple[dict, str]]:
    """(task, executor) of every task, at any depth, whose display name is ``display``."""
    out = []

    def walk(dag):
        for task in dag.get("tasks", {}).values():
            comp = task["componentRef"]["name"]
            if task.get("taskInfo", {}).get("name") == display:
                out.append((task, spec["components"][comp]["executorLabel"]))
            if "dag" in spec["components"].get(comp, {}):
                walk(spec["components"][comp]["dag"])

    walk(spec["root"]["dag"])
    return out


def _folder_cfg(tmp_path):
    (tmp_path / "data").mkdir(exist_ok=True)
    return config_from_dict({**make_cfg().to_dict(), "data": {"source": "folder", "path": str(tmp_path / "data")}})


def test_folder_data_evaluates_every_client_in_its_own_tier_task(tmp_path):
    """Federated evaluation: one evaluate-client loop per tier over ALL the run's clients (here only
    large clients train this round, yet every tier evaluates), each on its tier's pool and image;
    the evaluate task is model-free and fans the loops in. Shakespeare keeps one central task."""
    state = {f"c{i}": {"rank": r, "tier": t} for i, (t, r) in enumerate([("small", 2), ("small", 2), ("medium", 4), ("large", 8)])}
    plan = RoundPlan("compile-test", 3, [ClientPlan("c3", "large", 8)], state)
    cfg = _folder_cfg(tmp_path)
    # The round pipeline trains and aggregates only: evaluation is the pipeline the driver runs next.
    compile_round(cfg, plan, str(tmp_path / "round.yaml"))
    round_spec, _ = yaml.safe_load_all((tmp_path / "round.yaml").read_text())
    assert not [t for t, _ in _all_tasks(round_spec) if "evaluate" in t["taskInfo"]["name"]]
    for build in ("stored plan", "given state"):
        path = tmp_path / f"{build}.yaml"
        if build == "stored plan":  # as the runner compiles it for Kubeflow: the state from the round's stored plan
            local = config_from_dict({**cfg.to_dict(), "store": {"kind": "local", "root": str(tmp_path / "store")}})
            st.open_store(local.store).put_bytes(st.plan_key(cfg.experiment, 3), json.dumps(plan.to_dict()).encode())
            compile_evaluate(local, 3, str(path))
        else:  # as kfp.local's runner builds it
            compiler.Compiler().compile(build_evaluate_pipeline(cfg, 3, state=state), package_path=str(path))
        spec, platform = yaml.safe_load_all(path.read_text())
        exe = spec["deploymentSpec"]["executors"]
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for t in TIERS:
            ((task, ex),) = _tasks_named(spec, f"evaluate-{t['name']}")
            assert task["componentRef"]["name"].startswith("comp-evaluate-client")
            assert k8s[ex]["nodeSelector"]["labels"] == t["node_selector"]
            want = "registry.example/hetlora-cuda:9.9" if t.get("gpu") else "registry.example/hetlora:9.9"
            assert exe[ex]["container"]["image"] == want
            assert exe[ex]["container"]["resources"]["resourceCpuLimit"] == t["cpu_limit"]
        ev = spec["root"]["dag"]["tasks"]["evaluate-round"]
        assert {f"evals_{i}" for i in range(3)} <= set(ev["inputs"]["parameters"]) and "evals_3" not in ev["inputs"]["parameters"]
        assert "accelerator" not in exe[_task_executor(spec, "evaluate")]["container"]["resources"]  # it combines sums only
        assert exe[_task_executor(spec, "evaluate")]["container"]["image"] == "registry.example/hetlora:9.9"  # never CUDA's
    # Shakespeare: no evaluate-client task at all
    spec, _ = _evaluate_spec(make_cfg(), tmp_path)
    assert "evaluate-client" not in json.dumps(spec) and len(_tasks_named(spec, "evaluate")) == 1


def _secrets_of(k8s: dict, ex: str) -> dict[str, set[str]]:
    return {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in k8s[ex].get("secretAsEnv", [])}


def test_client_tasks_get_the_client_role_and_never_the_server_key(tmp_path):
    """Issue 13: client tasks (train, prune, evaluate-client) mount the client role's Secret and
    never the server key (its variable is set empty: kfp.local tasks inherit the driver's); server
    tasks (aggregate, evaluate) mount the server role's Secret and the server key's."""
    from hetlora_core.config import replace

    state = {f"c{i}": {"rank": r, "tier": t} for i, (t, r) in enumerate([("small", 2), ("small", 2), ("medium", 4), ("large", 8)])}
    plan = RoundPlan("compile-test", 3, [ClientPlan(c, s["tier"], s["rank"]) for c, s in state.items()], state)
    cfg = replace(_folder_cfg(tmp_path), **{"kubeflow.client_store_secret": "my-client-secret",
                                           "kubeflow.server_key_secret": "my-server-key"})
    path = tmp_path / "roles.yaml"
    compile_round(cfg, plan, str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    compiler.Compiler().compile(build_evaluate_pipeline(cfg, 3, state=state), package_path=str(tmp_path / "eroles.yaml"))
    espec, eplatform = yaml.safe_load_all((tmp_path / "eroles.yaml").read_text())
    for sp, pl, client_names, server_names in ((spec, platform, ("train", "prune"), ("aggregate",)),
                                               (espec, eplatform, ("evaluate",), ("evaluate",))):
        k8s = pl["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        exe = sp["deploymentSpec"]["executors"]
        client = {ex for name in client_names for t in TIERS for _, ex in _tasks_named(sp, f"{name}-{t['name']}")}
        server = {_task_executor(sp, name) for name in server_names}
        assert len(client) >= 3 and client | server == set(k8s) and not client & server
        for ex in client:
            assert _secrets_of(k8s, ex) == {"my-client-secret": {"HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY"}}, ex
            env = {e["name"]: e.get("value", "") for e in exe[ex]["container"].get("env", [])}
            assert env["HETLORA_SERVER_KEY"] == "", ex  # withheld, also under kfp.local
        for ex in server:
            assert _secrets_of(k8s, ex) == {"my-store-secret": {"HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY"},
                                      "my-server-key": {"HETLORA_SERVER_KEY"}}, ex
    # Old configs (no client secret, no server key secret): one Secret everywhere, as before.
    compile_round(_folder_cfg(tmp_path), plan, str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    assert {s["secretName"] for p in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
            for s in p["secretAsEnv"]} == {"my-store-secret"}
