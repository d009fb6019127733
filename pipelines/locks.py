"""Who owns what in a workspace that several runs share.

Two kinds of lock, both `flock` on a file, so the kernel releases them when their holder dies
(kill -9, OOM, a pulled plug) and a lock is never left behind by a dead run:

- `workspace/.init.lock`: held while a run creates what the workspace's first run creates (the
  MLflow database and experiment, Prefect's database), so two runs started together on a fresh
  workspace do not both run the database migrations.
- `artifacts/<stage>/.locks/<key>.lock`: held by the one run that looks up or computes that
  stage for that cache key, from the lookup to the commit. Its temp dir and scratch checkpoints
  are that run's alone; another run of the same key waits, then finds the artifact in the cache.

The lock file holds its owner (pid, host, process start time, a description such as the MLflow
run) so that whoever waits can say for whom, and so that a dead owner can be told from a live one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil

INIT_LOCK = ".init.lock"


def host() -> str:
    return socket.gethostname()


def process_started(pid: int) -> float | None:
    """The process's start time (seconds since the epoch), or None when there is no such
    process: with the pid it tells a process from a later one that reuses its pid."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def me() -> dict:
    """This process as an owner record."""
    return {"pid": os.getpid(), "host": host(), "started": process_started(os.getpid())}


def owner_alive(owner: dict) -> bool | None:
    """True/False for an owner on this host (the same pid, started at the same time, still
    running), None for one on another host, which this process cannot see."""
    if owner.get("host") != host():
        return None
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    started = process_started(pid)
    if started is None:
        return False
    recorded = owner.get("started")
    # A pid reused by a later process: it started after the owner did (1 s of slack for rounding)
    return recorded is None or abs(float(recorded) - started) < 1.0


def describe(owner: dict | None) -> str:
    if not owner:
        return "another process (owner not recorded yet)"
    detail = [owner["what"]] if owner.get("what") else []
    if owner.get("since"):
        detail.append(f"since {time.strftime('%H:%M:%S', time.localtime(owner['since']))}")
    return f"pid {owner.get('pid')} on {owner.get('host')}" + (
        f" ({', '.join(detail)})" if detail else "")


def read_owner(path: Path) -> dict | None:
    try:
        text = Path(path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


# `is_held` takes the lock for a moment: a lock that is busy for less than this is taken without
# a word, so that a probe is never reported as another run to wait for.
PROBE_SECONDS = 0.5


def _try_lock(fd: int, within: float) -> bool:
    """Take the lock without blocking, trying again for `within` seconds; False if still busy."""
    deadline = time.monotonic() + within
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@contextlib.contextmanager
def hold(path: Path, *, what: str = "",
         on_wait: Callable[[dict | None], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock `path` (created if missing) for the body. When another process
    holds it for longer than PROBE_SECONDS, `on_wait(owner record)` is called once and this
    blocks until it is free (a Ctrl-C still interrupts the wait)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_TRUNC would wipe the holder's record each time a waiter opens the file
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd, PROBE_SECONDS):
            if on_wait is not None:
                on_wait(read_owner(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        record = json.dumps({**me(), "what": what, "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        try:
            yield
        finally:
            # The record goes with the lock: a free lock with a record would look held.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """Whether some process holds the lock `path` now (False when the file does not exist).
    It takes the lock for a moment to find out; `hold` lets such a moment pass unreported."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def workspace_init(workdir: Path, on_wait: Callable[[dict | None], None] | None = None):
    """The lock around everything a workspace's first run creates."""
    return hold(Path(workdir) / INIT_LOCK, what="initialising the workspace", on_wait=on_wait)
