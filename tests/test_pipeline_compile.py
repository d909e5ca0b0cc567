"""Compile the round pipeline and assert on its PipelineSpec and Kubernetes platform spec
(the way kfp-kubernetes tests itself): per tier node selector, tolerations and resources; the
store Secret as env vars on every task; no credential value anywhere in the YAML."""

from __future__ import annotations

import json

import pytest
import yaml
from hetlora_kfp.pipelines.round import compile_round, tier_groups

from hetlora_core.config import config_from_dict
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
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    image = {t["name"]: exe[executors_for(spec, t["name"])[0]]["container"]["image"] for t in TIERS}
    assert image == {"small": "registry.example/custom-small:1", "medium": "registry.example/hetlora:9.9",
                     "large": "registry.example/hetlora-cuda:9.9"}
    ev = _task_executor(spec, "evaluate")
    assert exe[ev]["container"]["image"] == "registry.example/hetlora-cuda:9.9"
    acc = exe[ev]["container"]["resources"]["accelerator"]
    assert (acc["resourceCount"], acc["resourceType"]) == ("1", "nvidia.com/gpu")
    assert k8s[ev]["nodeSelector"]["labels"] == TIERS[2]["node_selector"]
    assert exe[_task_executor(spec, "aggregate")]["container"]["image"] == "registry.example/hetlora:9.9"
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
    ev = _task_executor(spec, "evaluate")
    assert "nodeSelector" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][ev]
    assert "accelerator" not in spec["deploymentSpec"]["executors"][ev]["container"]["resources"]


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
    assert [t for t in agg["dependentTasks"] if t.startswith("for-loop")] == agg["dependentTasks"] and len(agg["dependentTasks"]) == 1


def test_pipeline_defaults_embed_the_config_and_round():
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        compile_round(make_cfg(), make_plan(), f.name)
        spec, _ = yaml.safe_load_all(open(f.name).read())
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["round_index"]["defaultValue"] == 3
    assert json.loads(params["config_json"]["defaultValue"])["experiment"] == "compile-test"
    assert spec["defaultPipelineRoot"] == "minio://hetlora/pipeline-root"


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
    from hetlora_kfp.pipelines.round import build_evaluate_pipeline
    from kfp import compiler

    state = {f"c{i}": {"rank": r, "tier": t} for i, (t, r) in enumerate([("small", 2), ("small", 2), ("medium", 4), ("large", 8)])}
    plan = RoundPlan("compile-test", 3, [ClientPlan("c3", "large", 8)], state)
    cfg = _folder_cfg(tmp_path)
    for build in ("round", "evaluate"):
        path = tmp_path / f"{build}.yaml"
        if build == "round":
            compile_round(cfg, plan, str(path))
        else:  # the evaluate-only pipeline (the runner passes the stored plan's state)
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
    path = tmp_path / "shakespeare.yaml"
    compile_round(make_cfg(), plan, str(path))
    spec, _ = yaml.safe_load_all(path.read_text())
    assert "evaluate-client" not in path.read_text() and len(_tasks_named(spec, "evaluate")) == 1



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
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    exe = spec["deploymentSpec"]["executors"]

    def secrets_of(ex: str) -> dict[str, set[str]]:
        return {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in k8s[ex].get("secretAsEnv", [])}

    client = {ex for name in ("train", "prune", "evaluate") for t in TIERS for _, ex in _tasks_named(spec, f"{name}-{t['name']}")}
    server = {_task_executor(spec, "aggregate"), _task_executor(spec, "evaluate")}
    assert len(client) >= 6 and client | server == set(k8s) and not client & server
    for ex in client:
        assert secrets_of(ex) == {"my-client-secret": {"HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY"}}, ex
        env = {e["name"]: e.get("value", "") for e in exe[ex]["container"].get("env", [])}
        assert env["HETLORA_SERVER_KEY"] == "", ex  # withheld, also under kfp.local
    for ex in server:
        assert secrets_of(ex) == {"my-store-secret": {"HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY"},
                                  "my-server-key": {"HETLORA_SERVER_KEY"}}, ex
    # Old configs (no client secret, no server key secret): one Secret everywhere, as before.
    compile_round(_folder_cfg(tmp_path), plan, str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    assert {s["secretName"] for p in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
            for s in p["secretAsEnv"]} == {"my-store-secret"}
