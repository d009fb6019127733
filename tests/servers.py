"""Real servers for tests: PostgreSQL (Debian's binaries, a throwaway cluster), `prefect server
start` and `mlflow server`, each on 127.0.0.1 on a free port, each its own process group, each
stopped by PID at the end with its port checked closed.

    with Postgres.start() as pg, PrefectServer.start(tmp, pg.url("prefect", "postgresql+asyncpg")) as pf, \
         MlflowServer.start(tmp, pg.url("mlflow", "postgresql+psycopg2")) as ml:
        ... PREFECT_API_URL=pf.api_url, MLFLOW_TRACKING_URI=ml.url ...

Where Postgres is not installed the tests skip with the reason; under CI=true they fail instead
(.ci/run installs it: infra/ci/install-services.sh).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def require(what: str, ok: bool, fix: str) -> None:
    """Skip (or, under CI=true, fail) when a server prerequisite is missing."""
    if ok:
        return
    msg = f"{what} not available: {fix}"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (CI=true: server tests must run)")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s:\n{tail}")


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal the process group the server leads (it was started with start_new_session), wait,
    then SIGKILL whatever is left of the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Workers of the server may outlive the leader for a moment; the group id is the leader's pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    started_s: float = 0.0
    stopped: bool = field(default=False, repr=False)

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Stop by PID (process group); returns seconds until the port was closed."""
        if self.stopped:
            return 0.0
        t0 = time.monotonic()
        stop_group(self.proc, sig)
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stopped = True
        assert not port_open(self.port), f"port {self.port} still open after stopping pid {self.proc.pid}"
        return time.monotonic() - t0


def _spawn(cmd: list[str], log: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})}, **kw)


# -- PostgreSQL ----------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """Debian keeps the server binaries in /usr/lib/postgresql/<major>/bin (not on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class Postgres(Server):
    """A throwaway cluster: initdb into a temp dir, `postgres` on 127.0.0.1:<free> with trust
    auth, fsync off. initdb refuses to run as root, so as root the cluster belongs to the
    `postgres` user (Debian's package creates it) or `nobody`."""

    user = "llamaflow"
    root: Path

    @classmethod
    @contextlib.contextmanager
    def start(cls, databases: tuple[str, ...] = ("prefect", "mlflow")):
        bindir = postgres_bin()
        require("PostgreSQL server binaries (initdb, postgres)", bindir is not None,
                "install Debian's `postgresql` package (infra/ci/install-services.sh)")
        # Not under pytest's tmp (mode 0700, owned by root): the cluster's owner must reach it.
        root = Path(tempfile.mkdtemp(prefix="llamaflow-pg-"))
        run_as = {}
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = pwd.getpwnam("nobody")
            os.chown(root, owner.pw_uid, owner.pw_gid)
            run_as = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
        server = None
        try:
            subprocess.run([bindir / "initdb", "-D", root / "data", "-U", cls.user, "--auth=trust",
                            "-E", "UTF8", "--locale=C", "--no-sync"], check=True,
                           capture_output=True, cwd=root, **run_as)
            port = free_port()
            t0 = time.monotonic()
            proc = _spawn([str(bindir / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1",
                           "-p", str(port), "-k", str(root), "-c", "fsync=off",
                           "-c", "full_page_writes=off", "-c", "max_connections=60"],
                          root / "postgres.log", cwd=root, **run_as)
            server = cls(proc, port, root / "postgres.log")
            server.root = root
            wait_until(lambda: subprocess.run(
                [bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(port), "-U", cls.user],
                capture_output=True).returncode == 0, 60, "postgres", proc, server.log)
            server.started_s = time.monotonic() - t0
            for db in databases:
                subprocess.run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port),
                                "-U", cls.user, db], check=True, capture_output=True)
            yield server
        finally:
            if server is not None:
                # SIGINT is Postgres' "fast" shutdown: it does not wait for clients to leave.
                server.stop(signal.SIGINT)
            shutil.rmtree(root, ignore_errors=True)

    def url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{db}"


# -- Prefect -------------------------------------------------------------------------------------

class PrefectServer(Server):
    home: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, **kw):
        r = requests.request(method, f"{self.api_url}/{path.lstrip('/')}", timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    @classmethod
    @contextlib.contextmanager
    def start(cls, tmp: Path, database_url: str | None = None, timeout: float = 120):
        """`prefect server start` with PREFECT_HOME in `tmp`; SQLite there unless
        `database_url` (postgresql+asyncpg://...) is given."""
        home = Path(tmp) / "prefect-home"
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_URL": "", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
               # the browser UI calls this API; its default is port 4200, not ours
               "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
        if database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
        t0 = time.monotonic()
        proc = _spawn([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                       "--port", str(port)], home / "server.log", env=env)
        server = cls(proc, port, home / "server.log")
        server.home = home
        try:
            wait_until(lambda: requests.get(f"{server.api_url}/health", timeout=2).json() is True,
                       timeout, "prefect server", proc, server.log)
            server.started_s = time.monotonic() - t0
            yield server
        finally:
            server.stop()


# -- MLflow --------------------------------------------------------------------------------------

class MlflowServer(Server):
    artifacts: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, **kw):
        r = requests.request(method, f"{self.url}/api/2.0/mlflow/{path.lstrip('/')}", timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    @classmethod
    @contextlib.contextmanager
    def start(cls, tmp: Path, backend_store_uri: str, timeout: float = 120):
        """`mlflow server --workers 1` with job execution off (2 processes instead of 15), artifacts
        proxied into `tmp`/mlflow-artifacts."""
        artifacts = Path(tmp) / "mlflow-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_TRACKING_URI": ""}
        t0 = time.monotonic()
        proc = _spawn([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                       backend_store_uri, "--artifacts-destination", str(artifacts),
                       "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                      Path(tmp) / "mlflow-server.log", env=env)
        server = cls(proc, port, Path(tmp) / "mlflow-server.log")
        server.artifacts = artifacts
        try:
            wait_until(lambda: requests.get(f"{server.url}/health", timeout=2).text.strip() == "OK",
                       timeout, "mlflow server", proc, server.log)
            server.started_s = time.monotonic() - t0
            yield server
        finally:
            server.stop()


# -- the demo on real servers ---------------------------------------------------------------------

@dataclass
class DemoOnServers:
    postgres: Postgres
    prefect: PrefectServer
    mlflow: MlflowServer
    workdir: Path
    env: dict
    demo: subprocess.CompletedProcess | None = None
    demo_seconds: float = 0.0


def client_env(prefect: PrefectServer, mlflow: MlflowServer, workdir: Path) -> dict:
    """What a user exports to point llamaflow at the servers."""
    return {"PREFECT_API_URL": prefect.api_url, "PREFECT_UI_URL": prefect.ui_url,
            "MLFLOW_TRACKING_URI": mlflow.url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "LLAMAFLOW_WORKDIR": str(workdir), "PREFECT_HOME": str(workdir / "prefect-client")}


def llamaflow(args: list[str], env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "llamaflow"), *args], env={**os.environ, **env},
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def demo_on_servers(tmp: Path, demo_timeout: float = 900):
    """Postgres + Prefect (on Postgres) + MLflow (on Postgres), then `llamaflow demo` against
    them. Yields a DemoOnServers; everything is stopped by PID on exit."""
    tmp = Path(tmp)
    with Postgres.start() as pg, \
            PrefectServer.start(tmp, pg.url("prefect", "postgresql+asyncpg")) as pf, \
            MlflowServer.start(tmp, pg.url("mlflow", "postgresql+psycopg2")) as ml:
        workdir = tmp / "workspace"
        env = client_env(pf, ml, workdir)
        state = DemoOnServers(pg, pf, ml, workdir, env)
        t0 = time.monotonic()
        state.demo = llamaflow(["demo", "--workdir", str(workdir)], env, demo_timeout)
        state.demo_seconds = time.monotonic() - t0
        yield state


@contextlib.contextmanager
def serve_model(args: list[str], timeout: float = 90):
    """`llamaflow serve-model ARGS` as a subprocess, until its banner is printed: yields
    (banner text, the CLI's Popen). Stopped by PID at the end: SIGTERM to the CLI (which stops
    its server's process group), then SIGKILL to both groups."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve-model", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    banner, server_pid = [], None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if line.strip().startswith("server pid:"):
                server_pid = int(line.split(":")[1])
            if line.strip().startswith("EOS id:"):
                break
        text = "".join(banner)
        assert "EOS id:" in text, f"serve-model did not come up: {text}"
        yield text, proc
    finally:
        stop_group(proc, timeout=20)   # the CLI leads its own group; its server has another
        if server_pid is not None:   # stopped by the CLI; SIGKILL in case it was not
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server_pid, signal.SIGKILL)
