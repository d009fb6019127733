"""The thin wrapper that turns a step into a cached, tracked Prefect task.

For each stage call it: validates the stage config (before any work), computes the cache key
sha256(stage, version, resolved config, input digests), returns the stored artifact on a hit,
otherwise runs the step into a temp dir and renames it into place; and it records everything in
a nested MLflow run and in workspace/latest.json. What it needs to know of a stage beyond the
protocol (a gpu, resuming, the data cache, tables to show) the stage declares in its STAGE
(steps/__init__.py); there is no stage name in this file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.artifacts import TMP_PREFIX, Artifact, HashCache, Store, cache_key
from pipelines.config import ConfigError
from pipelines.locks import describe
from pipelines.remote import RemoteStore
from pipelines.stages import declared, stage_order
from pipelines.tracking import Tracker, git_commit, redact
from pipelines.validate import get_all as _get, plan, set_at as _set, step_config
from steps import Stage

__all__ = ["LifecycleRun", "StageNotCached"]


class StageNotCached(RuntimeError):
    pass


def _worth_a_retry(task, task_run, state) -> bool:
    """Prefect's retry condition: a config problem, an uncached stage that is not selected or a
    file that is not what its format says (verified bytes, read again, fail again) fails the same
    way every time; only other errors (a dropped connection...) are retried."""
    from steps.meta import MetaFormatError

    return not isinstance(getattr(state, "data", None),
                          (ConfigError, StageNotCached, MetaFormatError))


def _logger() -> logging.Logger:
    try:
        return get_run_logger()
    except Exception:  # called outside a flow (unit tests of the runner)
        return logging.getLogger("pipelines")


class LifecycleRun:
    """State of one lifecycle run: config, plan, workspace, MLflow parent run, results so far."""

    def __init__(self, cfg: dict, tracker: Tracker, parent_run_id: str, from_stage: str | None = None):
        self.cfg = cfg
        self.workdir = Path(cfg["workdir"]).resolve()
        self.hashes = HashCache(self.workdir / "hashcache.json")
        self.store = Store(self.workdir / "artifacts", self.hashes)
        remote = (cfg.get("storage") or {}).get("remote")  # a shared cache in a bucket, if set
        self.remote = RemoteStore(remote) if remote else None
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        # stages/force/--from; a single name (`stages=NAME`) is one stage (ConfigError else)
        self.selected, self.force, self.last = plan(cfg, from_stage)
        self.results: dict[str, dict] = {}

    # -- the one call a flow makes per stage ------------------------------------------------
    def stage(self, name: str, *, label: str | None = None, config: dict | None = None,
              **inputs) -> Artifact | None:
        """Run (or fetch from the cache) stage `name` on `inputs` (Artifacts, lists or dicts of
        them; an input given as None is left out, as if not given). Returns None for stages
        after the last selected one."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        declaration = declared(name)
        group = declaration.part_of or name   # what stages/force/--from call it
        label = label or name
        if stage_order().index(group) > self.last:
            return None
        retries = int(self.cfg.get("retries", {}).get(name, 0))
        tags = ["llamaflow", f"stage:{group}"] + (["gpu"] if declaration.gpu else [])
        t = task(name=label, retries=retries, retry_delay_seconds=5, cache_policy=NO_CACHE,
                 tags=tags, retry_condition_fn=_worth_a_retry)(_run_stage)
        return t(self, name, label, group, config or {}, inputs)

    def write_latest(self) -> Path:
        path = self.workdir / "latest.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two runs may write it at once
        tmp.write_text(json.dumps({"mlflow_parent_run_id": self.parent_run_id,
                                   "stages": self.results}, indent=1))
        os.replace(tmp, path)
        return path


def _each_artifact(x, attr: str):
    """`x` (an Artifact, or lists and dicts holding them) with every Artifact replaced by its
    `attr` ("path" or "digest")."""
    if isinstance(x, Artifact):
        return getattr(x, attr)
    if isinstance(x, (list, tuple)):
        return [_each_artifact(v, attr) for v in x]
    if isinstance(x, dict):
        return {k: _each_artifact(v, attr) for k, v in x.items()}
    return x


def _redact_strings(x):
    if isinstance(x, dict):
        return {k: _redact_strings(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_redact_strings(v) for v in x]
    return redact(x) if isinstance(x, str) else x


def _step_config(run: LifecycleRun, name: str, extra: dict):
    """The validated step Config, the dict for the cache key (data paths replaced by their
    content digests, URLs redacted, excluded knobs dropped) and the data digests. The flow has
    validated every stage before the first task (pipelines/validate.py); this is the same check
    for this one stage, so a task never runs on a config it did not check."""
    module, config, _, paths = step_config(run.cfg, name, extra)
    data = {key: [run.hashes.any(Path(v)) for v in values] for key, values in paths.items()}
    # A step may say how it is shown (public_config: e.g. a URL from url_env, redacted).
    public = getattr(module, "public_config", None)
    key_cfg = json.loads(json.dumps(public(config) if public else config.model_dump(mode="json"),
                                    default=str))
    for key in data:
        _set(key_cfg, key, [f"sha256:{d}" for d in data[key]])
    for dotted in getattr(module, "CACHE_EXCLUDE", ()):  # knobs that never change the output
        parent, _, leaf = dotted.rpartition(".")
        found = _get(key_cfg, parent) if parent else [("", key_cfg)]
        node = found[0][1] if found else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    # settings added after artifacts were cached: at their default they leave the key as it was,
    # so adding a knob does not recompute (hours of training) what it would not change
    for leaf, default in getattr(module, "CACHE_OMIT_AT_DEFAULT", {}).items():
        if key_cfg.get(leaf, default) == default:
            key_cfg.pop(leaf, None)
    key_cfg = _redact_strings(key_cfg)
    return module, config, key_cfg, data


@dataclass
class _Call:
    """One stage call with its validated config and cache key."""
    run: LifecycleRun
    log: logging.Logger
    name: str
    label: str
    group: str
    module: ModuleType
    config: object            # the step's validated Config
    key_cfg: dict             # the config as keyed and logged
    data: dict                # data-file digests by config key
    inputs: dict
    input_digests: object
    key: str

    @property
    def stage(self) -> Stage:
        return self.module.STAGE

    @property
    def resume_dir(self) -> Path:
        """Where a resumable step keeps its checkpoints for this key."""
        return self.run.workdir / "scratch" / self.name / self.key[:16]

    def waiting(self, owner) -> None:
        self.log.info("%s: waiting for %s, which is computing this stage (key %s); this run "
                      "then takes its result from the cache", self.label, describe(owner),
                      self.key[:12])


def _run_stage(run: LifecycleRun, name: str, label: str, group: str, extra: dict,
               inputs: dict) -> Artifact:
    """The task: validate and key the call; then, holding the key, hit or run, commit, record."""
    call = _keyed(run, name, label, group, extra, inputs)
    # One run at a time owns this key, from the lookup to the commit: a second run started
    # together waits here and then finds the first one's artifact, instead of computing it again
    # and resuming from checkpoints the first is still writing.
    with run.store.key_lock(name, call.key, what=f"{label} in lifecycle run {run.parent_run_id}",
                            on_wait=call.waiting):
        _remove_dead_runs_tmps(call)
        hit, cache, damaged = _lookup(call)
        return _tracked(call, hit, cache, damaged)


def _keyed(run: LifecycleRun, name: str, label: str, group: str, extra: dict,
           inputs: dict) -> _Call:
    """Validate the stage config and compute the cache key: sha256(stage, version, config,
    input artifact and data digests)."""
    module, config, key_cfg, data = _step_config(run, name, extra)
    input_digests = _each_artifact(inputs, "digest")
    key = cache_key(name, module.VERSION, key_cfg, {"artifacts": input_digests, "data": data})
    return _Call(run, _logger(), name, label, group, module, config, key_cfg, data, inputs,
                 input_digests, key)


def _remove_dead_runs_tmps(call: _Call) -> None:
    # Any temp dir of this key is a dead run's (the key lock is ours): it would only fill the disk
    for stale in sorted((call.run.store.root / call.name).glob(f"{TMP_PREFIX}{call.key[:16]}*")):
        shutil.rmtree(stale, ignore_errors=True)
        call.log.warning("%s: removed %s, left by a run that ended before finishing this stage",
                         call.label, stale)


def _lookup(call: _Call) -> tuple[Artifact | None, str, list[str]]:
    """The cached artifact (here, else fetched from the bucket) or None, the cache outcome
    (forced, hit, hit-remote, miss) and the damage found on the way; StageNotCached when there
    is none and the stage is not selected to run."""
    run, name, key = call.run, call.name, call.key
    forced = call.group in run.force
    damaged: list[str] = []
    hit = None if forced else run.store.lookup(name, key, warn=lambda m: (
        damaged.append(m), call.log.warning("%s", m)))
    cache = "forced" if forced else "hit" if hit else "miss"
    if hit is None and not forced and run.remote is not None and \
            run.remote.fetch(name, key, run.store.final_dir(name, key)):
        hit = run.store.lookup(name, key, warn=call.log.warning)
        # A fetched copy that fails the local check is computed here like any miss (and pushed)
        cache = "hit-remote" if hit is not None else "miss"
    if hit is not None and (why := _not_reusable(call, hit)):
        call.log.warning("%s: the cached result %s is not reused (%s): computing it again",
                         call.label, key[:12], why)
        hit, cache = None, "retried"
    if hit is None and call.group not in run.selected:
        raise StageNotCached(
            f"stage `{call.label}` is not selected (stages/--from) and has no cached artifact for "
            f"this configuration (key {key[:12]}); run it first, e.g. `llamaflow run "
            f"stages=[{call.group}]` or without --from")
    return hit, cache, damaged


def _not_reusable(call: _Call, hit: Artifact) -> str | None:
    """Why a stored artifact must not be reused, as its stage says (`not_reusable(path)`, e.g. the
    judge's when its endpoint was down: a rerun should ask again, not repeat the failure)."""
    check = getattr(call.module, "not_reusable", None)
    return check(hit.path) if check is not None else None


def _tracked(call: _Call, hit: Artifact | None, cache: str, damaged: list[str]) -> Artifact:
    """Hit or run, commit, share and record, in the stage's own MLflow run (ended FAILED, or
    KILLED on Ctrl-C, when any of it fails); then the stage's entry in latest.json."""
    tracker = call.run.tracker
    run_id = tracker.start_run(call.label, parent=call.run.parent_run_id,
                               tags=_run_tags(call, cache, damaged))
    try:
        tracker.log_params(run_id, call.key_cfg)
        tracker.log_dict(run_id, call.key_cfg, "stage_config.json")
        t0 = time.time()
        artifact, metrics = _hit_or_run(call, run_id, hit, cache)
        _share(call, artifact, cache)
        seconds = time.time() - t0
        _record(call, run_id, artifact, metrics, seconds, hit)
    except BaseException as e:
        _record_failure(call, run_id, e)
        raise
    tracker.end_run(run_id)
    call.run.results[call.label] = {
        "stage": call.name, "artifact": str(artifact.path), "key": call.key,
        "digest": artifact.digest, "cache": cache, "mlflow_run_id": run_id,
        "seconds": round(seconds, 3)}
    call.run.write_latest()
    return artifact


def _run_tags(call: _Call, cache: str, damaged: list[str]) -> dict:
    return {"llamaflow.stage": call.name, "llamaflow.label": call.label,
            "llamaflow.cache_key": call.key, "llamaflow.cache": cache,
            "llamaflow.stage_version": call.module.VERSION,
            "llamaflow.input_digests": json.dumps(call.input_digests)[:5000],
            "git_commit": git_commit(),
            **({"llamaflow.damaged": " ".join(damaged)} if damaged else {})}


def _hit_or_run(call: _Call, run_id: str, hit: Artifact | None,
                cache: str) -> tuple[Artifact, dict]:
    """The hit, or the step run into a temp dir and committed: the artifact and its metrics."""
    if hit is not None:
        call.log.info("%s: cache hit %s (%s)", call.label, call.key[:12], hit.path)
        return hit, hit.manifest.get("metrics", {})
    call.log.info("%s: cache %s, running (key %s)", call.label, cache, call.key[:12])
    tmp = call.run.store.new_tmp(call.name, call.key)
    try:
        metrics = _run_step(call, run_id, tmp)
        artifact = _commit(call, tmp, metrics, forced=cache in ("forced", "retried"))
    except BaseException:  # first: on a full disk this is what frees the space to record it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if call.stage.resumable:  # finished: its checkpoints are no longer needed
        shutil.rmtree(call.resume_dir, ignore_errors=True)
    return artifact, metrics


def _run_step(call: _Call, run_id: str, out_dir: Path) -> dict:
    """The step's run() into `out_dir`, its step-wise metrics streamed to MLflow."""
    tracker = call.run.tracker
    monitor = tracker.system_metrics(run_id) if call.stage.gpu else None
    kwargs = dict(_each_artifact(call.inputs, "path"))
    if call.stage.resumable:  # checkpoints survive a crash: the rerun of this key resumes
        kwargs["resume_dir"] = call.resume_dir
    if call.stage.data_cache:  # tokenized data, keyed by the step on data+tokenizer
        kwargs["data_cache_dir"] = call.run.workdir / "data_cache"
    try:
        return call.module.run(call.config, out_dir, on_metrics=lambda m, step:
                               tracker.log_metrics(run_id, m, step), **kwargs) or {}
    finally:
        if monitor is not None:
            monitor.finish()


def _commit(call: _Call, tmp: Path, metrics: dict, forced: bool) -> Artifact:
    # forced (force=[...], --from): the new bytes replace the cached ones, never the
    # reverse, so a damaged artifact is repaired by forcing its stage
    return call.run.store.commit(tmp, call.name, call.key, version=call.module.VERSION,
                                 config=call.key_cfg,
                                 inputs={"artifacts": call.input_digests, "data": call.data},
                                 metrics=metrics, extra={"label": call.label},
                                 digest_exclude=getattr(call.module, "DIGEST_EXCLUDE", ()),
                                 replace=forced)


def _share(call: _Call, artifact: Artifact, cache: str) -> None:
    """Push the artifact to the bucket, if there is one (a no-op if the bucket has it)."""
    remote = call.run.remote
    if remote is not None and cache != "hit-remote":
        try:
            remote.push(artifact)
        except Exception as e:  # the local result stands; other workers just don't get it yet
            call.log.warning("%s: push to %s failed: %s", call.label, remote.url, redact(str(e)))


def _record(call: _Call, run_id: str, artifact: Artifact, metrics: dict, seconds: float,
            hit: Artifact | None) -> None:
    """Metrics, the artifact's dir, digest and manifest, and its small files on the MLflow run."""
    tracker = call.run.tracker
    size = sum(f["size"] for f in artifact.manifest["files"])
    speed = {} if hit else {"artifact_MB_per_s": size / 1e6 / max(seconds, 1e-9)}
    tracker.log_metrics(run_id, {**metrics, "stage_seconds": seconds, "artifact_bytes": size,
                                 **speed})
    tracker.set_tags(run_id, {"llamaflow.artifact_dir": str(artifact.path),
                              "llamaflow.artifact_digest": artifact.digest})
    tracker.log_dict(run_id, artifact.manifest, "manifest.json")
    _log_small_files(call.run, run_id, artifact, call.stage.tables)
    if call.stage.review:  # answers a person can score: MLflow traces (pipelines/reviews.py)
        try:
            from pipelines import reviews

            reviews.ensure_traces(tracker, run_id, call.label, artifact, call.stage.review)
        except Exception as e:  # the stage's result stands; only the review is missing
            call.log.warning("%s: could not log its generations as MLflow traces: %s",
                             call.label, redact(str(e)))


def _record_failure(call: _Call, run_id: str, e: BaseException) -> None:
    end_failed(call.run.tracker, run_id, e, call.log)
    if not hasattr(e, "llamaflow_stage"):  # for the one error line the command prints
        try:
            e.llamaflow_stage = call.label
        except AttributeError:  # an exception type with __slots__
            pass


def end_failed(tracker: Tracker, run_id: str, error: BaseException, log) -> None:
    """End an MLflow run FAILED (KILLED on Ctrl-C) with the error as its `llamaflow.error` tag.
    Each write is tried on its own: when recording the error fails too (a full disk), the status
    must still change, or the run stays RUNNING for ever."""
    status = "FAILED" if isinstance(error, Exception) else "KILLED"
    try:
        tracker.set_tags(run_id, {"llamaflow.error": redact(
            "".join(traceback.format_exception_only(error)))})
    except Exception as e:
        log.warning("could not record the error on MLflow run %s: %s", run_id, e)
    try:
        tracker.end_run(run_id, status)
    except Exception as e:
        log.error("could not mark MLflow run %s %s: %s", run_id, status, e)


def _log_small_files(run: LifecycleRun, run_id: str, artifact: Artifact,
                     tables: dict[str, tuple[str, ...]]) -> None:
    """Reports, tables, plots and small JSON go to MLflow; weights are referenced by path and
    digest (tags above) unless tracking.log_model_artifacts is on. `tables`: the stage's JSON
    Lines files that are also shown as a table (each with the columns it leaves out)."""
    log_all = run.cfg.get("tracking", {}).get("log_model_artifacts", False)
    for f in artifact.manifest["files"]:
        p = artifact.path / f["path"]
        small = f["size"] <= 2 << 20 and p.suffix in {".json", ".jsonl", ".md", ".png", ".txt", ".yaml",
                                                       ".model"}  # .model: the SentencePiece tokenizer
        if small or log_all:
            run.tracker.log_file(run_id, p, str(Path(f["path"]).parent) if "/" in f["path"] else None)
        if p.name in tables:  # a table in the MLflow UI, for human review
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            run.tracker.log_table(run_id, [{k: v for k, v in r.items() if k not in tables[p.name]}
                                           for r in rows], f"{p.stem}_table.json")
