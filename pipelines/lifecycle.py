"""The whole LLaMA lifecycle as one Prefect flow: a short list of stage calls.

Each `run.stage(...)` is a cached, tracked Prefect task (pipelines/runner.py); the step that
does the work is `steps/<stage>.py`. To add a stage: write steps/<name>.py (the stage protocol
in steps/__init__.py, its STAGE included), add its line to conf/config.yaml's `defaults:`
(where it runs in the order) and generate conf/<name>/default.yaml from its Config with
`llamaflow config --write-defaults`, and call it here: one line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from pipelines import locks, reviews
from pipelines.config import to_yaml
from pipelines.runner import LifecycleRun, end_failed
from pipelines.tracking import Tracker, flatten, git_commit, redact
from pipelines.validate import check
from steps.evaluate import kld_reference
from steps.quantize import uses_imatrix


def lifecycle_steps(run: LifecycleRun) -> None:
    """source → meta → hf → hf-zh → lora-pt → lora-sft → merged → gguf → evaluation report."""
    meta = run.stage("download")
    hf = run.stage("convert", meta=meta)
    zh = run.stage("vocab", model=hf)
    pt = run.stage("pretrain", model=zh)
    sft = run.stage("sft", model=zh, adapters=[pt])
    merged = run.stage("merge", base=zh, adapters=[pt, sft])

    # f16 is exported from the HF weights; every other type is llama.cpp-quantized from it,
    # with the importance matrix of f16 on calibration text where the type asks for one.
    f16 = run.stage("quantize", label="quantize[f16]", config={"qtype": "f16"}, model=merged)
    types = [q for q in run.cfg["quantize"]["types"] if q != "f16"]
    imatrix = run.stage("imatrix", gguf=f16) if any(map(uses_imatrix, types)) else None
    ggufs = {"f16": f16} | {
        q: run.stage("quantize", label=f"quantize[{q}]", config={"qtype": q}, gguf=f16,
                     imatrix=imatrix if uses_imatrix(q) else None)
        for q in types}

    candidates = {"base": (hf, []), "base-zh": (zh, []), "base-zh+pt": (zh, [pt]),
                  "merged": (merged, [])} | {f"gguf-{q}": (g, []) for q, g in ggufs.items()}
    wanted, ref = run.cfg["evaluate"]["models"], kld_reference(run.cfg["evaluate"])
    evaluations = {   # each GGUF also by its KL divergence from the reference's distributions
        name: run.stage("evaluate", label=f"evaluate[{name}]", model=model, adapters=adapters,
                        reference=candidates[ref][0] if ref and name.startswith("gguf-")
                        and name != ref else None)
        for name, (model, adapters) in candidates.items()
        if name in wanted or (name.startswith("gguf-") and "gguf" in wanted)}
    speeds = {f"gguf-{q}": run.stage("speed", label=f"speed[{q}]", gguf=g)
              for q, g in ggufs.items()} if run.cfg["speed"]["enabled"] else {}
    judge = run.cfg["judge"]   # the answers judged by a chat model, e.g. one of these GGUFs
    judged = run.stage("judge", generations=evaluations, judge_model=candidates[judge[
        "local_model"]][0] if judge["local_model"] else None) if judge["enabled"] else None
    # people's scores so far (`llamaflow review`): new ones recompute the report, nothing else
    run.stage("report", evaluations=evaluations, training={"pretrain": pt, "sft": sft},
              quantized=ggufs, vocab=zh, speeds=speeds, judge=judged,
              config={"reviews": reviews.snapshot(run, evaluations)})


@flow(name="lifecycle")
def lifecycle(overrides: list[str] | None = None, from_stage: str | None = None) -> dict:
    """Compose the config from conf/ + `overrides` (Hydra syntax, e.g. ["recipe=demo",
    "pretrain.lora.r=16", "stages=[quantize,evaluate]", "force=[sft]"]) and run the lifecycle.
    `from_stage` reruns that stage and everything after it; upstream comes from the cache."""
    overrides = list(overrides or [])
    log = get_run_logger()
    # Every stage's config and files before anything is written (no workspace, no MLflow run):
    # one ConfigError with every problem, which no retry could fix.
    cfg, checked = check(overrides, from_stage)
    log.info("config OK: %d stages checked", len(checked))
    workdir = Path(cfg["workdir"]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg["workdir"] = str(workdir)

    tracker = Tracker(workdir, cfg.get("tracking", {}))
    flow_run_id = str(runtime.flow_run.id or "")
    run_name = cfg.get("run_name") or runtime.flow_run.name or "lifecycle"
    parent = tracker.start_run(run_name, tags={
        "prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": runtime.flow_run.name or "",
        "prefect.flow_run_url": runtime.flow_run.ui_url or "", "git_commit": git_commit(),
        "llamaflow.overrides": " ".join(overrides), "llamaflow.from_stage": from_stage or ""})
    tracker.log_params(parent, {"overrides": overrides, **flatten(
        {k: v for k, v in cfg.items() if k not in {"workdir"}})})
    tracker.log_text(parent, redact(to_yaml(cfg)), "config.yaml")
    log.info("MLflow parent run %s (%s); workspace %s", parent, redact(tracker.uri), workdir)
    try:
        _tag_flow_run_with_owner()
    except Exception as e:  # only the crash detection of a later run depends on it
        log.warning("could not tag the Prefect flow run with its process: %s", e)
    if os.environ.get("PREFECT_API_URL"):
        create_link_artifact(link=tracker.run_url(parent), link_text="MLflow run",
                             key="mlflow-run", description="The MLflow parent run of this flow run")

    try:
        run = LifecycleRun(cfg, tracker, parent, from_stage=from_stage)
    except BaseException as e:  # a bad stage list or an unreachable bucket: the parent run failed too
        end_failed(tracker, parent, e, log)
        raise
    _clear_what_dead_runs_left(run, log)
    try:
        lifecycle_steps(run)
        run.write_latest()
        _summarise(run, tracker, parent)
    except BaseException as e:
        # Every step of the wrap-up on its own: when one fails (a full disk), the others, and
        # above all the parent's status, still happen.
        _wrap_up(run, tracker, parent, log, everything=True)
        end_failed(tracker, parent, e, log)
        raise
    _wrap_up(run, tracker, parent, log, everything=False)
    tracker.end_run(parent, "FINISHED")
    report = Path(run.results["report"]["artifact"]) if "report" in run.results else None
    return {"mlflow_parent_run_id": parent, "workdir": str(workdir), "stages": run.results,
            "mlflow_run_url": tracker.run_url(parent), "mlflow_uri": redact(tracker.uri),
            # without a Prefect UI (the temporary server) Prefect builds "None/flow-runs/..."
            "prefect_flow_run_url": url if (url := runtime.flow_run.ui_url or "").startswith(
                "http") else None,
            "report": str(report / "report.md") if report is not None else None,
            "gates": _gates(run)}


def _wrap_up(run: LifecycleRun, tracker: Tracker, parent: str, log, everything: bool) -> None:
    """latest.json and the stage summary (when `everything`: a failed run's), then the report
    and the registry; a failure of one is a warning, never the run's outcome."""
    steps = []
    if everything:
        steps = [("write latest.json", run.write_latest),
                 ("summarise the stages", lambda: _summarise(run, tracker, parent))]
    steps += [("publish the report", lambda: _publish_report(run, tracker, parent)),
              # e.g. a server refusing a local path
              ("register the merged model", lambda: _register_merged(run, tracker, parent))]
    for what, step in steps:
        try:
            step()
        except Exception as e:
            log.warning("could not %s: %s", what, redact(str(e)))


def _clear_what_dead_runs_left(run: LifecycleRun, log) -> None:
    """A run killed with -9 (or by the OOM killer) records nothing: its MLflow runs and Prefect
    flow run stay RUNNING and its temp dirs stay on disk. Each run, as it starts, ends those of
    dead processes on this host and removes temp dirs no live run owns, and says so."""
    try:
        for line in run.tracker.fail_orphans():
            log.warning("%s", line)
    except Exception as e:  # a tidy-up: never a reason for this run to fail
        log.warning("could not check for MLflow runs left RUNNING by dead processes: %s", e)
    try:
        for line in _crash_orphaned_flow_runs():
            log.warning("%s", line)
    except Exception as e:
        log.warning("could not check for Prefect flow runs left RUNNING by dead processes: %s", e)
    try:
        for tmp in run.store.stale_tmps():
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("removed %s, left by a run that ended before finishing that stage", tmp)
    except Exception as e:  # e.g. a lock file this user may not open in a shared workspace
        log.warning("could not check for temp dirs left by dead runs: %s", e)


def _tag_flow_run_with_owner() -> None:
    """This flow run's tags name its process (llamaflow.pid:/host:/pid_started:), so that a
    later run can tell it crashed when the process is gone and it is still RUNNING."""
    from prefect.client.orchestration import get_client

    flow_run_id = runtime.flow_run.id
    if not flow_run_id:
        return
    owner = locks.me()
    tags = [t for t in (runtime.flow_run.tags or []) if not t.startswith(_OWNER_TAG_PREFIXES)]
    tags += [f"llamaflow.pid:{owner['pid']}", f"llamaflow.host:{owner['host']}",
             f"llamaflow.pid_started:{owner['started']!r}"]
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, tags=tags)


_OWNER_TAG_PREFIXES = ("llamaflow.pid:", "llamaflow.host:", "llamaflow.pid_started:")


def _crash_orphaned_flow_runs() -> list[str]:
    """Set CRASHED every RUNNING Prefect flow run (and its RUNNING task runs) whose owner tags
    name a process on this host that is gone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType, TaskRunFilter,
        TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    done = []
    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    with get_client(sync_client=True) as client:
        for fr in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=running),
                                         limit=200):
            tags = dict(t.split(":", 1) for t in fr.tags if t.startswith(_OWNER_TAG_PREFIXES))
            if "llamaflow.pid" not in tags:
                continue
            try:
                started = float(tags.get("llamaflow.pid_started", "None"))
            except ValueError:
                started = None
            owner = {"pid": tags["llamaflow.pid"], "host": tags.get("llamaflow.host"),
                     "started": started}
            if locks.owner_alive(owner) is not False:
                continue
            why = (f"process {owner['pid']} on {owner['host']} is gone and the run was still "
                   "RUNNING (killed?); marked CRASHED by a later run")
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                    type=TaskRunFilterStateType(any_=[StateType.RUNNING]))))
            for tr in tasks:
                client.set_task_run_state(tr.id, Crashed(message=why), force=True)
            client.set_flow_run_state(fr.id, Crashed(message=why), force=True)
            done.append(f"Prefect flow run {fr.name} ({fr.id}): {why}")
    return done


def _publish_report(run: LifecycleRun, tracker: Tracker, parent: str) -> None:
    """The evaluation report on the parent run (MLflow files + the gates tag) and as a Prefect
    markdown artifact, so both UIs open on the comparison table."""
    if "report" not in run.results:
        return
    report_dir = Path(run.results["report"]["artifact"])
    for f in sorted(report_dir.iterdir()):
        if f.name != "manifest.json":
            tracker.log_file(parent, f, "report")
    if (report_dir / "gates.json").is_file():
        passed = _gates_passed(run)
        tracker.set_tags(parent, {"llamaflow.gates_passed":
                                  "not checked" if passed is None else passed})
    md = report_dir / "report.md"
    if md.is_file():
        text = md.read_text()
        # Prefect renders markdown without our PNGs; point at where they are instead.
        text = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", lambda m: f"`{report_dir / m.group(2)}`", text)
        create_markdown_artifact(markdown=text, key="lifecycle-report",
                                 description="Every model x every eval set, quant table, gates")


def _gates(run: LifecycleRun) -> dict | None:
    """The report's gates.json (verdict and checks), or None when no report was made."""
    if "report" not in run.results:
        return None
    gates = Path(run.results["report"]["artifact"]) / "gates.json"
    return json.loads(gates.read_text()) if gates.is_file() else None


def _gates_passed(run: LifecycleRun) -> bool | None:
    """The report's verdict: True/False, or None when no gate was checked or no report was made."""
    return (_gates(run) or {}).get("passed")


REGISTRY_ALIAS_NEWEST = "candidate"      # the merged model of the newest run that made one
REGISTRY_ALIAS_GATED = "champion"        # ... of the newest run whose report gates all passed


def _register_merged(run: LifecycleRun, tracker: Tracker, parent: str) -> None:
    """tracking.registered_model: the merged model as a version of that MLflow registered model
    (source: its artifact dir, or its copy in the bucket when storage.remote is set), alias
    `candidate` on it, and `champion` too when the report checked gates and all passed."""
    name = (run.cfg.get("tracking") or {}).get("registered_model")
    merged = run.results.get("merge")
    if not name or merged is None:
        return
    source = run.remote.artifact_url("merge", merged["key"]) if run.remote is not None \
        else str(Path(merged["artifact"]).resolve())
    version = tracker.register_version(
        name, source, run_id=merged["mlflow_run_id"], digest=merged["digest"],
        tags={"llamaflow.cache_key": merged["key"], "llamaflow.parent_run_id": parent})
    tracker.client.set_registered_model_alias(name, REGISTRY_ALIAS_NEWEST, version)
    aliases = [REGISTRY_ALIAS_NEWEST]
    if _gates_passed(run) is True:
        tracker.client.set_registered_model_alias(name, REGISTRY_ALIAS_GATED, version)
        aliases.append(REGISTRY_ALIAS_GATED)
    tracker.set_tags(parent, {"llamaflow.registered_model": f"{name}/{version}"})
    get_run_logger().info("merged model registered as %s version %s (%s)", name, version,
                          ", ".join(aliases))


def _summarise(run: LifecycleRun, tracker: Tracker, parent: str) -> None:
    rows = [{"stage": label, **{k: r[k] for k in ("cache", "seconds", "digest", "artifact")}}
            for label, r in run.results.items()]
    tracker.log_table(parent, rows, "stages.json")
    hits = sum(r["cache"].startswith("hit") for r in run.results.values())
    tracker.log_metrics(parent, {"stages_run": len(rows) - hits, "stages_cached": hits})
    md = ["| stage | cache | seconds | digest | artifact |", "|---|---|---|---|---|"]
    md += [f"| {r['stage']} | {r['cache']} | {r['seconds']:.1f} | `{r['digest'][:12]}` | "
           f"`{r['artifact']}` |" for r in rows]
    try:
        create_markdown_artifact(markdown="## llamaflow lifecycle\n\n" + "\n".join(md),
                                 key="lifecycle-summary", description="Stages of this run")
    except Exception as e:  # the summary must never hide the run's own outcome
        get_run_logger().warning("could not write the Prefect summary artifact: %s", e)
