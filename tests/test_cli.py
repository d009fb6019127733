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
           if not k.startswith(("PREFECT_", "MLFLOW_", "LLAMAFLOW_")) or k == "LLAMAFLOW_SHARED_DATA"}
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


def test_ephemeral_server_timeout_says_what_to_set(tmp_path, shared_data):
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


def test_summary_names_the_report_the_gates_and_every_stage_outcome(tmp_path):
    from pipelines.console import summary

    ws = tmp_path / "ws"
    result = {
        "workdir": str(ws), "mlflow_parent_run_id": "abc123", "mlflow_uri": "sqlite:///x.db",
        "mlflow_run_url": "http://127.0.0.1:5000/#/experiments/1/runs/abc123",
        "prefect_flow_run_url": None, "report": str(ws / "artifacts/report/k/report.md"),
        "stages": {
            "download": {"cache": "hit", "seconds": 0.1, "artifact": str(ws / "artifacts/download/k1")},
            "merge": {"cache": "forced", "seconds": 2.0, "artifact": str(ws / "artifacts/merge/k2")},
            "quantize[q4_0]": {"cache": "hit-remote", "seconds": 0.3,
                               "artifact": str(ws / "artifacts/quantize/k3")},
            "report": {"cache": "miss", "seconds": 0.5, "artifact": str(ws / "artifacts/report/k")}},
        "gates": {"passed": False, "checks": [
            {"gate": "q4_0", "model": "gguf-q4_0", "vs": "gguf-f16", "set": "tinystories",
             "metric": "ppl", "delta_pct": 18.17, "max_delta_pct": 5.0, "passed": False}]}}
    text = summary(result, "multirun 2/3: pretrain.lora.r=16")
    assert "== multirun 2/3: pretrain.lora.r=16" in text
    assert "  merge                  forced" in text and "hit-remote" in text
    assert "artifacts/merge/k2" in text and str(ws / "artifacts") not in text.split("report:")[0]
    assert "1 forced, 1 hit, 1 hit-remote, 1 miss" in text
    assert f"report:    {ws}/artifacts/report/k/report.md" in text
    assert "gates:     FAILED: gguf-q4_0 on tinystories: ppl +18.2 % vs gguf-f16 (limit +5 %)" in text
    assert f"llamaflow ui --workdir {ws}" in text and "PREFECT_API_URL" in text
    # how to chat with what it made (the one quant type here; f16 when the run has it)
    assert f"chat:      `llamaflow serve-model q4_0 --workdir {ws}`" in text
    result["stages"]["quantize[f16]"] = result["stages"]["quantize[q4_0]"]
    assert "`llamaflow serve-model f16 " in summary(result)
    result["gates"] = {"passed": True, "checks": [{"passed": True}]}
    assert "gates:     passed (1 checked)" in summary(result)


def test_a_failed_member_is_reported_once_and_the_others_still_are(tmp_path, shared_data):
    """-m with one good and one broken member: both get their labelled section, the failure is
    one line naming the stage (no traceback anywhere on the console), the exit status is 1, and
    a file that is not a llama2.c export is not retried."""
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 8)
    good = shared_data / "models" / "stories260K" / "stories260K.bin"
    r = _llamaflow(["run", "-m", "recipe=stories260k", "stages=[download]",
                    f"source.bin_path={good},{garbage}", f"workdir={tmp_path / 'ws'}"], {}, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    assert "== multirun 1/2" in r.stdout and "  download               miss" in r.stdout
    assert "llamaflow: the run failed at stage download: MetaFormatError:" in r.stderr
    assert "== multirun 2/2" in r.stderr
    # one attempt per member: a retry would start the download task a third time
    assert out.count("cache miss, running") == 2 and "Retries" not in out
