"""Runs that share a workspace, and runs that end badly, as real `llamaflow` processes:
two started together on a fresh workspace (the MLflow and Prefect databases made once, each
stage computed once), Ctrl-C during training (out in seconds, checkpoints kept), kill -9 (the
next run ends what the dead one left RUNNING and removes its temp dirs)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import locks
from pipelines.artifacts import Store

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k == "LLAMAFLOW_SHARED_DATA"
           or not k.startswith(("PREFECT_", "MLFLOW_", "LLAMAFLOW_"))}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _llamaflow(*args) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def _runs(ws: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("llamaflow").experiment_id])


TRACKER_ONLY = """
import sys
from pathlib import Path
from pipelines.tracking import Tracker
print("experiment", Tracker(Path(sys.argv[1]), {}).experiment_id)
"""


def test_two_processes_creating_one_fresh_workspace_both_succeed(tmp_path):
    """Without the init lock about two rounds in three failed here ('duplicate column name',
    'table _alembic_tmp_experiments already exists')."""
    for round_ in range(3):
        ws = tmp_path / f"ws{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", TRACKER_ONLY, str(ws)], cwd=REPO,
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        assert {out.split()[-1] for out, _ in outs} == {"1"}   # one experiment, the same


def _read_lines(p: subprocess.Popen, lines: list[str], seen: threading.Event, pattern: str):
    for line in p.stdout:
        lines.append(line)
        if re.search(pattern, line):
            seen.set()


def test_two_runs_started_together_compute_each_stage_once(tmp_path, shared_data):
    """The test itself holds convert's key lock while both runs start, so that both must reach
    it and wait (stories260k's stages take a second or two, less than a run's start-up): then
    it lets go, and one computes convert while the other waits for it and takes the hit."""
    cmd = lambda ws: _llamaflow("run", "recipe=stories260k", f"workdir={ws}",  # noqa: E731
                                "stages=[download,convert]")
    # convert's key, which names its lock: the same in every workspace (content-keyed inputs)
    probe = subprocess.run(cmd(tmp_path / "probe"), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    key = next(r.data.tags["llamaflow.cache_key"] for r in _runs(tmp_path / "probe")
               if r.data.tags.get("llamaflow.label") == "convert")

    ws = tmp_path / "ws"
    waiting = rf"convert: waiting for pid {os.getpid()} on .*held by the test.*, which is " \
        r"computing this stage"
    with locks.hold(Store(ws / "artifacts").lock_path("convert", key), what="held by the test"):
        procs = [subprocess.Popen(cmd(ws), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs: list[list[str]] = [[], []]
        seen = [threading.Event(), threading.Event()]
        readers = [threading.Thread(target=_read_lines, args=(p, out, ev, waiting), daemon=True)
                   for p, out, ev in zip(procs, outs, seen)]
        for r in readers:
            r.start()
        deadline = time.monotonic() + 600
        while not all(ev.is_set() for ev in seen):
            if time.monotonic() > deadline or any(p.poll() is not None and not ev.is_set()
                                                   for p, ev in zip(procs, seen)):
                for p in procs:
                    p.kill()
                pytest.fail("both runs should wait for the test's lock on convert:\n" +
                            "\n---\n".join("".join(o[-40:]) for o in outs))
            time.sleep(0.1)
    for p, r in zip(procs, readers):
        p.wait(timeout=600)
        r.join()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, "".join(out[-60:])
    runs = [r for r in _runs(ws) if "llamaflow.label" in r.data.tags]
    by_label: dict[str, list] = {}
    for r in runs:
        by_label.setdefault(r.data.tags["llamaflow.label"], []).append(r)
    assert set(by_label) == {"download", "convert"}
    for label, rs in by_label.items():
        # each stage computed exactly once: one miss, the other run's hit
        assert sorted(r.data.tags["llamaflow.cache"] for r in rs) == ["hit", "miss"], label
        assert len({r.data.tags["llamaflow.artifact_digest"] for r in rs}) == 1, label
        assert all(r.info.status == "FINISHED" for r in rs)
    assert by_label["convert"][0].data.tags["llamaflow.cache_key"] == key
    assert sorted(p.name for p in (ws / "artifacts" / "convert").iterdir()) == [".locks", key]


def _start_and_wait_for(ws: Path, pattern: str, *extra) -> tuple[subprocess.Popen, list[str]]:
    """A `llamaflow run recipe=stories260k` in its own process group (as a terminal runs it),
    read until a line matches `pattern`."""
    p = subprocess.Popen(_llamaflow("run", "recipe=stories260k", f"workdir={ws}", *extra),
                         cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return p, lines
    p.wait()
    pytest.fail(f"the run ended (rc {p.returncode}) before /{pattern}/:\n" + "".join(lines[-60:]))


def _server_processes_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    return [int(f[0]) for f in (line.split(None, 2) for line in out.splitlines()[1:])
            if f[1] == str(pid) and "uvicorn" in f[2]]


def test_ctrl_c_inside_an_mlflow_write_leaves_the_database_writable(tmp_path):
    """Ctrl-C inside an MLflow write to SQLite (here: the metric's INSERT sent, the commit not
    yet) lost the write, and at some points of the transaction left its connection holding the
    write lock: recording the run as KILLED then waited out the busy timeout and failed
    ("database is locked"), and in CI an interrupted run was still there 60 s after Ctrl-C.
    The write now finishes, then Ctrl-C arrives."""
    from sqlalchemy import event

    from pipelines.tracking import Tracker

    tracker = Tracker(tmp_path, {})
    run_id = tracker.start_run("interrupted")
    engine = getattr(tracker.client, "_client", tracker.client)._tracking_client.store.engine
    sent = []

    def ctrl_c_once(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(engine, "after_cursor_execute", ctrl_c_once)
    try:
        with pytest.raises(KeyboardInterrupt):
            tracker.log_metrics(run_id, {"loss": 1.5}, step=3)
    finally:
        event.remove(engine, "after_cursor_execute", ctrl_c_once)
    assert sent, "the test's Ctrl-C was never sent inside the write"
    tracker.end_run(run_id, "KILLED")       # raised "database is locked" before
    run = tracker.client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics == {"loss": 1.5}   # the interrupted write completed


def test_ctrl_c_during_pretrain_exits_within_seconds_keeping_the_checkpoint(tmp_path, shared_data):
    """Ctrl-C is SIGINT to the terminal's whole process group. Prefect's temporary server was in
    that group: it died first and the run spent 3.5 minutes retrying it."""
    ws = tmp_path / "ws"
    # the demo recipe checkpoints pretrain every 10 steps
    p, lines = _start_and_wait_for(ws, r"step 12/")
    servers = _server_processes_of(p.pid)
    assert servers, "no Prefect server among the run's child processes"
    os.killpg(p.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        rest = p.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        exited = p.poll()   # None: the run itself hung; a code: something kept its output open
        p.kill()
        try:
            after = p.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            after = "(output still held open)"
        pytest.fail(f"not done 60 s after Ctrl-C (exit code then: {exited}):\n"
                    + "".join(lines[-15:]) + "--- after Ctrl-C:\n" + after[-4000:])
    took = time.monotonic() - t0
    assert took < 30, f"{took:.0f} s to exit after Ctrl-C:\n{rest[-3000:]}"
    assert p.returncode == 130, rest[-3000:]     # the shell's code for an interrupted command
    assert "Connection refused" not in rest and "All connection attempts failed" not in rest
    checkpoints = [f for f in (ws / "scratch" / "pretrain").rglob("*") if f.is_file()]
    assert checkpoints, "no checkpoint left to resume from"
    status = {r.data.tags.get("llamaflow.label", "parent"): r.info.status for r in _runs(ws)}
    assert status["pretrain"] == "KILLED" and status["parent"] == "KILLED"
    assert not [s for s in servers if Path(f"/proc/{s}").exists()]   # Prefect stopped it


def test_the_run_after_a_kill_9_ends_what_it_left_running(tmp_path, shared_data):
    ws = tmp_path / "ws"
    p, _ = _start_and_wait_for(ws, r"step 3/")
    servers = _server_processes_of(p.pid)
    assert servers, "no Prefect server among the run's child processes"
    p.kill()
    p.wait()
    tmps = list((ws / "artifacts" / "pretrain").glob(".tmp-*"))
    assert len(tmps) == 1
    left = {r.data.tags.get("llamaflow.label", "parent"): r for r in _runs(ws)}
    assert left["pretrain"].info.status == left["parent"].info.status == "RUNNING"
    for s in servers:   # the server gets SIGTERM when the run dies; it may take a moment
        for _ in range(100):
            if not Path(f"/proc/{s}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{s}").exists(), "Prefect's server outlived the killed run"

    r = subprocess.run(_llamaflow("run", "recipe=stories260k", f"workdir={ws}",
                                  "stages=[download]"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    after = {x.info.run_id: x for x in _runs(ws)}
    for label in ("pretrain", "parent"):
        run = after[left[label].info.run_id]
        assert run.info.status == "FAILED", label
        assert f"process {p.pid} on" in run.data.tags["llamaflow.error"]
        assert f"MLflow run {run.info.run_id}" in out
    assert f"removed {tmps[0]}" in out and not tmps[0].exists()
    assert (ws / "scratch" / "pretrain").is_dir()        # checkpoints stay for the resume
    flow_run_id = left["parent"].data.tags["prefect.flow_run_id"]
    env = {"PREFECT_HOME": str(ws / "prefect")}   # the workspace's own Prefect database
    code = ("from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            f"    print(c.read_flow_run('{flow_run_id}').state.type.value)")
    state = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**_env(), **env},
                           capture_output=True, text=True, timeout=300)
    assert state.stdout.strip().splitlines()[-1] == "CRASHED", state.stderr[-2000:]
    assert "marked CRASHED" in out
