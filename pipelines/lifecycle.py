"""The whole LLaMA lifecycle as one Prefect flow: a short list of stage calls.

Each `run.stage(...)` is a cached, tracked Prefect task (pipelines/runner.py); the step that
does the work is `steps/<stage>.py`. To add a stage: write steps/<name>.py (the stage protocol in
steps/__init__.py), conf/<name>/default.yaml, add the name to runner.STAGES, and call it here.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from pipelines.config import to_yaml
from pipelines.runner import LifecycleRun
from pipelines.tracking import Tracker, flatten, git_commit, redact
from pipelines.validate import check


def lifecycle_steps(run: LifecycleRun) -> None:
    """source → meta → hf → hf-zh → lora-pt → lora-sft → merged → gguf → evaluation report."""
    meta = run.stage("download")
    hf = run.stage("convert", meta=meta)
    zh = run.stage("vocab", model=hf)
    pt = run.stage("pretrain", model=zh)
    sft = run.stage("sft", model=zh, adapters=[pt])
    merged = run.stage("merge", base=zh, adapters=[pt, sft])

    # f16 is exported from the HF weights; every other type is llama.cpp-quantized from it.
    f16 = run.stage("quantize", label="quantize[f16]", config={"qtype": "f16"}, model=merged)
    ggufs = {"f16": f16} | {
        q: run.stage("quantize", label=f"quantize[{q}]", config={"qtype": q}, gguf=f16)
        for q in run.cfg["quantize"]["types"] if q != "f16"}

    candidates = {"base": (hf, []), "base-zh": (zh, []), "base-zh+pt": (zh, [pt]),
                  "merged": (merged, [])} | {f"gguf-{q}": (g, []) for q, g in ggufs.items()}
    wanted = run.cfg["evaluate"]["models"]
    evaluations = {
        name: run.stage("evaluate", label=f"evaluate[{name}]", model=model, adapters=adapters)
        for name, (model, adapters) in candidates.items()
        if name in wanted or (name.startswith("gguf-") and "gguf" in wanted)}
    run.stage("report", group="evaluate", evaluations=evaluations,
              training={"pretrain": pt, "sft": sft}, quantized=ggufs)


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
    log.info("MLflow parent run %s (%s); workspace %s", parent, tracker.uri, workdir)
    if os.environ.get("PREFECT_API_URL"):
        create_link_artifact(link=tracker.run_url(parent), link_text="MLflow run",
                             key="mlflow-run", description="The MLflow parent run of this flow run")

    try:
        run = LifecycleRun(cfg, tracker, parent, from_stage=from_stage)
    except BaseException:  # a bad stage list or an unreachable bucket: the parent run failed too
        tracker.end_run(parent, "FAILED")
        raise
    status = "FAILED"
    try:
        lifecycle_steps(run)
        status = "FINISHED"
    finally:
        run.write_latest()
        _summarise(run, tracker, parent)
        try:
            _publish_report(run, tracker, parent)
        except Exception as e:  # publishing must never hide the run's own outcome
            log.warning("could not publish the report: %s", e)
        try:
            _register_merged(run, tracker, parent)
        except Exception as e:  # nor must the registry (e.g. a server refusing a local path)
            log.warning("could not register the merged model: %s", redact(str(e)))
        tracker.end_run(parent, status)
    return {"mlflow_parent_run_id": parent, "workdir": str(workdir), "stages": run.results}


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


def _gates_passed(run: LifecycleRun) -> bool | None:
    """The report's verdict: True/False, or None when no gate was checked or no report was made."""
    if "report" not in run.results:
        return None
    gates = Path(run.results["report"]["artifact"]) / "gates.json"
    return json.loads(gates.read_text())["passed"] if gates.is_file() else None


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
