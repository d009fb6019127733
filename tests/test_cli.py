"""The command line as a user meets it, in subprocesses: what it prints when things go wrong."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _llamaflow(args, env_extra: dict, cwd: Path, timeout: int = 240):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "LLAMAFLOW_"))}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env_extra})
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_ephemeral_prefect_server_gets_a_laptop_sized_start_up_limit():
    """Prefect's 20 s default killed runs on a loaded machine before any stage; a user's own
    setting still wins."""
    code = ("import pipelines; from prefect.settings import "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; print(s.value())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert int(out) >= 120
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "7"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert int(out) == 7


def test_ephemeral_server_timeout_says_what_to_set(tmp_path):
    """A server that cannot start in time (a 1 s limit) ends the run with one message naming the
    setting and the alternative, and exit status 2."""
    t0 = time.time()
    r = _llamaflow(["run", "recipe=stories260k", f"workdir={tmp_path / 'ws'}"],
                   {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}, tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600" in r.stderr
    assert "PREFECT_API_URL" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ws" / "artifacts").exists()
    assert time.time() - t0 < 200
