"""What `llamaflow run` prints: each error once, and a closing summary that says where things are.

Prefect logs a failing task's exception with its traceback, then the flow's "Encountered
exception" with the same traceback, then the flow's final state with it once more; the command
line then raised it a fourth time. On the console the engines' records keep their one line and
lose the traceback (LLAMAFLOW_TRACEBACKS=1 keeps them; the Prefect run log keeps them always),
and the command prints the error once at the end, with what to do next.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

TRACEBACKS_ENV = "LLAMAFLOW_TRACEBACKS"
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _WithoutEngineTracebacks:
    """A console formatter that leaves out the tracebacks Prefect's engines attach."""

    def __init__(self, inner: logging.Formatter):
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and record.name.startswith(_ENGINE_LOGGERS)):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:  # the same record goes on to the API handler, which keeps the traceback
            record.exc_info, record.exc_text = saved

    def __getattr__(self, name):
        return getattr(self.inner, name)


def quiet_engine_tracebacks() -> None:
    """Wrap the formatter of every Prefect console handler (once); a no-op when asked to keep
    tracebacks."""
    if os.environ.get(TRACEBACKS_ENV, "").strip() not in ("", "0"):
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in
                                       list(logging.root.manager.loggerDict)
                                       if n == "prefect" or n.startswith("prefect.")]
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, PrefectConsoleHandler) and h.formatter is not None \
                    and not isinstance(h.formatter, _WithoutEngineTracebacks):
                h.formatter = _WithoutEngineTracebacks(h.formatter)


def error_line(e: BaseException) -> str:
    """The one line printed for a failed run."""
    where = f" at stage {e.llamaflow_stage}" if getattr(e, "llamaflow_stage", None) else ""
    return (f"llamaflow: the run failed{where}: {type(e).__name__}: {e}\n"
            f"  (the traceback is in the Prefect run log; {TRACEBACKS_ENV}=1 prints it here too; "
            "rerunning the same command resumes: finished stages are cache hits)")


def _gates_line(gates: dict | None) -> str:
    if gates is None:
        return "no report gates in this run"
    if gates.get("passed") is None:
        return "not checked (no gate applied)"
    failed = [c for c in gates.get("checks", []) if not c.get("passed")]
    if not failed:
        return f"passed ({len(gates['checks'])} checked)"
    parts = []
    for c in failed:
        if c.get("delta_pct") is not None:
            parts.append(f"{c['model']} on {c['set']}: {c['metric']} {c['delta_pct']:+.1f} % vs "
                         f"{c['vs']} (limit +{c['max_delta_pct']:g} %)")
        else:
            parts.append(f"{c['model']} on {c['set']}: {c.get('reason', 'not comparable')}")
    return "FAILED: " + "; ".join(parts)


def summary(result: dict, title: str | None = None) -> str:
    """The closing table of one lifecycle run: every stage's cache outcome, time and artifact
    (relative to the workspace), then the report, the gates' verdict and where to look."""
    workdir = Path(result["workdir"])
    lines = ["", f"== {title}" if title else "== llamaflow run",
             f"  {'stage':22s} {'cache':10s} {'seconds':>8s}  artifact"]
    for label, r in result["stages"].items():
        art = Path(r["artifact"])
        shown = art.relative_to(workdir) if art.is_relative_to(workdir) else art
        lines.append(f"  {label:22s} {r['cache']:10s} {r['seconds']:8.1f}  {shown}")
    counts = {}
    for r in result["stages"].values():
        counts[r["cache"]] = counts.get(r["cache"], 0) + 1
    lines.append("  " + ", ".join(f"{n} {c}" for c, n in sorted(counts.items())))
    if result.get("report"):
        lines.append(f"report:    {result['report']}")
    if "report" in result["stages"] or result.get("gates") is not None:
        lines.append(f"gates:     {_gates_line(result.get('gates'))}")
    uri = result.get("mlflow_uri") or ""
    if uri.startswith("sqlite"):
        lines.append(f"MLflow:    run {result['mlflow_parent_run_id']}: `llamaflow ui --workdir "
                     f"{workdir}`, then {result.get('mlflow_run_url')}")
    elif result.get("mlflow_run_url"):
        lines.append(f"MLflow:    {result['mlflow_run_url']}")
    if result.get("prefect_flow_run_url"):
        lines.append(f"Prefect:   {result['prefect_flow_run_url']}")
    else:
        lines.append("Prefect:   a temporary server (stopped with the run); set PREFECT_API_URL "
                     "to keep flow runs in a Prefect UI")
    lines.append(f"latest:    {workdir / 'latest.json'}")
    chat = _chat_hint(result)
    if chat:
        lines.append(chat)
    return "\n".join(lines)


def _chat_hint(result: dict) -> str | None:
    """How to talk to the model the run made: serve its GGUF (f16 when there is one, the model
    the evaluate stage's generations came from) and point any OpenAI client at it."""
    qtypes = [label[len("quantize["):-1] for label in result["stages"]
              if label.startswith("quantize[")]
    if not qtypes:
        return None
    qtype = "f16" if "f16" in qtypes else qtypes[0]
    return (f"chat:      `llamaflow serve-model {qtype} --workdir {result['workdir']}`, then any "
            "OpenAI client on http://127.0.0.1:8650/v1 (e.g. curl http://127.0.0.1:8650/v1/chat/"
            "completions -H 'Content-Type: application/json' -d '{\"messages\": [{\"role\": "
            "\"user\", \"content\": \"你好\"}]}')")
