"""Human review: generations as MLflow traces, the blind review page, the snapshot for the report
and the summary of the scores (pipelines/reviews.py, steps/human_review.py).

Helpers other tests can reuse (the report-side check):
    evaluations_of_workdir(workdir) -> {model: Artifact}   the latest run's evaluate artifacts
    log_scores(workdir, {model: {prompt_index: score}}, reviewer)
                                    human_score feedback on those traces, as the page writes it
    review_snapshot(workdir) -> str | None                   reviews.snapshot() for that run
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from steps import human_review

REPO = Path(__file__).resolve().parents[1]


# -- helpers (reusable) -----------------------------------------------------------------------

def _tracker(workdir: Path):
    from pipelines.tracking import Tracker

    return Tracker(Path(workdir), {})


def evaluations_of_workdir(workdir: Path) -> dict:
    """{model: Artifact} of the evaluate stages of the workspace's latest run."""
    from pipelines.artifacts import Artifact
    from pipelines.reviews import model_name

    latest = json.loads((Path(workdir) / "latest.json").read_text())
    return {model_name(label): Artifact.load(Path(s["artifact"]))
            for label, s in latest["stages"].items() if s["stage"] == "evaluate"}


def _all_traces(tracker, evaluations: dict) -> dict:
    from pipelines.reviews import traces_of

    return {m: traces_of(tracker, a.digest) for m, a in evaluations.items()}


def log_scores(workdir: Path, scores: dict[str, dict[int, int]], reviewer: str = "tester") -> int:
    """human_score feedback (source HUMAN/reviewer) on the traces of the latest run's answers:
    scores {model: {prompt_index: score}}; returns how many were written."""
    from pipelines import reviews

    tracker = _tracker(workdir)
    traces = _all_traces(tracker, evaluations_of_workdir(workdir))
    todo = [(t.info.trace_id, scores[m][int(t.info.tags[reviews.TAG_INDEX])])
            for m, ts in traces.items() if m in scores for t in ts
            if int(t.info.tags[reviews.TAG_INDEX]) in scores[m]]
    with reviews._tracing_to(tracker.uri):
        reviews.save(reviewer, todo, [])
    return len(todo)


def review_snapshot(workdir: Path) -> str | None:
    from pipelines import reviews

    run = types.SimpleNamespace(tracker=_tracker(workdir), workdir=Path(workdir))
    return reviews.snapshot(run, evaluations_of_workdir(workdir))


def _greedy_count(artifact) -> int:
    from pipelines.reviews import greedy_records

    return len(greedy_records(Path(artifact.path) / "generations.jsonl"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _review_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "review", "--workdir", str(workdir), *args]


@contextlib.contextmanager
def _review_server(workdir: Path, *args: str):
    """`llamaflow review` as a subprocess on a free port: yields (url, process); stopped with
    SIGINT (Ctrl-C) by PID at the end, which must end it cleanly (exit 0)."""
    port = _free_port()
    proc = subprocess.Popen(_review_cmd(workdir, "--port", str(port), *args), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.time() < deadline, "review server did not answer in 120 s"
                time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out, err = proc.communicate()
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert url in out   # it printed the URL it served


def _post(url: str, form: dict) -> tuple[int, str]:
    data = urllib.parse.urlencode(form).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "submit", data=data),
                                    timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _n_assessments(tracker, evaluations) -> int:
    return sum(len(t.info.assessments or []) for ts in _all_traces(tracker, evaluations).values()
               for t in ts)


# -- summarise(): hand-computed numbers -------------------------------------------------------

REVIEWS = [  # model a: 8, 6 (alice), 4 (bob) → mean 6, n 3, 2 reviewers; model b: 2, 5 → 3.5
    {"model": "a", "prompt_index": 0, "instruction": "x", "score": 8, "reviewer": "alice", "time": 1},
    {"model": "a", "prompt_index": 0, "instruction": "x", "score": 6, "reviewer": "bob", "time": 2},
    {"model": "a", "prompt_index": 1, "instruction": "y", "score": 4, "reviewer": "alice", "time": 3},
    {"model": "b", "prompt_index": 0, "instruction": "x", "score": 2, "reviewer": "alice", "time": 4},
    {"model": "b", "prompt_index": 1, "instruction": "y", "score": 5, "reviewer": "alice", "time": 5},
]


def test_summarise_means_counts_and_spearman():
    s = human_review.summarise(REVIEWS)
    assert s["models"] == {"a": {"mean": 6.0, "n": 3, "reviewers": 2},
                           "b": {"mean": 3.5, "n": 2, "reviewers": 1}}
    assert s["n"] == 5 and s["reviewers"] == 2 and s["agreement"] is None
    # human means per (model, prompt): a0 7, a1 4, b0 2, b1 5 → ranks 4, 2, 1, 3
    # judge: a0 9, a1 3, b0 5, b1 1 → ranks 4, 2, 3, 1 (model c: no human score, left out)
    # d = 0, 0, -2, 2 → Σd² = 8, ρ = 1 - 6·8 / (4·15) = 0.2
    judge = {"a": {0: 9, 1: 3}, "b": {0: 5, 1: 1}, "c": {0: 7}}
    a = human_review.summarise(REVIEWS, judge)["agreement"]
    assert a["n"] == 4 and math.isclose(a["spearman"], 0.2)
    # only the pairs both have: without b1 → human 7, 4, 2 vs judge 9, 3, 5: ranks 3,2,1 / 3,1,2
    # Σd² = 0 + 1 + 1 = 2, ρ = 1 - 6·2 / (3·8) = 0.5
    a = human_review.summarise(REVIEWS, {"a": {0: 9, "1": 3}, "b": {0: 5}})["agreement"]
    assert a["n"] == 3 and math.isclose(a["spearman"], 0.5)
    # fewer than 2 pairs: no correlation, said so
    a = human_review.summarise(REVIEWS, {"a": {0: 9}})["agreement"]
    assert a == {"spearman": None, "p_value": None, "n": 1}


def test_markdown_and_metrics():
    s = human_review.summarise(REVIEWS, {"a": {0: 9, 1: 3}, "b": {0: 5, 1: 1}})
    md = human_review.markdown(s)
    assert md.startswith("## Human scores")
    assert "| model | mean | n | reviewers |" in md
    assert "| a | 6.00 | 3 | 2 |" in md and "| b | 3.50 | 2 | 1 |" in md
    assert "Spearman ρ = 0.200" in md and "over 4 (model, prompt) pairs" in md
    m = human_review.metrics(s)
    assert m["human.a.mean"] == 6.0 and m["human.n"] == 5 and m["human.judge_pairs"] == 4
    assert "No human scores" in human_review.markdown(human_review.summarise([]))


def test_submission_checks():
    from pipelines.reviews import parse_submission, shuffled

    prompts = {0: {"instruction": "x", "input": "", "answers": [
        {"trace_id": "tr-1", "model": "a", "output": "A"},
        {"trace_id": "tr-2", "model": "b", "output": "B"}]}}
    assert parse_submission({"reviewer": "alice", "score:tr-1": "7", "score:tr-2": ""},
                            prompts) == ("alice", [("tr-1", 7)], [], [])
    for bad in ("0", "11", "7.5", "x"):
        _, _, _, errors = parse_submission({"reviewer": "alice", "score:tr-1": bad}, prompts)
        assert errors and "1 to 10" in errors[0]
    _, _, _, errors = parse_submission({"reviewer": " ", "score:tr-1": "5"}, prompts)
    assert errors and "reviewer" in errors[0]
    # the order is fixed per reviewer (a reload shows the same)
    answers = [{"trace_id": f"tr-{i}"} for i in range(8)]
    assert shuffled(answers, "alice", "r", 0) == shuffled(list(reversed(answers)), "alice", "r", 0)
    assert shuffled(answers, "alice", "r", 0) != shuffled(answers, "bob", "r", 0)


# -- on a demo run ------------------------------------------------------------------------------

def test_traces_go_to_each_workspaces_own_mlflow(tmp_path):
    """Two workspaces (two MLflow databases) in one process, as a test session or a worker runs
    them: each one's generations are traced in its own database, though MLflow's tracer builds
    its exporter for the tracking URI it first starts with (reviews._tracing_to points it)."""
    from types import SimpleNamespace

    from pipelines import reviews

    seen = {}
    for name in ("first", "second"):
        ws = tmp_path / name
        art = ws / "artifacts" / "evaluate" / "k"
        art.mkdir(parents=True)
        (art / "generations.jsonl").write_text("\n".join(json.dumps(
            {"mode": "greedy", "instruction": f"{name} {i}", "output": "ok"}) for i in range(2)))
        tracker = _tracker(ws)
        run_id = tracker.start_run(f"evaluate[{name}]")
        artifact = SimpleNamespace(path=str(art), digest=f"digest-{name}")
        assert reviews.ensure_traces(tracker, run_id, "evaluate[merged]", artifact) == 2
        seen[name] = (tracker, artifact.digest)
    for name, (tracker, digest) in seen.items():
        assert len(reviews.traces_of(tracker, digest)) == 2, name
    (t1, d1), (t2, d2) = seen["first"], seen["second"]
    assert reviews.traces_of(t1, d2) == [] and reviews.traces_of(t2, d1) == []


@pytest.fixture(scope="module")
def reviewed_demo(demo_first_run):
    """The demo workspace after a second `run_demo` (every evaluate stage a cache hit)."""
    from pipelines.demo import run_demo

    workdir, _ = demo_first_run
    # the whole demo first (all hits): other tests run single stages in this shared workspace,
    # and latest.json is their run's, which may have no evaluate stage (CI: 0 evaluations)
    run_demo(workdir)
    tracker = _tracker(workdir)
    evaluations = evaluations_of_workdir(workdir)
    first = {m: sorted(t.info.trace_id for t in ts)
             for m, ts in _all_traces(tracker, evaluations).items()}
    run_demo(workdir)
    return workdir, evaluations, first


@pytest.mark.slow
def test_traces_logged_once_per_artifact_digest(reviewed_demo):
    from pipelines import reviews

    workdir, evaluations, first = reviewed_demo
    tracker = _tracker(workdir)
    assert len(evaluations) >= 2
    latest = json.loads((workdir / "latest.json").read_text())
    again = evaluations_of_workdir(workdir)
    assert {m: a.digest for m, a in again.items()} == {m: a.digest for m, a in evaluations.items()}
    for model, traces in _all_traces(tracker, evaluations).items():
        art = evaluations[model]
        n = _greedy_count(art)
        assert n > 0
        assert sorted(t.info.trace_id for t in traces) == first[model]   # none added
        assert sorted(int(t.info.tags[reviews.TAG_INDEX]) for t in traces) == list(range(n))
        assert {t.info.tags[reviews.TAG_MODEL] for t in traces} == {model}
        # linked to the stage run that made them (and to the later run's, a hit)
        label = f"evaluate[{model}]"
        assert {t.info.trace_metadata.get("mlflow.sourceRun") for t in traces} != {None}
        linked = tracker.client.search_traces(locations=[tracker.experiment_id],
                                              run_id=latest["stages"][label]["mlflow_run_id"],
                                              include_spans=False)
        assert {t.info.trace_id for t in linked} >= set(first[model])
    # the greedy answer and the prompt are the trace's outputs and inputs
    model, art = next(iter(evaluations.items()))
    rec = reviews.greedy_records(Path(art.path) / "generations.jsonl")[0][1]
    t0 = next(t for t in reviews.traces_of(tracker, art.digest, include_spans=True)
              if t.info.tags[reviews.TAG_INDEX] == "0")
    assert t0.data.spans[0].inputs["instruction"] == rec["instruction"]
    assert t0.data.spans[0].outputs == {"output": rec["output"]}
    # ensure_traces again: nothing new
    assert reviews.ensure_traces(tracker, latest["stages"][f"evaluate[{model}]"]["mlflow_run_id"],
                                 f"evaluate[{model}]", art) == 0


@pytest.mark.slow
def test_unknown_run_is_refused_before_serving(demo_first_run):
    workdir, _ = demo_first_run
    r = subprocess.run(_review_cmd(workdir, "--run", "0123456789abcdef0123456789abcdef",
                                   "--port", str(_free_port())),
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert "0123456789abcdef0123456789abcdef" in r.stderr and "latest.json" in r.stderr
    assert "http://" not in r.stdout
    r = subprocess.run(_review_cmd(workdir / "nowhere"), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "no MLflow database" in r.stderr


@pytest.mark.servers
@pytest.mark.slow
def test_review_page_blind_scores_reach_mlflow_and_snapshot(reviewed_demo, browser):
    from pipelines import reviews

    workdir, evaluations, _ = reviewed_demo
    tracker = _tracker(workdir)
    before = _n_assessments(tracker, evaluations)
    with _review_server(workdir, "--reviewer", "alice") as (url, _):
        # out of range, or no reviewer: an error on the page, nothing written
        ids = [t.info.trace_id for t in reviews.traces_of(tracker,
                                                           next(iter(evaluations.values())).digest)]
        code, body = _post(url, {"reviewer": "alice", f"score:{ids[0]}": "11"})
        assert code == 400 and "Error:" in body and "1 to 10" in body
        code, body = _post(url, {"reviewer": "", f"score:{ids[0]}": "5"})
        assert code == 400 and "reviewer" in body
        assert _n_assessments(tracker, evaluations) == before

        with browser() as b:
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            section = page.locator("section[data-prompt='0']")
            section.wait_for()
            # blind: no model label outside the answers' own text
            chrome = page.evaluate("""() => { const b = document.body.cloneNode(true);
                b.querySelectorAll('.answer').forEach(e => e.remove()); return b.innerText; }""")
            html_text = page.content()
            for model in evaluations:
                assert model not in chrome, model
                assert f"evaluate[{model}]" not in html_text
            assert page.locator("#reviewer").input_value() == "alice"
            inputs = section.locator("input[type=number]")
            n = inputs.count()
            assert n == len(evaluations)
            assert section.get_by_text(f"Answer {n}", exact=True).count() == 1
            given = {}
            for k in range(n):
                field = inputs.nth(k)
                score = min(10, 3 + k)
                field.fill(str(score))
                given[field.get_attribute("name")[len("score:"):]] = score
            order = [inputs.nth(k).get_attribute("name") for k in range(n)]
            page.locator("#reviewer").fill("alice")
            page.locator("#submit").click()
            page.locator("#saved").wait_for()
            assert f"Saved {n} assessment(s)" in page.locator("#saved").inner_text()
            page.goto(url)   # a reload shows the same order
            again = page.locator("section[data-prompt='0'] input[type=number]")
            assert [again.nth(k).get_attribute("name") for k in range(n)] == order
            page.close()

    # in MLflow: one human_score per answer of prompt 0, source HUMAN/alice, the value entered
    seen = {}
    for model, art in evaluations.items():
        for t in reviews.traces_of(tracker, art.digest):
            for a in t.info.assessments or []:
                if a.name == reviews.SCORE:
                    assert a.source.source_type == "HUMAN" and a.source.source_id == "alice"
                    seen[t.info.trace_id] = (a.value, model, t.info.tags[reviews.TAG_INDEX])
    assert {tid: v[0] for tid, v in seen.items()} == given
    assert {v[2] for v in seen.values()} == {"0"}
    assert sorted(v[1] for v in seen.values()) == sorted(evaluations)

    path = review_snapshot(workdir)
    assert path is not None and Path(path).parent == workdir / "reviews"
    rows = json.loads(Path(path).read_text())
    assert sorted((r["model"], r["score"]) for r in rows) == sorted(
        (v[1], v[0]) for v in seen.values())
    assert all(r["reviewer"] == "alice" and r["prompt_index"] == 0 and r["instruction"]
               for r in rows)
    assert set(rows[0]) == {"model", "prompt_index", "instruction", "score", "reviewer", "time"}
    assert review_snapshot(workdir) == path   # same scores, same file
    # the scores entered in the browser reach the next report, which alone recomputes
    from pipelines.demo import run_demo

    rerun = run_demo(workdir)
    assert {k for k, r in rerun["stages"].items() if r["cache"] != "hit"} == {"report"}
    md = (Path(rerun["stages"]["report"]["artifact"]) / "report.md").read_text(encoding="utf-8")
    assert f"{len(seen)} score(s) from 1 reviewer(s)" in md
    for value, model, _ in seen.values():
        assert f"| {model} | {float(value):.2f} | 1 | 1 |" in md
    # a further score makes another file
    model = sorted(evaluations)[0]
    assert log_scores(workdir, {model: {1: 9}}, reviewer="bob") == 1
    assert review_snapshot(workdir) != path


@pytest.mark.slow
def test_scores_reach_the_next_report_and_only_it_recomputes(reviewed_demo):
    """A rerun after reviews recomputes the report alone; report.md has every model's mean
    human score and the agreement with the judge's single scores of the same answers."""
    from pipelines.demo import run_demo

    workdir, _, _ = reviewed_demo
    scores = {"merged": {0: 8, 1: 6, 2: 3, 3: 5}, "gguf-f16": {0: 2, 1: 9, 2: 4, 3: 7}}
    assert log_scores(workdir, scores, reviewer="bob") == 8
    rerun = run_demo(workdir)
    assert {k for k, r in rerun["stages"].items() if r["cache"] != "hit"} == {"report"}
    snap = json.loads(Path(review_snapshot(workdir)).read_text(encoding="utf-8"))
    report_dir = Path(rerun["stages"]["report"]["artifact"])
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    for model in scores:
        mine = [r["score"] for r in snap if r["model"] == model]
        assert f"| {model} | {sum(mine) / len(mine):.2f} | {len(mine)} |" in md
    assert "## Human scores" in md and "Agreement with the judge" in md
    manifest = json.loads((report_dir / "manifest.json").read_text())
    assert manifest["metrics"]["human.n"] == len(snap) and "human.judge_pairs" in manifest["metrics"]
    # nothing new: the same snapshot file, a cache hit
    assert run_demo(workdir)["stages"]["report"]["cache"] == "hit"
