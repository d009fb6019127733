"""Running a training stage: in this process (one process, DDP strategy), or under torchrun as
a subprocess in its own process session.

The convention for GPU training inside an orchestrator (LLaMA-Factory's launcher, Axolotl,
ZenML's run_with_accelerate): the orchestrating process never initialises CUDA or NCCL itself;
it starts `torchrun --standalone --nproc-per-node=N -m steps.<stage> --worker ...` with
start_new_session=True, streams the output line by line into its logger, forwards the ranks'
metrics (rank 0 appends them to `trainer_log.jsonl`) as they appear, and on an exception,
KeyboardInterrupt (a cancelled task) or timeout kills the whole process group so no orphan rank
keeps holding GPU memory. A non-zero exit raises, so the orchestrator's retries apply.
Each rank enters through the stage module's `worker_main` and runs the stage's worker there.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from steps.train.config import TrainConfig

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The training subprocess failed or timed out."""


# The last line of a Python traceback, as torchrun's ranks print it ("[rank0]: ValueError: ...").
# torchrun's own summary, which ends the output, names no cause, so these lines are kept apart.
_ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*:")


def torchrun_command(module: str, args: list[str], nproc: int) -> list[str]:
    # `python -m torch.distributed.run` is torchrun without relying on the console script's PATH
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module, *args]


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group (torchrun forwards it to the ranks), then SIGKILL it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class _JsonlTail:
    """Yields complete new lines appended to a JSONL file."""

    def __init__(self, path: Path):
        self.path, self.pos = Path(path), 0

    def poll(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.pos += end + 1
        return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line]


def launch(cmd: list[str], *, metrics_file: Path | None = None,
           on_metrics: Callable[[dict, int], None] | None = None, timeout_s: float | None = None,
           env: dict | None = None, logger: logging.Logger | None = None) -> None:
    """Run `cmd` in a new session, stream its output to `logger`, forward JSONL metric records
    ({"step": n, ...}) from `metrics_file` to on_metrics(values, step); raise LaunchError on a
    non-zero exit or timeout. The process group is killed on any exit path but success."""
    logger = logger or log
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})},
                            bufsize=1, text=True, errors="replace")
    lines: queue.Queue = queue.Queue()

    def reader() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    tail = _JsonlTail(metrics_file) if metrics_file is not None else None
    started, tail_lines, errors, done = time.monotonic(), [], [], False
    logger.info("launching: %s", " ".join(cmd))

    def forward() -> None:
        if tail is not None and on_metrics is not None:
            for rec in tail.poll():
                step = rec.pop("step")
                on_metrics(rec, step)

    try:
        while not done:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                done = True
            elif line:
                logger.info("%s", line)
                tail_lines = (tail_lines + [line])[-40:]
                if _ERROR_LINE.match(line) and "ChildFailedError" not in line:
                    errors = (errors + [line])[-5:]
            forward()
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise LaunchError(f"{cmd[0]} ... timed out after {timeout_s:.0f} s; process "
                                  "group killed")
        rc = proc.wait()
        forward()
    except BaseException:
        _kill_group(proc)
        raise
    if rc != 0:
        cause = "".join(f"\n  {e}" for e in dict.fromkeys(errors))
        raise LaunchError(f"training subprocess exited with code {rc}" +
                          (f"; errors:{cause}" if cause else "") + "\nlast output:\n" +
                          "\n".join(tail_lines[-20:]))


def execute(module: str, worker: Callable, cfg: TrainConfig, out_dir: Path, *,
            on_metrics: Callable | None, **kwargs) -> dict:
    """Run worker(cfg, out_dir, on_metrics=..., **kwargs) in this process (nproc 1) or under
    torchrun as `python -m <module> --worker ...` (nproc > 1; kwargs must be JSON-able)."""
    out_dir = Path(out_dir)
    if cfg.launcher.nproc == 1 and cfg.launcher.strategy == "ddp":
        return worker(cfg, out_dir, on_metrics=on_metrics, **kwargs)
    args = ["--worker", "--out-dir", str(out_dir), "--config-json", cfg.model_dump_json(),
            "--kwargs-json", json.dumps(kwargs, default=str)]
    launch(torchrun_command(module, args, cfg.launcher.nproc),
           metrics_file=out_dir / "trainer_log.jsonl", on_metrics=on_metrics,
           timeout_s=cfg.launcher.timeout_s, logger=logging.getLogger(module),
           env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                "PYTHONUNBUFFERED": "1"})
    return json.loads((out_dir / "training_summary.json").read_text())


def worker_main(config_cls, worker: Callable, argv: list[str] | None = None) -> None:
    """Entry point of `python -m steps.<stage> --worker ...` (one torchrun rank)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--kwargs-json", default="{}")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(name)s: %(message)s")
    worker(config_cls.model_validate_json(a.config_json), Path(a.out_dir), on_metrics=None,
           **json.loads(a.kwargs_json))
