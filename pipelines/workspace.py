"""Prefect's temporary server for a workspace (no PREFECT_API_URL): started once per process,
under the workspace's init lock, and out of reach of the terminal's Ctrl-C.

Two things went wrong with Prefect starting it on its own, at the flow's first API call:

- Two runs started together on a fresh workspace both migrated `prefect/prefect.db`
  ("index ix_block_document__block_type_name_name already exists"). Under the lock, the second
  run's server starts only once the first one's has migrated the database and answers.
- Ctrl-C reaches every process of the terminal's process group, the server included. The run
  then spent minutes (3.5 measured) retrying the dead server to record that it was interrupted.
  The server now runs in a session of its own, so Ctrl-C interrupts the run, the run records
  CRASHED on a live server and exits at once, and Prefect stops the server at exit as before.
  On Linux the server also gets SIGTERM when the run's process dies (kill -9), instead of
  outliving it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import types
from pathlib import Path

from pipelines import locks

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _find_prctl():
    """libc's prctl, looked up here in the parent: between fork and exec the child may only make
    plain calls, and loading a library there (dlopen) can hang on a lock another thread of the
    parent held at the fork. None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()


def _die_with_parent() -> None:  # runs in the child between fork and exec: only the call
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _detached_popen(*args, **kwargs):
    kwargs.setdefault("start_new_session", True)
    # The parent-death signal follows the thread that forks, so only from the main thread,
    # which lives as long as the process. Without prctl the server may outlive a killed run.
    if _prctl is not None and threading.current_thread() is threading.main_thread():
        kwargs.setdefault("preexec_fn", _die_with_parent)
    return subprocess.Popen(*args, **kwargs)


def _detach_prefect_server() -> bool:
    """Make Prefect start its temporary server with _detached_popen (True when it can)."""
    from prefect.server.api import server as prefect_server

    current = getattr(prefect_server, "subprocess", None)
    if current is None or not hasattr(current, "Popen"):
        return False
    if getattr(current, "Popen", None) is not _detached_popen:
        prefect_server.subprocess = types.SimpleNamespace(
            **{**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")},
               "Popen": _detached_popen})
    return True


def start_prefect_server(workdir: Path) -> str | None:
    """Without PREFECT_API_URL: start this process's temporary Prefect server now, under
    `workdir`'s init lock (its URL); with it: nothing (None). Call before the first flow."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    if not _detach_prefect_server():
        log.warning("this Prefect version starts its temporary server differently; Ctrl-C will "
                    "also stop that server, and the run then takes minutes to exit")
    from prefect.server.api.server import SubprocessASGIServer

    with locks.workspace_init(workdir, on_wait=lambda owner: print(
            f"llamaflow: waiting for {locks.describe(owner)}, which is starting Prefect's "
            f"server on this workspace's database", flush=True)):
        server = SubprocessASGIServer()
        server.start()
    return server.api_url
