"""MLflow tracking: one parent run per lifecycle run, one nested run per stage.

Runs are addressed by id through MlflowClient (no fluent "active run" state), so stages running in
Prefect's worker threads never log into each other's runs. The embedded default is SQLite in the
workspace (MLflow 3 rejects the old ./mlruns file store); MLFLOW_TRACKING_URI points the same code
at a server.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from pipelines import locks

log = logging.getLogger(__name__)

PARAM_MAX = 6000          # MLflow's limit on a param value
BATCH = 100               # params per log_batch call
URL = re.compile(r"https?://[^\s'\"<>]+")
# Any other scheme (postgresql://, mysql://, s3://...): only userinfo and a query string go, so a
# sqlite:////abs/path or file:/// URI stays as it is.
OTHER_URI = re.compile(r"\b(?!https?://)([a-z][a-z0-9+.-]*://)([^\s/'\"<>@]*@)?([^\s?'\"<>#]*)"
                       r"(?:[?#][^\s'\"<>]*)?")
PID_TAG, HOST_TAG, PID_STARTED_TAG = "llamaflow.pid", "llamaflow.host", "llamaflow.pid_started"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI (None for servers, in-memory)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def redact(value):
    """Every URL in a string without userinfo, query string and fragment (signatures, tokens):
    the same rule the download stage applies to its own logs."""
    from steps.download import redact as redact_url

    if isinstance(value, str):
        value = URL.sub(lambda m: redact_url(m.group(0)), value)
        return OTHER_URI.sub(lambda m: m.group(1) + m.group(3), value)
    return value


def metric_name(key: str) -> str:
    """MLflow allows alphanumerics, _ - . space : / in metric names ("base-zh+pt" → "base-zh_pt")."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple)) else str(v)
            out[key] = redact(text)[:PARAM_MAX]
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def ctrl_c_deferred():
    """Ctrl-C held back until the block has ended, then delivered as it would have been.

    A KeyboardInterrupt raised inside an MLflow write to SQLite leaves its connection holding
    the database's write lock: every later write, the one that records the run as KILLED
    included, then waits out SQLite's busy timeout and fails ("database is locked"), and the
    interrupted run took over a minute to exit. Writes are short, so they finish first."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):   # ignored, default, or set outside Python: leave it alone
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(signal.SIGINT, caught[0])  # Python's own handler raises KeyboardInterrupt


class _Uninterrupted:
    """An MlflowClient on SQLite whose calls run with Ctrl-C deferred (ctrl_c_deferred), but
    for artifact uploads: they write files, not the database, and can take minutes."""

    LONG = ("log_artifact", "log_artifacts")

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr) or name in self.LONG:
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with ctrl_c_deferred():
                return attr(*args, **kwargs)
        return call


class Tracker:
    def __init__(self, workdir: Path, cfg: dict):
        self.workdir = Path(workdir).resolve()
        self.cfg = cfg
        self.uri = cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{self.workdir / 'mlflow.db'}"
        self.experiment_name = cfg.get("experiment", "llamaflow")
        db = _sqlite_path(self.uri)
        if db is None:  # a server creates its own database, once; no SQLite lock to strand
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment()
        else:
            # The first use of a SQLite file (MlflowClient() itself) creates and migrates its
            # tables; two runs doing it at once break it ("table _alembic_tmp_experiments
            # already exists"). Whoever comes first does it under the lock beside the file (the
            # workspace's .init.lock by default); the other waits and then finds it all made.
            db.parent.mkdir(parents=True, exist_ok=True)
            with locks.hold(db.parent / locks.INIT_LOCK, what="creating the MLflow database",
                            on_wait=lambda owner: log.info(
                                "waiting for %s to create the MLflow database %s",
                                locks.describe(owner), db)):
                self.client = _Uninterrupted(MlflowClient(tracking_uri=self.uri))
                self.experiment_id = self._experiment()
                self.client.search_registered_models(max_results=1)  # the registry's store too

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = (self.workdir / "mlartifacts").as_uri()
        return self.client.create_experiment(self.experiment_name, artifact_location=location)

    def start_run(self, name: str, *, parent: str | None = None, tags: dict | None = None) -> str:
        """A RUNNING run tagged with the process that owns it (llamaflow.pid/.host/.pid_started),
        so a later run can tell one whose process died (kill -9) from one still going."""
        owner = locks.me()
        tags = {k: redact(str(v)) for k, v in (tags or {}).items()} | {
            PID_TAG: str(owner["pid"]), HOST_TAG: owner["host"],
            PID_STARTED_TAG: repr(owner["started"])}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def fail_orphans(self) -> list[str]:
        """End FAILED every run of this experiment still RUNNING whose owning process, on this
        host, is gone (killed, or it died before it could record anything); returns what was
        done, one line per run. Runs of other hosts, and runs made before the owner was
        recorded, are left alone: nothing here can tell whether they still run."""
        done = []
        for r in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                         max_results=5000):
            t = r.data.tags
            if PID_TAG not in t:
                continue
            try:
                started = float(t.get(PID_STARTED_TAG, "None"))
            except ValueError:
                started = None
            owner = {"pid": t[PID_TAG], "host": t.get(HOST_TAG), "started": started}
            if locks.owner_alive(owner) is not False:
                continue
            what = (f"process {owner['pid']} on {owner['host']} ended without recording how the "
                    "run ended (killed?); marked FAILED by a later run")
            self.set_tags(r.info.run_id, {"llamaflow.error": what})
            self.end_run(r.info.run_id, "FAILED")
            done.append(f"MLflow run {r.info.run_id} ({r.info.run_name}): {what}")
        return done

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k[:250], v) for k, v in flatten(params).items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[i:i + BATCH])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()])

    def log_dict(self, run_id: str, data, name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, rows: list[dict], name: str) -> None:
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            self.client.log_table(run_id, {c: [r.get(c) for r in rows] for c in cols}, name)

    def system_metrics(self, run_id: str):
        """A started MLflow system-metrics monitor (CPU, memory, GPU when nvidia-ml-py is there)
        for the run, or None when turned off in tracking config."""
        if not self.cfg.get("system_metrics", True):
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=self.cfg.get("system_metrics_interval", 5),
                                   tracking_uri=self.uri)
        mon.start()
        return mon

    def register_version(self, name: str, source: str, *, run_id: str | None, digest: str,
                         tags: dict) -> str:
        """The version of registered model `name` whose `llamaflow.digest` tag is `digest`, made
        now (source, run, tags) unless one exists: a rerun that made the same bytes reuses it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description=(
                "Merged models made by llamaflow runs (base-zh + adapters); each version's source "
                "is an artifact directory, its tags the content digest and cache key."))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for v in self.client.search_model_versions(f"name = '{name}'"):
            if v.tags.get("llamaflow.digest") == digest:
                return v.version
        tags = {"llamaflow.digest": digest, **{k: redact(str(v)) for k, v in tags.items()}}
        return self.client.create_model_version(name, source=source, run_id=run_id,
                                                tags=tags).version

    def run_url(self, run_id: str) -> str:
        base = redact(self.uri) if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
