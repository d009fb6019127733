"""Human scores of the models' answers, kept in MLflow (traces + assessments) and snapshotted for
the report.

- `ensure_traces`: every greedy generation of an evaluate artifact (the JSON Lines file its STAGE
  names in `review`) becomes one MLflow trace in the workspace's experiment, linked to the
  stage's MLflow run: inputs {instruction, input}, outputs {output}, tags llamaflow.model,
  llamaflow.label, llamaflow.prompt_index, llamaflow.digest (the artifact's digest). Logged once
  per artifact digest: the traces already there are looked up first, so a cache hit in a later
  run logs nothing new (it links the existing traces to its own stage run).
- `serve` (`llamaflow review`): a small page listing, per prompt, every model's answer, blind and
  shuffled per reviewer, each with a 1-10 score; a submission becomes one `human_score` feedback
  (source HUMAN, the reviewer) per scored answer on its trace.
- `snapshot`: every human_score of the traces of a set of evaluate artifacts, as a
  content-addressed JSON file under <workdir>/reviews/ for the report stage.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import os
import random
import re
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SCORE = "human_score"            # the assessment name of a score, 1..10
PREFERRED = "human_preferred"    # True on the answer a reviewer preferred for a prompt
SCORE_MIN, SCORE_MAX = 1, 10
TAG_DIGEST, TAG_MODEL, TAG_LABEL, TAG_INDEX = ("llamaflow.digest", "llamaflow.model",
                                               "llamaflow.label", "llamaflow.prompt_index")
TAG_KIND = "llamaflow.kind"
KIND = "generation"
_LOCK = threading.Lock()        # one writer of MLflow's global tracer state at a time


def model_name(label: str) -> str:
    """'evaluate[base-zh+pt]' → 'base-zh+pt' (the flow's model label); other labels as they are."""
    m = re.fullmatch(r"[^\[]+\[(.+)\]", label)
    return m.group(1) if m else label


def greedy_records(path: Path) -> list[tuple[int, dict]]:
    """(prompt index, record) of every greedy generation in a generations.jsonl: the index is the
    record's place among the file's greedy records (the prompt set's order)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return list(enumerate(r for r in rows if r.get("mode", "greedy") == "greedy"))


@contextlib.contextmanager
def _tracing_to(uri: str):
    """MLflow's tracer exports to the global tracking URI: point it at `uri` for the block
    (synchronous export), then put back the URI and the environment as they were."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI",
                                            "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING")}
    with _LOCK:
        os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
        try:
            with _use_tracking_uri(uri):
                yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _client(tracker):
    """The tracker's MlflowClient (the _Uninterrupted wrapper delegates every call)."""
    return tracker.client


def traces_of(tracker, digest: str, include_spans: bool = False) -> list:
    """Every generation trace of the evaluate artifact with this digest, in the experiment."""
    out, token = [], None
    while True:
        page = _client(tracker).search_traces(
            locations=[tracker.experiment_id],
            filter_string=f"tag.`{TAG_DIGEST}` = '{digest}'", max_results=500,
            include_spans=include_spans, page_token=token)
        out += list(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def ensure_traces(tracker, run_id: str, label: str, artifact, review: str = "generations.jsonl"
                  ) -> int:
    """Log the greedy generations of `artifact` (its `review` file) as traces linked to MLflow run
    `run_id`, unless traces of its digest are there; returns how many were logged now."""
    path = Path(artifact.path) / review
    if not path.is_file():
        return 0
    records = greedy_records(path)
    existing = traces_of(tracker, artifact.digest)
    have = {t.info.tags.get(TAG_INDEX) for t in existing}
    if existing:   # a hit: show them on this stage run too
        with contextlib.suppress(Exception):
            ids = [t.info.trace_id for t in existing]
            for i in range(0, len(ids), 100):
                _client(tracker).link_traces_to_run(ids[i:i + 100], run_id)
    todo = [(i, r) for i, r in records if str(i) not in have]
    if not todo:
        return 0
    from mlflow import MlflowClient

    model = model_name(label)
    with _tracing_to(tracker.uri):
        client = MlflowClient()
        for i, r in todo:
            span = client.start_trace(
                f"{model} #{i}", inputs={"instruction": r.get("instruction", ""),
                                         "input": r.get("input", "")},
                attributes={"prompt": r.get("prompt", ""), "n_new_tokens": r.get("n_new_tokens")},
                tags={TAG_KIND: KIND, TAG_MODEL: model, TAG_LABEL: label, TAG_INDEX: str(i),
                      TAG_DIGEST: artifact.digest},
                experiment_id=tracker.experiment_id, run_id=run_id)
            client.end_trace(span.trace_id, outputs={"output": r.get("output", "")})
    return len(todo)


# -- reading back ---------------------------------------------------------------------------

def _scores(trace) -> list[dict]:
    out = []
    for a in trace.info.assessments or []:
        if a.name != SCORE or getattr(a, "valid", True) is False:
            continue
        value = getattr(a, "value", None)
        if value is None and getattr(a, "feedback", None) is not None:
            value = a.feedback.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out.append({"score": value, "reviewer": a.source.source_id if a.source else None,
                    "time": (a.create_time_ms or 0) / 1000.0, "assessment_id": a.assessment_id})
    return out


def collect(tracker, evaluations: dict) -> list[dict]:
    """Every human_score on the traces of `evaluations` ({model: Artifact or digest}), as
    [{model, prompt_index, instruction, score, reviewer, time}], sorted deterministically."""
    rows = []
    for model, art in evaluations.items():
        if art is None:   # a stage after the run's last one
            continue
        digest = art if isinstance(art, str) else art.digest
        for t in traces_of(tracker, digest, include_spans=True):
            instruction = _instruction(t)
            for s in _scores(t):
                rows.append({"model": model, "prompt_index": int(t.info.tags.get(TAG_INDEX, -1)),
                             "instruction": instruction, "score": s["score"],
                             "reviewer": s["reviewer"], "time": s["time"]})
    rows.sort(key=lambda r: (r["model"], r["prompt_index"], str(r["reviewer"]), r["time"],
                             r["score"]))
    return rows


def _instruction(trace) -> str:
    try:
        inputs = trace.data.spans[0].inputs or {}
    except (AttributeError, IndexError):
        inputs = {}
    if not inputs and trace.info.request_preview:
        with contextlib.suppress(ValueError):
            inputs = json.loads(trace.info.request_preview)
    return inputs.get("instruction", "") if isinstance(inputs, dict) else ""


def snapshot(run, evaluations: dict) -> str | None:
    """The human scores of these evaluate artifacts ({model: Artifact}) as
    `<workdir>/reviews/<sha256 of the content>.json` (a JSON list, see collect), written
    atomically; None when there are none. Its digest changes only when the scores do."""
    rows = collect(run.tracker, evaluations)
    if not rows:
        return None
    data = json.dumps(rows, indent=1, ensure_ascii=False, sort_keys=True).encode()
    out_dir = Path(run.workdir) / "reviews"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{hashlib.sha256(data).hexdigest()}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


# -- the review page ------------------------------------------------------------------------

class ReviewError(Exception):
    """A run that cannot be reviewed (unknown id, no evaluations): the message says why."""


def evaluations_of(tracker, parent_run_id: str) -> dict[str, str]:
    """{model: artifact digest} of every evaluate stage run of lifecycle run `parent_run_id`."""
    from mlflow.exceptions import MlflowException

    try:
        _client(tracker).get_run(parent_run_id)
    except MlflowException:
        raise ReviewError(f"no MLflow run {parent_run_id!r} in {tracker.uri}") from None
    runs = _client(tracker).search_runs(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=5000)
    out = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        t = r.data.tags
        if t.get("llamaflow.stage") == "evaluate" and t.get("llamaflow.artifact_digest"):
            out[model_name(t.get("llamaflow.label", ""))] = t["llamaflow.artifact_digest"]
    return out


def answers_of(tracker, evaluations: dict[str, str]) -> dict[int, dict]:
    """{prompt index: {instruction, input, answers: [{trace_id, model, output}]}}."""
    prompts: dict[int, dict] = {}
    for model, digest in evaluations.items():
        for t in traces_of(tracker, digest, include_spans=True):
            i = int(t.info.tags.get(TAG_INDEX, -1))
            span = t.data.spans[0] if t.data.spans else None
            inputs, outputs = (span.inputs or {}, span.outputs or {}) if span else ({}, {})
            p = prompts.setdefault(i, {"instruction": inputs.get("instruction", ""),
                                       "input": inputs.get("input", ""), "answers": []})
            p["answers"].append({"trace_id": t.info.trace_id, "model": model,
                                 "output": (outputs or {}).get("output", "")})
    return dict(sorted(prompts.items()))


def shuffled(answers: list[dict], reviewer: str, run_id: str, index: int) -> list[dict]:
    """The answers in an order fixed by (reviewer, run, prompt): a reload shows the same order,
    another reviewer another one."""
    ordered = sorted(answers, key=lambda a: a["trace_id"])
    random.Random(f"{reviewer}\0{run_id}\0{index}").shuffle(ordered)
    return ordered


def parse_submission(form: dict[str, str], prompts: dict[int, dict]
                     ) -> tuple[str, list[tuple[str, int]], list[str], list[str]]:
    """(reviewer, [(trace_id, score)], [preferred trace ids], errors) from the posted form;
    nothing may be written when errors is not empty."""
    errors = []
    reviewer = form.get("reviewer", "").strip()
    if not reviewer:
        errors.append("enter your name as the reviewer: every score is saved with it")
    known = {a["trace_id"] for p in prompts.values() for a in p["answers"]}
    scores, preferred = [], []
    for key, value in form.items():
        if key.startswith("score:") and value.strip():
            tid = key[len("score:"):]
            if tid not in known:
                errors.append(f"unknown answer {tid!r}")
                continue
            try:
                score = int(value.strip())
            except ValueError:
                score = None
            if score is None or not SCORE_MIN <= score <= SCORE_MAX:
                errors.append(f"a score must be a whole number from {SCORE_MIN} to {SCORE_MAX}, "
                              f"not {value.strip()!r}")
                continue
            scores.append((tid, score))
        elif key.startswith("prefer:") and value.strip():
            if value.strip() not in known:
                errors.append(f"unknown answer {value.strip()!r}")
            else:
                preferred.append(value.strip())
    if not scores and not preferred and not errors:
        errors.append("nothing to save: give at least one answer a score")
    return reviewer, sorted(scores), sorted(preferred), errors


def save(reviewer: str, scores: list[tuple[str, int]], preferred: list[str]) -> list:
    """One human_score feedback per scored answer (and human_preferred=True per preferred one),
    source HUMAN/reviewer, through the global tracking URI (set by serve)."""
    import mlflow
    from mlflow.entities import AssessmentSource

    source = AssessmentSource(source_type="HUMAN", source_id=reviewer)
    saved = [mlflow.log_feedback(trace_id=tid, name=SCORE, value=int(score), source=source)
             for tid, score in scores]
    saved += [mlflow.log_feedback(trace_id=tid, name=PREFERRED, value=True, source=source)
              for tid in preferred]
    return saved


_STYLE = """body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}
.prompt{border-top:1px solid #999;margin-top:1.5em}.answer{background:#f4f4f4;padding:.5em;
margin:.5em 0;white-space:pre-wrap}.error{color:#b00;font-weight:bold}label{margin-right:1em}"""


def render_page(run_id: str, prompts: dict[int, dict], reviewer: str, errors=(), saved=None,
                form: dict | None = None) -> str:
    """The review form (blind: "Answer 1..n", no model label), with errors or what was saved."""
    e = html.escape
    form = form or {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>llamaflow review "
             f"{e(run_id)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Review the answers of lifecycle run <code>{e(run_id)}</code></h1>",
             "<p>Score each answer from 1 (useless) to 10 (excellent); leave a score empty to "
             "skip it. The models are hidden and their order is shuffled per reviewer.</p>"]
    for msg in errors:
        parts.append(f"<p class='error' role='alert'>Error: {e(msg)}</p>")
    if saved:
        parts.append(f"<div id='saved'><h2>Saved {len(saved)} assessment(s)</h2><ul>")
        parts += [f"<li>{e(s)}</li>" for s in saved]
        parts.append("</ul></div>")
    parts.append("<form method='post' action='/submit'>")
    parts.append(f"<p><label>Reviewer <input name='reviewer' id='reviewer' required "
                 f"value='{e(form.get('reviewer', reviewer))}'></label>"
                 f"<a href='?reviewer={e(reviewer)}'>reload with this reviewer's order</a></p>")
    for i, p in prompts.items():
        parts.append(f"<section class='prompt' data-prompt='{i}'><h2>Prompt {i + 1}</h2>"
                     f"<p class='instruction'>{e(p['instruction'])}</p>"
                     + (f"<p class='input'>{e(p['input'])}</p>" if p["input"] else ""))
        for n, a in enumerate(shuffled(p["answers"], reviewer, run_id, i), 1):
            key = f"score:{a['trace_id']}"
            parts.append(
                f"<div class='answer-block'><h3>Answer {n}</h3><div class='answer'>"
                f"{e(a['output'])}</div><label>Score (1-10) <input type='number' min='1' "
                f"max='10' step='1' name='{e(key)}' aria-label='prompt {i + 1} answer {n} score' "
                f"value='{e(form.get(key, ''))}'></label><label><input type='radio' "
                f"name='prefer:{i}' value='{e(a['trace_id'])}'> preferred</label></div>")
        parts.append("</section>")
    parts.append("<p><button type='submit' id='submit'>Save scores</button></p></form>"
                 "</body></html>")
    return "\n".join(parts)


def make_server(tracker, run_id: str, host: str, port: int, reviewer: str = ""):
    """A ThreadingHTTPServer for the review page of lifecycle run `run_id` (ReviewError first
    when the run is unknown or has no generations to review)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    import mlflow

    evaluations = evaluations_of(tracker, run_id)
    if not evaluations:
        raise ReviewError(f"lifecycle run {run_id} has no evaluate stage runs to review")
    prompts = answers_of(tracker, evaluations)
    if not prompts:
        raise ReviewError(f"the evaluations of run {run_id} have no generation traces "
                          f"({', '.join(evaluations)}): rerun it with this version of llamaflow")
    mlflow.set_tracking_uri(tracker.uri)   # log_feedback writes through the global URI
    default_reviewer = reviewer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet: one line per request is noise here
            log.debug(fmt, *args)

        def _send(self, code: int, body: str):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            q = parse_qs(urlparse(self.path).query)
            if urlparse(self.path).path not in ("/", "/index.html"):
                return self._send(404, "<p>not found</p>")
            who = (q.get("reviewer") or [default_reviewer])[0]
            self._send(200, render_page(run_id, prompts, who))

        def do_POST(self):
            if urlparse(self.path).path != "/submit":
                return self._send(404, "<p>not found</p>")
            n = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(n).decode(),
                                                 keep_blank_values=True).items()}
            who, scores, preferred, errors = parse_submission(form, prompts)
            if errors:
                return self._send(400, render_page(run_id, prompts, who or default_reviewer,
                                                   errors=errors, form=form))
            try:
                save(who, scores, preferred)
            except Exception as ex:   # the page says so; nothing is half-claimed
                return self._send(500, render_page(run_id, prompts, who, form=form, errors=[
                    f"saving to MLflow failed: {ex}"]))
            number = {a["trace_id"]: (i, n) for i, p in prompts.items()
                      for n, a in enumerate(shuffled(p["answers"], who, run_id, i), 1)}
            lines = [f"prompt {number[t][0] + 1}, answer {number[t][1]}: {SCORE} = {s} "
                     f"(by {who})" for t, s in scores]
            lines += [f"prompt {number[t][0] + 1}, answer {number[t][1]}: preferred (by {who})"
                      for t in preferred]
            self._send(200, render_page(run_id, prompts, who, saved=lines))

    return ThreadingHTTPServer((host, port), Handler)


def latest_run_id(workdir: Path) -> str:
    latest = Path(workdir) / "latest.json"
    if not latest.is_file():
        raise ReviewError(f"no {latest}: run `llamaflow demo` or `llamaflow run` first, or pass "
                          "--run MLFLOW_PARENT_RUN_ID")
    return json.loads(latest.read_text())["mlflow_parent_run_id"]
