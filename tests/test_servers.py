"""The lifecycle against real servers: Postgres, `prefect server start` and `mlflow server`
(tests/servers.py), checked through their REST APIs; plus the deployments of conf/deploy.

The fast tests at the top build deployments locally (no server). The `servers` tests share one
demo run on the servers (tests/conftest.py: demo_servers).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.servers import (REPO, VENV_BIN, MlflowServer, Postgres, PrefectServer, client_env,
                           llamaflow, port_open)

# -- deployments, built locally --------------------------------------------------------------------


def test_deploy_config_defaults():
    from pipelines.deploy import load_deploy_config, parameters

    cfg = load_deploy_config()
    d = cfg["deployments"]
    assert d["nightly-evaluate"]["cron"] == "0 2 * * *"
    assert parameters(d["nightly-evaluate"]) == {
        "overrides": ["stages=[evaluate]", "force=[evaluate]"], "from_stage": None}
    # as shipped every deployment starts from the demo recipe (runnable after `make demo`)
    assert parameters(d["nightly-evaluate"], cfg) == {
        "overrides": ["recipe=demo", "stages=[evaluate]", "force=[evaluate]"], "from_stage": None}
    assert parameters(d["weekly-retrain"], cfg) == {"overrides": ["recipe=demo"],
                                                    "from_stage": "pretrain"}
    assert cfg["pools"]["gpu"]["concurrency"] == 1 and cfg["task_concurrency"] == {"gpu": 1}
    # overrides use Hydra syntax, like the lifecycle's
    cfg = load_deploy_config(["pools.gpu.concurrency=3", "deployments.nightly-evaluate.cron=30 1 * * *"])
    assert cfg["pools"]["gpu"]["concurrency"] == 3
    assert cfg["deployments"]["nightly-evaluate"]["cron"] == "30 1 * * *"


def test_deploy_workspace_is_made_absolute_and_passed_with_the_tracking_uri(tmp_path, monkeypatch):
    """A process worker starts each flow run in a temporary directory it deletes afterwards:
    the workspace is resolved where `deploy` runs and goes to the runs as LLAMAFLOW_WORKDIR,
    with the deploying shell's MLFLOW_TRACKING_URI (never one holding a password)."""
    from pipelines.deploy import describe, load_deploy_config, run_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLAMAFLOW_WORKDIR", raising=False)
    monkeypatch.delenv("LLAMAFLOW_REMOTE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = load_deploy_config()
    assert run_env(cfg) == {"LLAMAFLOW_WORKDIR": str(tmp_path / "workspace"),
                            "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert f"workspace {tmp_path / 'workspace'}" in describe(cfg)
    monkeypatch.setenv("LLAMAFLOW_WORKDIR", "runs/ws")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret@mlflow.example")
    env = run_env(load_deploy_config())
    assert env == {"LLAMAFLOW_WORKDIR": str(tmp_path / "runs" / "ws")}
    assert "secret" not in describe(load_deploy_config())
    cfg = load_deploy_config(["workdir=/data/llamaflow",
                              'base_overrides=["recipe=stories260k"]'])
    assert run_env(cfg)["LLAMAFLOW_WORKDIR"] == "/data/llamaflow"
    assert cfg["base_overrides"] == ["recipe=stories260k"]


@pytest.mark.parametrize("uri", [
    "https://mlflow.example/?token=s3cr3t",        # a token in the query string
    "https://mlflow.example/#s3cr3t",
    "postgresql://mlflow:s3cr3t@db.example/mlflow",
])
def test_deploy_never_copies_or_prints_a_uri_with_credentials(uri, tmp_path, monkeypatch):
    from pipelines.deploy import describe, load_deploy_config, run_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LLAMAFLOW_REMOTE", uri.replace("mlflow", "bucket"))
    monkeypatch.setenv("PREFECT_API_URL", "https://user:s3cr3t@prefect.example/api?key=s3cr3t")
    cfg = load_deploy_config()
    assert set(run_env(cfg)) == {"LLAMAFLOW_WORKDIR"}
    for text in (describe(cfg), describe(cfg, for_work_pools=True)):
        assert "s3cr3t" not in text
        assert "Prefect https://prefect.example/api;" in text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000/")
    assert run_env(load_deploy_config())["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000/"


@pytest.mark.parametrize("override, where", [
    ('base_overrides=["recipe=demo","source.url=https://dl.example/llama/*?Signature=s3cr3t"]',
     "base_overrides[1]"),
    ('deployments.lifecycle.overrides=["tracking.tracking_uri=https://u:s3cr3t@mlflow.example"]',
     "deployments.lifecycle.overrides[0]"),
])
def test_deploy_refuses_a_signed_url_in_the_deployments_parameters(override, where, capsys,
                                                                   monkeypatch, tmp_path):
    """Overrides are stored on the Prefect server as the deployments' parameters: a presigned
    URL or a password there is refused, redacted, with the fix (the worker's environment and
    source.url_env), before anything starts."""
    from pipelines.cli import main
    from pipelines.deploy import load_deploy_config

    with pytest.raises(ValueError, match=re.escape(where)) as e:
        load_deploy_config([override])
    assert "s3cr3t" not in str(e.value) and "url_env" in str(e.value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy", "--overrides", override]) == 2
    err = capsys.readouterr().err
    assert where in err and "s3cr3t" not in err and "source.url_env=LLAMAFLOW_SOURCE_URL" in err
    assert list(tmp_path.iterdir()) == []   # refused before any workspace or Prefect server
    # the same URL without its signature is an ordinary override
    plain = 'base_overrides=["recipe=demo","source.url=https://dl.example/llama/*"]'
    assert load_deploy_config([plain])["base_overrides"][1] == "source.url=https://dl.example/llama/*"


K8S_GPU = ["pools.gpu.type=kubernetes",
           "pools.gpu.base_job_template=${repo:infra/k8s/gpu-base-job-template.json}"]


def test_a_kubernetes_pool_keeps_its_templates_workspace(tmp_path, monkeypatch):
    """A deployment's job variables `env` replaces the whole env of a kubernetes template: the
    deploying machine's workspace (and tracking URI) go only to process pools; a kubernetes
    pool keeps the template's /workspace volume and in-cluster MLflow unless workdir is set
    explicitly, and then gets that path as given, merged into the template's defaults."""
    from pipelines.deploy import (deployments, describe, load_deploy_config, runs_here,
                                  template_env, workdir_given)

    laptop = tmp_path / "laptop-ws"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAMAFLOW_WORKDIR", str(laptop))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = load_deploy_config(K8S_GPU)
    assert not workdir_given(K8S_GPU)
    made = {d.name: d for d in deployments(cfg, for_work_pools=True)}
    assert made["nightly-evaluate"].job_variables == {}   # the template's env stays whole
    assert made["requantize"].job_variables == {"env": {
        "LLAMAFLOW_WORKDIR": str(laptop), "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}}
    text = describe(cfg, for_work_pools=True)
    assert "pool gpu (kubernetes) flow runs use its job template's environment: " \
        "LLAMAFLOW_WORKDIR=/workspace" in text
    assert f"flow runs use workspace {laptop} (LLAMAFLOW_WORKDIR)" in text   # the cpu pool
    assert runs_here(cfg) and not runs_here(cfg, ["nightly-evaluate", "weekly-retrain"])
    assert runs_here(cfg, ["nightly-evaluate"], work_pool="cpu")

    given = K8S_GPU + ["workdir=/mnt/llamaflow"]
    cfg = load_deploy_config(given)
    assert workdir_given(given)
    made = {d.name: d for d in deployments(cfg, for_work_pools=True, explicit_workdir=True)}
    tpl = json.loads((REPO / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    assert made["weekly-retrain"].job_variables == {
        "env": {**template_env(tpl), "LLAMAFLOW_WORKDIR": "/mnt/llamaflow"}}
    assert template_env(tpl)["HF_HOME"] == "/cache/huggingface"


def test_deploy_to_kubernetes_only_needs_no_local_workspace(tmp_path, monkeypatch, capsys):
    """`workdir=/workspace` is a path in the pods: deploying it from a laptop does not create or
    check it here (without PREFECT_API_URL: the one-line reason, nothing made)."""
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    missing = tmp_path / "not-here" / "workspace"
    assert main(["deploy", "nightly-evaluate", "--overrides", *K8S_GPU,
                 f"workdir={missing}"]) == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, message", [
    ("deployments.nightly-evaluate.cron=every night", "nightly-evaluate.cron"),
    ("deployments.weekly-retrain.from_stage=train", "from_stage='train'"),
    ("deployments.requantize.pool=tpu", "pool='tpu'"),
    ("+deployments.lifecycle.schedule=daily", "unknown key"),
])
def test_deploy_config_errors_name_the_field(override, message):
    from pipelines.deploy import load_deploy_config

    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_deploy_config([override])


def test_deployments_carry_schedule_parameters_and_pool():
    from prefect.deployments.runner import EntrypointType

    from pipelines.deploy import deployments, load_deploy_config, workspace

    cfg = load_deploy_config()
    served = {d.name: d for d in deployments(cfg)}
    assert set(served) == set(cfg["deployments"])
    nightly = served["nightly-evaluate"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC"
    assert nightly.parameters == {"overrides": ["recipe=demo", "stages=[evaluate]",
                                                "force=[evaluate]"], "from_stage": None}
    assert served["lifecycle"].schedules == []
    assert nightly.entrypoint == "pipelines.lifecycle.lifecycle"
    # the UI form: both parameters are in the flow's schema, typed
    props = nightly._parameter_openapi_schema.properties
    assert set(props) == {"overrides", "from_stage"}
    assert {"type": "array", "items": {"type": "string"}} in props["overrides"]["anyOf"]
    pooled = {d.name: d for d in deployments(cfg, ["requantize", "weekly-retrain"], for_work_pools=True)}
    assert pooled["requantize"].work_pool_name == "cpu"
    assert pooled["weekly-retrain"].work_pool_name == "gpu"
    assert pooled["weekly-retrain"].entrypoint == "pipelines.lifecycle.lifecycle"
    assert pooled["weekly-retrain"].entrypoint_type == EntrypointType.MODULE_PATH
    # work-pool runs get the workspace, absolute, in their environment (served runs inherit it)
    assert pooled["requantize"].job_variables == {"env": {"LLAMAFLOW_WORKDIR": str(workspace(cfg))}}
    assert workspace(cfg).is_absolute()
    with pytest.raises(ValueError, match="unknown deployment"):
        deployments(cfg, ["hourly"])


# -- real servers ----------------------------------------------------------------------------------

@pytest.mark.servers
@pytest.mark.slow
def test_servers_start_and_stop_by_pid(tmp_path):
    """Each server comes up healthy on its port and is gone (port closed, group gone) after the
    SIGTERM/SIGINT to its PID."""
    with Postgres.start() as pg:
        with PrefectServer.start(tmp_path, pg.url("prefect", "postgresql+asyncpg")) as pf, \
                MlflowServer.start(tmp_path, pg.url("mlflow", "postgresql+psycopg2")) as ml:
            assert pf.api("GET", "health") is True
            assert ml.api("GET", "experiments/search?max_results=5")["experiments"][0]["name"] == "Default"
            ports = (pf.port, ml.port)
            pf_seconds, ml_seconds = pf.stop(), ml.stop()
        assert not any(port_open(p) for p in ports)
        for proc in (pf.proc, ml.proc):
            assert proc.returncode is not None
        print(f"postgres ready {pg.started_s:.1f}s, prefect {pf.started_s:.1f}s "
              f"(stop {pf_seconds:.1f}s), mlflow {ml.started_s:.1f}s (stop {ml_seconds:.1f}s)")
    assert not port_open(pg.port)


def _flow_run(s, flow_run_id: str) -> dict:
    return s.prefect.api("GET", f"flow_runs/{flow_run_id}")


@pytest.fixture(scope="module")
def demo(demo_servers):
    s = demo_servers
    assert s.demo.returncode == 0, s.demo.stdout[-4000:] + s.demo.stderr[-4000:]
    latest = json.loads((s.workdir / "latest.json").read_text())
    return s, latest


@pytest.mark.servers
@pytest.mark.slow
def test_demo_flow_run_and_task_runs_on_prefect_server(demo):
    s, latest = demo
    runs = s.prefect.api("POST", "flow_runs/filter", json={
        "flows": {"name": {"any_": ["lifecycle"]}}})
    assert len(runs) == 1
    run = runs[0]
    assert run["state"]["type"] == "COMPLETED"
    tasks = s.prefect.api("POST", "task_runs/filter", json={
        "flow_runs": {"id": {"any_": [run["id"]]}}})
    by_name = {t["name"].rsplit("-", 1)[0]: t for t in tasks}
    # one task run per stage call, each completed, named by its label, tagged by stage
    assert set(latest["stages"]) <= set(by_name), (sorted(latest["stages"]), sorted(by_name))
    from pipelines.stages import declared

    for label, t in by_name.items():
        assert t["state"]["type"] == "COMPLETED", label
        stage = latest["stages"][label]["stage"]   # a part (report, speed, imatrix): its whole's
        assert f"stage:{declared(stage).part_of or stage}" in t["tags"], (label, t["tags"])
    # the gpu pool's concurrency limit bounds exactly the task runs that carry the tag
    gpu_tagged = {label for label, t in by_name.items() if "gpu" in t["tags"]}
    assert gpu_tagged == {label for label, r in latest["stages"].items()
                          if r["stage"] in {"pretrain", "sft", "evaluate"}}
    # the flow run links to its MLflow parent run (link artifact)
    arts = s.prefect.api("POST", "artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    # (Prefect stores a link artifact as markdown `[text](url)`)
    link = next(a for a in arts if a["key"] == "mlflow-run")
    exp = s.mlflow.api("GET", f"runs/get?run_id={latest['mlflow_parent_run_id']}")["run"]["info"]["experiment_id"]
    assert f"({s.mlflow.url}/#/experiments/{exp}/runs/{latest['mlflow_parent_run_id']})" in link["data"]
    assert any(a["key"] == "lifecycle-summary" for a in arts)


@pytest.mark.servers
@pytest.mark.slow
def test_demo_parent_and_nested_runs_on_mlflow_server(demo):
    s, latest = demo
    parent_id = latest["mlflow_parent_run_id"]
    parent = s.mlflow.api("GET", f"runs/get?run_id={parent_id}")["run"]
    assert parent["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    runs = s.prefect.api("POST", "flow_runs/filter", json={"flows": {"name": {"any_": ["lifecycle"]}}})
    assert tags["prefect.flow_run_id"] == runs[0]["id"]          # MLflow → Prefect
    assert runs[0]["id"] in tags["prefect.flow_run_url"]
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["stages_run"] + metrics["stages_cached"] == len(latest["stages"])
    arts = {f["path"] for f in s.mlflow.api(
        "GET", f"artifacts/list?run_id={parent_id}")["files"]}
    assert {"config.yaml", "stages.json"} <= arts

    exp = parent["info"]["experiment_id"]
    children = s.mlflow.api("POST", "runs/search", json={
        "experiment_ids": [exp], "filter": f"tags.mlflow.parentRunId = '{parent_id}'",
        "max_results": 100})["runs"]
    by_label = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "llamaflow.label"): r
                for r in children}
    assert set(by_label) == set(latest["stages"])
    for label, r in by_label.items():
        assert r["info"]["status"] == "FINISHED", label
        assert r["info"]["run_id"] == latest["stages"][label]["mlflow_run_id"]
        m = {x["key"]: x["value"] for x in r["data"].get("metrics", [])}
        assert m["stage_seconds"] >= 0 and m["artifact_bytes"] > 0, label
        files = {f["path"] for f in s.mlflow.api(
            "GET", f"artifacts/list?run_id={r['info']['run_id']}")["files"]}
        assert {"stage_config.json", "manifest.json"} <= files, label
    # proxied artifacts really landed in the server's artifact store, byte for byte
    some = by_label[next(iter(by_label))]["info"]["run_id"]
    stored = list(s.mlflow.artifacts.rglob(f"*{some}*/artifacts/manifest.json")) or \
        [p for p in s.mlflow.artifacts.rglob("manifest.json") if some in str(p)]
    assert stored


@pytest.mark.servers
@pytest.mark.slow
def test_deploy_creates_pools_limits_and_scheduled_deployments(demo):
    s, _ = demo
    r = llamaflow(["deploy"], s.env, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pools = {p["name"]: p for p in s.prefect.api("POST", "work_pools/filter", json={})}
    assert pools["gpu"]["concurrency_limit"] == 1 and pools["gpu"]["type"] == "process"
    assert pools["cpu"]["concurrency_limit"] == 4
    limit = s.prefect.api("GET", "concurrency_limits/tag/gpu")
    assert limit["concurrency_limit"] == 1
    deps = {d["name"]: d for d in s.prefect.api("POST", "deployments/filter", json={})}
    assert {"lifecycle", "nightly-evaluate", "weekly-retrain", "requantize"} <= set(deps)
    nightly = deps["nightly-evaluate"]
    assert [sch["schedule"]["cron"] for sch in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["work_pool_name"] == "gpu" and deps["requantize"]["work_pool_name"] == "cpu"
    assert nightly["parameters"] == {"overrides": ["recipe=demo", "stages=[evaluate]",
                                                   "force=[evaluate]"], "from_stage": None}
    assert nightly["entrypoint"] == "pipelines.lifecycle.lifecycle"
    assert set(nightly["parameter_openapi_schema"]["properties"]) == {"overrides", "from_stage"}
    # the scheduler service fills in upcoming runs of the scheduled deployment
    deadline = time.monotonic() + 90
    scheduled = []
    while time.monotonic() < deadline and not scheduled:
        scheduled = s.prefect.api("POST", "flow_runs/filter", json={
            "deployments": {"id": {"any_": [nightly["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        time.sleep(2)
    assert scheduled and all(fr["parameters"]["from_stage"] is None for fr in scheduled)


@pytest.mark.servers
@pytest.mark.slow
def test_serve_registers_deployment_and_stops_on_sigterm(demo, tmp_path):
    s, _ = demo

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "llamaflow"), "serve", "nightly-evaluate"],
                                env={**os.environ, **s.env, "PREFECT_RUNNER_POLL_FREQUENCY": "5"},
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        dep = None
        while time.monotonic() < deadline and proc.poll() is None:
            deps = s.prefect.api("POST", "deployments/filter", json={
                "deployments": {"name": {"any_": ["nightly-evaluate"]}}})
            # served: by module path as `deploy` does it (a file path crashed served runs of a
            # deployment `deploy` made first), not paused, and READY (its runner polls for it,
            # no worker runs the gpu pool here; from then on its SIGTERM handler is set)
            served = [d for d in deps if d["entrypoint"] == "pipelines.lifecycle.lifecycle"
                      and not d["paused"] and d["status"] == "READY"]
            if served:
                dep = served[0]
                break
            time.sleep(1)
        assert dep is not None, log.read_text()[-3000:]
        assert [sch["schedule"]["cron"] for sch in dep["schedules"]] == ["0 2 * * *"]
        assert dep["parameters"]["overrides"] == ["recipe=demo", "stages=[evaluate]",
                                                  "force=[evaluate]"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # serve pauses its deployments' schedules when it stops (pause_on_shutdown)
    dep = s.prefect.api("GET", f"deployments/{dep['id']}")
    assert dep["paused"] is True
    assert proc.returncode is not None


def test_client_env_points_at_servers(tmp_path):
    pf, ml = PrefectServer.__new__(PrefectServer), MlflowServer.__new__(MlflowServer)
    pf.port, ml.port = 4200, 5000
    env = client_env(pf, ml, tmp_path)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
