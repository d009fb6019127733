"""The README's "Using it" commands, run as a new user types them right after `make demo`.

The ```bash blocks of that section are read from README.md and each command runs literally, in
order, through bash with the venv activated (`source .venv/bin/activate`, as the README says),
from the repository folder, in a workspace `llamaflow demo` (what `make demo` runs once it has
installed) made; only LLAMAFLOW_WORKDIR is set, to keep the workspace out of the repository.
`llamaflow ui` serves until stopped: it is started with a free port, must answer HTTP there, and
is stopped by PID. The one command that needs a real checkpoint from the network is listed in
NEEDS_NETWORK with the reason; its config is still checked here.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.servers import REPO, VENV_BIN, free_port, stop_group, wait_until

README = REPO / "README.md"
# Commands of "Using it" that cannot run here, each with the reason (matched by their start).
NEEDS_NETWORK = {
    "llamaflow run recipe=chinese-llama-alpaca model=llama-7b source=hf":
        "downloads LLaMA-7B (~13 GB) from the Hugging Face Hub and trains on the user's corpus",
}


def using_it_commands(text: str | None = None) -> list[str]:
    """The commands of the ```bash blocks under "## Using it" (up to its first subsection),
    backslash continuations joined, comments kept (bash drops them)."""
    text = README.read_text() if text is None else text
    section = text.split("\n## Using it\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(line.strip())
    return commands


def _skip_reason(command: str) -> str | None:
    return next((why for start, why in NEEDS_NETWORK.items() if command.startswith(start)), None)


def _env(workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "LLAMAFLOW_", "VIRTUAL_ENV"))
           or k == "LLAMAFLOW_SHARED_DATA"}   # where CI keeps ../shared/data, if elsewhere
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LLAMAFLOW_WORKDIR": str(workdir)}


def _bash(command: str) -> list[str]:
    return ["bash", "-c", f"source {shlex.quote(str(VENV_BIN / 'activate'))} && {command}"]


def test_using_it_lists_the_commands_this_test_runs():
    commands = using_it_commands()
    assert commands and all(c.startswith("llamaflow ") for c in commands), commands
    assert sum(_skip_reason(c) is not None for c in commands) == len(NEEDS_NETWORK)
    # each follow-up names the recipe it runs: a bare `llamaflow run x=y` has no source
    for c in commands:
        if c.startswith("llamaflow run") and _skip_reason(c) is None:
            assert "recipe=" in c, c


def test_the_real_model_example_sets_every_required_value(tmp_path, shared_data):
    """The Hub example, checked as `run` would check it: the only problems left are the data
    paths it names, which are the user's (no `source.revision must be set`, no empty data).
    The recipe's tokenizer and eval text are in ../shared/data (shared_data)."""
    from pipelines.config import ConfigError
    from pipelines.validate import check

    (command,) = [c for c in using_it_commands() if _skip_reason(c)]
    args = shlex.split(command.split("#", 1)[0])
    assert args[:2] == ["llamaflow", "run"]
    with pytest.raises(ConfigError) as e:
        check([*args[2:], f"workdir={tmp_path}"])
    problems = e.value.problems
    assert {p.key for p in problems} == {"pretrain.data", "sft.data"}, str(e.value)
    assert all("does not exist" in p.message and "/data/" in str(p.value) for p in problems), \
        str(e.value)


def _latest(workdir: Path) -> dict[str, str]:
    return {k: r["cache"] for k, r in json.loads((workdir / "latest.json").read_text())["stages"].items()}


def _ui(command: str, env: dict, log: Path) -> float:
    """Start `llamaflow ui` on a free port, wait for its HTTP answer, stop it by PID."""
    port = free_port()
    t0 = time.monotonic()
    with open(log, "wb") as out:
        # exec: the shell becomes llamaflow, which execs the MLflow server (one PID, one group)
        proc = subprocess.Popen(_bash(f"exec {command} --port {port}"), cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200,
                   180, "llamaflow ui", proc, log)
        assert "mlflow" in requests.get(f"http://127.0.0.1:{port}/", timeout=5).text.lower()
    finally:
        stop_group(proc)
    assert proc.returncode is not None
    return time.monotonic() - t0


# Each command's comment claims what recomputes; the ones latest.json can show are checked.
def _made(cache: str) -> bool:   # computed in this run: a miss, or forced on a matching key
    return not cache.startswith("hit")


CLAIMS = {
    "pretrain.lora.r=16": lambda c: c["vocab"] == "hit" and _made(c["pretrain"]),
    "--from sft": lambda c: c["pretrain"] == "hit" and _made(c["sft"]),
    "stages=[quantize,evaluate]": lambda c: set(c.values()) == {"hit"},
    "force=[merge]": lambda c: _made(c["merge"]) and c["sft"] == "hit",
}


@pytest.mark.slow
def test_using_it_runs_as_written_after_make_demo(tmp_path, shared_data):
    # (shared_data: `llamaflow config --check recipe=stories260k` reads the model there)
    workdir = tmp_path / "workspace"
    env = _env(workdir)
    repo_workspace_existed = (REPO / "workspace").exists()
    timings = []
    t0 = time.monotonic()
    demo = subprocess.run(_bash("llamaflow demo"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    timings.append(("llamaflow demo", time.monotonic() - t0))
    assert (workdir / "demo-source").is_dir()
    for command in using_it_commands():
        why = _skip_reason(command)
        if why:
            print(f"skipped: {command}\n  ({why})")
            continue
        if command.split("#")[0].split() == ["llamaflow", "ui"]:
            timings.append((command, _ui(command.split("#")[0].strip(), env, tmp_path / "ui.log")))
            continue
        t0 = time.monotonic()
        r = subprocess.run(_bash(command), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=1200)
        timings.append((command, time.monotonic() - t0))
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, f"{command}\n{r.stderr[-3000:]}"
        for claim, holds in CLAIMS.items():
            if claim in command:
                assert holds(_latest(workdir)), (command, _latest(workdir))
    # everything went to LLAMAFLOW_WORKDIR, nothing into the repository's own ./workspace
    assert (REPO / "workspace").exists() == repo_workspace_existed
    for command, seconds in timings:
        print(f"{seconds:7.1f}s  {command}")


def test_a_follow_up_without_the_recipe_fails_at_once_in_a_few_lines(tmp_path):
    """The old README follow-up, `llamaflow run pretrain.lora.r=16`, names no recipe: one short
    message with every missing key and exit 2, no Traceback, no Prefect, nothing written."""
    workdir = tmp_path / "ws"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "pretrain.lora.r=16"],
                       cwd=tmp_path, env=_env(workdir), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "source.path: must be set" in r.stderr
    assert "Traceback" not in r.stderr and "prefect" not in r.stderr.lower()
    assert len(r.stderr.strip().splitlines()) <= 8, r.stderr
    assert not workdir.exists()
    assert time.monotonic() - t0 < 60


def test_the_demo_recipe_in_a_workspace_without_the_demo_says_to_run_it(tmp_path):
    workdir = tmp_path / "ws"
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "recipe=demo"],
                       cwd=tmp_path, env=_env(workdir), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"source.path = '{workdir}/demo-source'" in r.stderr
    assert "run `llamaflow demo` first" in r.stderr
    assert "LLAMA_PRESIGNED_URL" not in r.stderr and "Traceback" not in r.stderr
    assert not workdir.exists()
