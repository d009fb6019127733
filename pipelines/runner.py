"""The thin wrapper that turns a step into a cached, tracked Prefect task.

For each stage call it: validates the stage config (before any work), computes the cache key
sha256(stage, version, resolved config, input digests), returns the stored artifact on a hit,
otherwise runs the step into a temp dir and renames it into place; and it records everything in
a nested MLflow run and in workspace/latest.json.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.artifacts import TMP_PREFIX, Artifact, HashCache, Store, cache_key
from pipelines.config import STAGES, ConfigError
from pipelines.locks import describe
from pipelines.remote import RemoteStore
from pipelines.tracking import Tracker, git_commit, redact
from pipelines.validate import FLOW_KEYS, get_all as _get, plan, set_at as _set, step_config

__all__ = ["FLOW_KEYS", "STAGES", "LifecycleRun", "StageNotCached"]

GPU_STAGES = {"pretrain", "sft", "evaluate"}


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
        # stages/force/--from; a single name (`stages=evaluate`) is one stage (ConfigError else)
        self.selected, self.force, self.last = plan(cfg, from_stage)
        self.results: dict[str, dict] = {}

    # -- the one call a flow makes per stage ------------------------------------------------
    def stage(self, name: str, *, label: str | None = None, group: str | None = None,
              config: dict | None = None, **inputs) -> Artifact | None:
        """Run (or fetch from the cache) stage `name` on `inputs` (Artifacts, lists or dicts of
        them). Returns None for stages after the last selected one."""
        group = group or name
        label = label or name
        if STAGES.index(group) > self.last:
            return None
        retries = int(self.cfg.get("retries", {}).get(name, 0))
        tags = ["llamaflow", f"stage:{group}"] + (["gpu"] if name in GPU_STAGES else [])
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
    key_cfg = _redact_strings(key_cfg)
    return module, config, key_cfg, data


def _run_stage(run: LifecycleRun, name: str, label: str, group: str, extra: dict,
               inputs: dict) -> Artifact:
    log = _logger()
    module, config, key_cfg, data = _step_config(run, name, extra)
    input_digests = _each_artifact(inputs, "digest")
    key = cache_key(name, module.VERSION, key_cfg, {"artifacts": input_digests, "data": data})

    def waiting(owner):
        log.info("%s: waiting for %s, which is computing this stage (key %s); this run then "
                 "takes its result from the cache", label, describe(owner), key[:12])

    # One run at a time owns this key, from the lookup to the commit: a second run started
    # together waits here and then finds the first one's artifact, instead of computing it again
    # and resuming from checkpoints the first is still writing.
    with run.store.key_lock(name, key, what=f"{label} in lifecycle run {run.parent_run_id}",
                            on_wait=waiting):
        return _run_stage_locked(run, log, module, config, key_cfg, data, key, name, label, group,
                                 inputs, input_digests)


def _run_stage_locked(run: LifecycleRun, log, module, config, key_cfg: dict, data: dict, key: str,
                      name: str, label: str, group: str, inputs: dict,
                      input_digests) -> Artifact:
    # Any temp dir of this key is a dead run's (the key lock is ours): it would only fill the disk
    for stale in sorted((run.store.root / name).glob(f"{TMP_PREFIX}{key[:16]}*")):
        shutil.rmtree(stale, ignore_errors=True)
        log.warning("%s: removed %s, left by a run that ended before finishing this stage",
                    label, stale)
    selected = group in run.selected
    forced = group in run.force
    damaged: list[str] = []
    hit = None if forced else run.store.lookup(name, key, warn=lambda m: (
        damaged.append(m), log.warning("%s", m)))
    cache = "forced" if forced else "hit" if hit else "miss"
    if hit is None and not forced and run.remote is not None and \
            run.remote.fetch(name, key, run.store.final_dir(name, key)):
        hit = run.store.lookup(name, key, warn=log.warning)
        # A fetched copy that fails the local check is computed here like any miss (and pushed)
        cache = "hit-remote" if hit is not None else "miss"
    if hit is None and not selected:
        raise StageNotCached(
            f"stage `{label}` is not selected (stages/--from) and has no cached artifact for this "
            f"configuration (key {key[:12]}); run it first, e.g. `llamaflow run stages=[{group}]` "
            "or without --from")

    tags = {"llamaflow.stage": name, "llamaflow.label": label, "llamaflow.cache_key": key,
            "llamaflow.cache": cache, "llamaflow.stage_version": module.VERSION,
            "llamaflow.input_digests": json.dumps(input_digests)[:5000], "git_commit": git_commit(),
            **({"llamaflow.damaged": " ".join(damaged)} if damaged else {})}
    run_id = run.tracker.start_run(label, parent=run.parent_run_id, tags=tags)
    tmp = None
    try:
        run.tracker.log_params(run_id, key_cfg)
        run.tracker.log_dict(run_id, key_cfg, "stage_config.json")
        t0 = time.time()
        if hit is not None:
            log.info("%s: cache hit %s (%s)", label, key[:12], hit.path)
            artifact = hit
            metrics = artifact.manifest.get("metrics", {})
        else:
            log.info("%s: cache %s, running (key %s)", label, cache, key[:12])
            tmp = run.store.new_tmp(name, key)
            monitor = run.tracker.system_metrics(run_id) if name in GPU_STAGES else None
            kwargs = dict(_each_artifact(inputs, "path"))
            params = inspect.signature(module.run).parameters
            if "resume_dir" in params:  # checkpoints survive a crash: the rerun of this key resumes
                kwargs["resume_dir"] = run.workdir / "scratch" / name / key[:16]
            if "data_cache_dir" in params:  # tokenized data, keyed by the step on data+tokenizer
                kwargs["data_cache_dir"] = run.workdir / "data_cache"
            try:
                metrics = module.run(config, tmp, on_metrics=lambda m, step:
                                     run.tracker.log_metrics(run_id, m, step), **kwargs) or {}
            finally:
                if monitor is not None:
                    monitor.finish()
            # forced (force=[...], --from): the new bytes replace the cached ones, never the
            # reverse, so a damaged artifact is repaired by forcing its stage
            artifact = run.store.commit(tmp, name, key, version=module.VERSION, config=key_cfg,
                                        inputs={"artifacts": input_digests, "data": data},
                                        metrics=metrics, extra={"label": label},
                                        digest_exclude=getattr(module, "DIGEST_EXCLUDE", ()),
                                        replace=forced)
            tmp = None
            if "resume_dir" in kwargs:  # finished: its checkpoints are no longer needed
                shutil.rmtree(kwargs["resume_dir"], ignore_errors=True)
        if run.remote is not None and cache != "hit-remote":  # share it (no-op if the bucket has it)
            try:
                run.remote.push(artifact)
            except Exception as e:  # the local result stands; other workers just don't get it yet
                log.warning("%s: push to %s failed: %s", label, run.remote.url, redact(str(e)))
        seconds = time.time() - t0
        size = sum(f["size"] for f in artifact.manifest["files"])
        speed = {} if hit else {"artifact_MB_per_s": size / 1e6 / max(seconds, 1e-9)}
        run.tracker.log_metrics(run_id, {**metrics, "stage_seconds": seconds,
                                         "artifact_bytes": size, **speed})
        run.tracker.set_tags(run_id, {"llamaflow.artifact_dir": str(artifact.path),
                                      "llamaflow.artifact_digest": artifact.digest})
        run.tracker.log_dict(run_id, artifact.manifest, "manifest.json")
        _log_small_files(run, run_id, artifact)
    except BaseException as e:
        if tmp is not None:  # first: on a full disk this is what frees the space to record it
            shutil.rmtree(tmp, ignore_errors=True)
        end_failed(run.tracker, run_id, e, log)
        if not hasattr(e, "llamaflow_stage"):  # for the one error line the command prints
            try:
                e.llamaflow_stage = label
            except AttributeError:  # an exception type with __slots__
                pass
        raise
    run.tracker.end_run(run_id)
    run.results[label] = {"stage": name, "artifact": str(artifact.path), "key": key,
                          "digest": artifact.digest, "cache": cache,
                          "mlflow_run_id": run_id, "seconds": round(seconds, 3)}
    run.write_latest()
    return artifact


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


def _log_small_files(run: LifecycleRun, run_id: str, artifact: Artifact) -> None:
    """Reports, tables, plots and small JSON go to MLflow; weights are referenced by path and
    digest (tags above) unless tracking.log_model_artifacts is on."""
    log_all = run.cfg.get("tracking", {}).get("log_model_artifacts", False)
    for f in artifact.manifest["files"]:
        p = artifact.path / f["path"]
        small = f["size"] <= 2 << 20 and p.suffix in {".json", ".jsonl", ".md", ".png", ".txt", ".yaml",
                                                       ".model"}  # .model: the SentencePiece tokenizer
        if small or log_all:
            run.tracker.log_file(run_id, p, str(Path(f["path"]).parent) if "/" in f["path"] else None)
        if p.name == "generations.jsonl":  # a table in the MLflow UI, for human review
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            run.tracker.log_table(run_id, [{k: v for k, v in r.items() if k != "output_ids"}
                                           for r in rows], "generations_table.json")
