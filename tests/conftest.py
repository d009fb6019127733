"""Shared test fixtures.

Real files live in ../shared/data (see its README). Where that folder is absent (a user's own
clone) tests that need it skip with the reason; under CI=true they must run, so a missing folder
is an error there, never a silent skip.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLAMAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip (an error under CI=true) when it is not there."""
    if not (SHARED_DATA / "README.md").is_file():
        msg = (f"real test data not found at {SHARED_DATA}; clone the project beside its shared/ "
               "folder or set LLAMAFLOW_SHARED_DATA")
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI=true: these tests must run)")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama_tokenizer(shared_data) -> Path:
    """Meta's real 32000-piece LLaMA tokenizer.model."""
    return shared_data / "tokenizers" / "llama_tokenizer.model"


@pytest.fixture(scope="session")
def tiny_sp_model(tmp_path_factory) -> Path:
    """A LLaMA-like (BPE, byte fallback, unk/bos/eos = 0/1/2) 320-piece tokenizer trained on the
    demo corpus in about a second; for tests that must not depend on ../shared."""
    from tests.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_sp") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, tiny_sp_model) -> Path:
    """A randomly initialised 2-layer LLaMA (GQA) in HF format with tokenizer files."""
    from tests.tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf"), tiny_sp_model)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (SQLite) for the whole session: it costs ~10 s to start."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_first_run(tmp_path_factory, prefect_harness):
    """(workdir, result) of one `llamaflow demo` lifecycle in a fresh workspace, shared by the
    lifecycle tests (which go on to rerun in that workspace) and the recipe tests."""
    from pipelines.demo import run_demo

    workdir = tmp_path_factory.mktemp("lifecycle")
    return workdir, run_demo(workdir)


@pytest.fixture(scope="session")
def demo_servers(tmp_path_factory):
    """Postgres + `prefect server` + `mlflow server` on 127.0.0.1 and one `llamaflow demo` run
    against them (tests/servers.py), shared by test_servers.py and test_browser.py; every server
    is stopped by PID at the end of the session."""
    from steps.llamacpp_tools import ensure_built
    from tests.servers import demo_on_servers

    # llama.cpp's tools (minutes to build on a cold cache) before the servers and the demo's
    # time limit start: the limit is for the demo, not for compiling
    ensure_built()
    with demo_on_servers(tmp_path_factory.mktemp("servers")) as state:
        yield state


@pytest.fixture(autouse=True)
def _no_event_loop_left_running():
    """A test that leaves an asyncio loop running in the main thread (an open Playwright, say)
    makes Prefect's sync-or-async calls in every later test return coroutines: fail it here,
    where the cause is, rather than there."""
    import asyncio

    yield
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:   # none running: what every test must leave
        return
    pytest.fail(f"the test left an asyncio loop running in the main thread: {loop!r}")


CHROMIUM = os.environ.get("LLAMAFLOW_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser():
    """Headless Chromium (Debian's, driven by Playwright) for the browser tests, as a context
    manager to open where the test drives pages: `with browser() as b: ...`. A skip with the
    reason where it is missing (an error under CI=true).

    Why not an open browser for the whole session: Playwright's sync API keeps its asyncio loop
    running in the test's thread while it is open, and Prefect's sync-or-async functions then see
    a running loop and hand back coroutines, so every later test that reads a deployment or runs
    a flow in the same process failed."""
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or shutil.which(CHROMIUM) is None:
        msg = ("headless browser not available: pip install playwright (dev extras) and Debian's "
               "chromium (infra/ci/install-services.sh); Playwright's own browser download is "
               "not used")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)

    @contextlib.contextmanager
    def open_browser():
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                yield b
            finally:
                b.close()

    return open_browser
