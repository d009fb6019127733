"""Scheduled deployments keep what they make: a run of a shipped deployment through a real
`prefect worker start --pool cpu` works in the workspace `llamaflow deploy` was given, not in
the temporary directory the process worker starts it in (and deletes), and a second run finds
the first one's artifacts in the cache.

Real processes on 127.0.0.1: `prefect server start` (tests/servers.py, SQLite), the llamaflow
CLI and the Prefect worker, each stopped by PID.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.servers import VENV_BIN, PrefectServer, llamaflow

pytestmark = [pytest.mark.servers, pytest.mark.slow]

UP_TO_MERGE = "stages=[download,convert,vocab,pretrain,sft,merge]"


def _env(prefect: PrefectServer, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "LLAMAFLOW_"))}
    return {**env, "PREFECT_API_URL": prefect.api_url, "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _worker_runs_once(pool: str, env: dict, cwd: Path, log: Path, timeout: float = 600) -> None:
    """`prefect worker start --pool POOL --run-once`: takes the scheduled runs, runs each to the
    end, exits. Its own process group, killed by PID if it overruns."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool,
                                 "--run-once"], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _flow_run(pf: PrefectServer, flow_run_id: str, timeout: float = 60) -> dict:
    """The flow run once it is final (the worker has exited; its last state report may lag)."""
    deadline = time.monotonic() + timeout
    while True:
        run = pf.api("GET", f"flow_runs/{flow_run_id}")
        if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} or \
                time.monotonic() > deadline:
            return run
        time.sleep(1)


def _mlflow_runs(db: Path, flow_run_id: str) -> tuple[str, dict[str, str]]:
    """The MLflow parent run of a flow run, and label -> llamaflow.cache of its nested runs."""
    with sqlite3.connect(db) as c:
        (parent,) = c.execute("SELECT run_uuid FROM tags WHERE key='prefect.flow_run_id' "
                              "AND value=?", (flow_run_id,)).fetchone()
        rows = c.execute(
            "SELECT l.value, h.value FROM tags p JOIN tags l ON l.run_uuid=p.run_uuid "
            "JOIN tags h ON h.run_uuid=p.run_uuid WHERE p.key='mlflow.parentRunId' AND p.value=? "
            "AND l.key='llamaflow.label' AND h.key='llamaflow.cache'", (parent,)).fetchall()
    return parent, dict(rows)


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory):
    """A `prefect server` and a demo workspace made up to merge (what requantize starts from),
    shared by the worker and the serve test; the server is stopped by PID at the end."""
    tmp = tmp_path_factory.mktemp("deploy")
    workdir = tmp / "workspace"
    with PrefectServer.start(tmp) as pf:
        env = _env(pf, tmp / "client-home", LLAMAFLOW_WORKDIR=str(workdir))
        demo = llamaflow(["demo", UP_TO_MERGE], env, timeout=900)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert not (workdir / "artifacts" / "quantize").exists()
        yield pf, workdir, env


def test_a_requantize_run_through_a_worker_keeps_its_artifacts_and_the_next_run_hits(
        demo_workspace, tmp_path):
    pf, workdir, env = demo_workspace
    elsewhere = tmp_path / "worker-cwd"   # the worker's own directory: nothing may land here
    elsewhere.mkdir()
    # deployed from another directory: the workspace comes from LLAMAFLOW_WORKDIR, made
    # absolute and written into the deployment
    deployed = llamaflow(["deploy", "requantize"], env, timeout=300, cwd=elsewhere)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert f"flow runs use workspace {workdir} (LLAMAFLOW_WORKDIR)" in deployed.stdout
    (dep,) = pf.api("POST", "deployments/filter", json={
        "deployments": {"name": {"any_": ["requantize"]}}})
    assert dep["job_variables"]["env"]["LLAMAFLOW_WORKDIR"] == str(workdir)
    assert dep["parameters"] == {"overrides": ["recipe=demo", "stages=[quantize]",
                                               "force=[quantize]"], "from_stage": None}

    # a run of the deployment as shipped, by the worker a user starts (no LLAMAFLOW_WORKDIR
    # of its own)
    worker_env = _env(pf, tmp_path / "worker-home")
    trigger = subprocess.run([str(VENV_BIN / "prefect"), "deployment", "run",
                              "lifecycle/requantize"], env=worker_env, cwd=elsewhere,
                             capture_output=True, text=True, timeout=120)
    assert trigger.returncode == 0, trigger.stdout + trigger.stderr
    first_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout)[1]
    _worker_runs_once("cpu", worker_env, elsewhere, tmp_path / "worker.log")
    first = _flow_run(pf, first_id)
    assert first["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-4000:]

    latest = json.loads((workdir / "latest.json").read_text())
    cache = {k: r["cache"] for k, r in latest["stages"].items()}
    # the importance matrix is a part of quantize: forced with it
    quantized = {k for k in cache if k.startswith("quantize[") or k == "imatrix"}
    assert quantized == {f"quantize[{q}]" for q in ("f16", "q8_0", "q4_0", "q4_k_m",
                                                    "q4_k_m@imatrix")} | {"imatrix"}
    assert all(not cache[k].startswith("hit") for k in quantized)   # forced: recomputed
    assert all(cache[k] == "hit" for k in cache if k not in quantized)   # the demo's
    made = {k: latest["stages"][k]["artifact"] for k in quantized}
    # the worker is gone, its temporary directory with it: the artifacts stayed
    for path in made.values():
        assert Path(path).is_relative_to(workdir) and (Path(path) / "manifest.json").is_file()
    assert list(elsewhere.iterdir()) == []
    assert _mlflow_runs(workdir / "mlflow.db", first_id) == (latest["mlflow_parent_run_id"], cache)

    # a second run, parameters changed as in the UI's custom run (no force): the first
    # run's GGUF files are its cache hits, in the same workspace
    second_id = pf.api("POST", f"deployments/{dep['id']}/create_flow_run", json={
        "parameters": {"overrides": ["recipe=demo", "stages=[quantize]"]}})["id"]
    _worker_runs_once("cpu", worker_env, elsewhere, tmp_path / "worker.log")
    second = _flow_run(pf, second_id)
    assert second["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-4000:]
    latest = json.loads((workdir / "latest.json").read_text())
    assert {k: r["cache"] for k, r in latest["stages"].items()} == \
        {k: "hit" for k in cache}
    assert {k: latest["stages"][k]["artifact"] for k in quantized} == made
    assert _mlflow_runs(workdir / "mlflow.db", second_id) == \
        (latest["mlflow_parent_run_id"], {k: "hit" for k in cache})
    assert list(elsewhere.iterdir()) == []


def test_a_served_deployment_run_works_in_the_workspace(demo_workspace, tmp_path):
    """`llamaflow serve` (no pool: its own process runs the flow runs), started from another
    directory; a run triggered as from the UI completes in the configured workspace and finds
    the GGUF files there (made by the worker test, or by this run when it runs alone)."""
    pf, workdir, env = demo_workspace
    elsewhere = tmp_path / "serve-cwd"
    elsewhere.mkdir()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "llamaflow"), "serve", "requantize"], cwd=elsewhere,
                                env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    started = datetime.now(timezone.utc)
    try:
        deadline = time.monotonic() + 180
        dep = None
        while dep is None and time.monotonic() < deadline and proc.poll() is None:
            deps = pf.api("POST", "deployments/filter", json={
                "deployments": {"name": {"any_": ["requantize"]}}})
            # registered by this serve (the worker test deployed the same name before) and
            # polled by its runner
            dep = next((d for d in deps if datetime.fromisoformat(d["updated"]) > started
                        and d["status"] == "READY"), None)
            time.sleep(1)
        assert dep is not None, log.read_text()[-3000:]
        assert f"flow runs use workspace {workdir} (LLAMAFLOW_WORKDIR)" in log.read_text()
        # the module path, as `deploy` writes it: no code to copy from the serving directory
        assert dep["entrypoint"] == "pipelines.lifecycle.lifecycle"
        run_id = pf.api("POST", f"deployments/{dep['id']}/create_flow_run", json={})["id"]
        run = _flow_run(pf, run_id, timeout=600)
        assert run["state"]["type"] == "COMPLETED", log.read_text()[-4000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    parent, children = _mlflow_runs(workdir / "mlflow.db", run_id)
    latest = json.loads((workdir / "latest.json").read_text())
    assert latest["mlflow_parent_run_id"] == parent
    assert {k: r["cache"] for k, r in latest["stages"].items()} == children
    assert children["merge"] == "hit" and {k for k in children if k.startswith("quantize[")}
    for label, r in latest["stages"].items():
        assert Path(r["artifact"]).is_relative_to(workdir), label
    assert list(elsewhere.iterdir()) == []
