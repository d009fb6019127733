"""A real browser on the real UIs: headless Chromium (Debian's `chromium`, driven by Playwright's
Python package) opens the MLflow UI and the Prefect UI of the demo run served on 127.0.0.1
(tests/conftest.py: demo_servers), checks that the parent run with its nested stage runs and the
flow run with its task runs are shown, and saves screenshots (to docs/img/ with LLAMAFLOW_SCREENSHOTS=docs/img; the README uses them):

    docs/img/mlflow-nested-runs.png    MLflow: the lifecycle parent run, its stage runs nested
    docs/img/prefect-flow-run.png      Prefect: the lifecycle flow run with its task runs
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Screenshots land in a temp folder; LLAMAFLOW_SCREENSHOTS=docs/img refreshes the README's copies
# (a test run must not rewrite tracked files).
IMG = Path(os.environ.get("LLAMAFLOW_SCREENSHOTS") or tempfile.mkdtemp(prefix="llamaflow-shots-"))

pytestmark = [pytest.mark.servers, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(demo_servers):
    s = demo_servers
    assert s.demo.returncode == 0, s.demo.stdout[-4000:] + s.demo.stderr[-4000:]
    return s, json.loads((s.workdir / "latest.json").read_text())


try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:
    PlaywrightError = Exception


def _page(browser):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(60_000)
    return page


def test_mlflow_ui_shows_parent_with_nested_stage_runs(browser, demo):
    s, latest = demo
    parent_id = latest["mlflow_parent_run_id"]
    parent = s.mlflow.api("GET", f"runs/get?run_id={parent_id}")["run"]
    exp = parent["info"]["experiment_id"]
    parent_name = parent["info"]["run_name"]
    with browser() as b:
        page = _page(b)
        page.goto(f"{s.mlflow.url}/#/experiments/{exp}/runs")
        # Nested runs are grouped under their parent, collapsed: the button in the parent's
        # run-name cell expands them.
        cell = page.locator("[role=gridcell][col-id='attributes.`Run Name`']",
                            has_text=parent_name).first
        cell.wait_for()
        assert page.get_by_text(sorted(latest["stages"])[0], exact=True).count() == 0  # collapsed
        cell.locator("button").first.click()
        for label in sorted(latest["stages"]):
            page.get_by_text(label, exact=True).first.wait_for()
        with contextlib.suppress(PlaywrightError):  # the assistant side panel, when shown
            page.get_by_role("button", name=re.compile("close", re.I)).first.click(timeout=3000)
        IMG.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMG / "mlflow-nested-runs.png"), full_page=True)
        # and the parent's own page names its stage table artifact
        page.goto(f"{s.mlflow.url}/#/experiments/{exp}/runs/{parent_id}/artifacts")
        page.get_by_text("stages.json").first.wait_for()
        page.close()


def test_prefect_ui_shows_flow_run_with_task_runs(browser, demo):
    s, latest = demo
    runs = s.prefect.api("POST", "flow_runs/filter", json={"flows": {"name": {"any_": ["lifecycle"]}}})
    run = runs[0]
    with browser() as b:
        page = _page(b)
        page.goto(f"{s.prefect.ui_url}/runs/flow-run/{run['id']}")
        page.get_by_text(run["name"]).first.wait_for()
        page.get_by_text("Completed").first.wait_for()
        page.get_by_text(f"{len(latest['stages'])} Task runs").first.wait_for()
        page.get_by_text("Task Runs", exact=True).first.click()
        # every stage's task run (named <label>-<suffix>) is listed
        for label in sorted(latest["stages"]):
            page.get_by_text(re.compile("^" + re.escape(label) + "-[0-9a-f]+$")).first.wait_for()
        IMG.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMG / "prefect-flow-run.png"), full_page=True)
        page.close()
