"""Prefect deployments of the lifecycle flow, with cron schedules, from conf/deploy/default.yaml.

    llamaflow serve [NAMES]    this process creates the deployments and runs their flow runs
                               (no work pool; needs PREFECT_API_URL for the schedules to persist)
    llamaflow deploy [NAMES]   work pools (cpu, gpu + concurrency limits) and work-pool
                               deployments; `prefect worker start --pool gpu` runs them

Every deployment runs the same flow, `pipelines.lifecycle.lifecycle(overrides, from_stage)`: a
nightly re-evaluation is `overrides=["stages=[evaluate]", "force=[evaluate]"]`, a weekly retrain
`from_stage="pretrain"`. Both parameters are plain JSON (a list of Hydra override strings, a
stage name), so the Prefect UI shows them as a form and every run can change them.

Every flow run works in one persistent workspace: `workdir` in conf/deploy/default.yaml, made
absolute when `deploy`/`serve` runs and passed to each flow run as LLAMAFLOW_WORKDIR (work-pool
deployments: their job variables `env`; serve: this process's environment, which its flow-run
processes inherit), together with MLFLOW_TRACKING_URI and LLAMAFLOW_REMOTE when they are set.
Each deployment's `overrides` start with `base_overrides` (the demo recipe, shipped), so the
deployments run as shipped in a workspace `llamaflow demo` made.

GPU use is bounded twice: the gpu pool's concurrency limit (flow runs at once in the pool) and a
tag concurrency limit on "gpu" (task runs at once across all flow runs; pipelines/runner.py tags
the pretrain, sft and evaluate tasks with it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.config import load_config

DEPLOY_CONFIG = "deploy/default"
_DEPLOYMENT_KEYS = {"description", "pool", "cron", "timezone", "overrides", "from_stage", "tags"}
# Variables of the deploying shell that every flow run gets too: where it tracks and shares.
RUN_ENV_PASSED = ("MLFLOW_TRACKING_URI", "LLAMAFLOW_REMOTE")


def load_deploy_config(overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """conf/deploy/default.yaml with Hydra overrides (e.g. `pools.gpu.concurrency=2`)."""
    cfg = load_config(list(overrides), config_name=DEPLOY_CONFIG)
    _check(cfg)
    return cfg


def _check(cfg: dict) -> None:
    """Clear errors for a bad deploy config, before anything talks to the server."""
    from prefect.schedules import validate_cron_string

    from pipelines.runner import STAGES

    pools = cfg.get("pools") or {}
    if not isinstance(cfg.get("workdir"), str) or not cfg["workdir"]:
        raise ValueError("conf/deploy/default.yaml: workdir must be a path (the workspace every "
                         "deployment run uses)")
    base = cfg.get("base_overrides") or []
    if not isinstance(base, list) or not all(isinstance(o, str) for o in base):
        raise ValueError("conf/deploy/default.yaml: base_overrides must be a list of Hydra "
                         "override strings")
    for name, d in (cfg.get("deployments") or {}).items():
        where = f"conf/deploy/default.yaml: deployments.{name}"
        unknown = set(d) - _DEPLOYMENT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; "
                             f"the keys are {sorted(_DEPLOYMENT_KEYS)}")
        if d.get("pool") not in pools:
            raise ValueError(f"{where}.pool={d.get('pool')!r} is not one of the pools "
                             f"{sorted(pools)} (conf/deploy/default.yaml: pools)")
        if d.get("cron"):
            try:
                validate_cron_string(d["cron"])
            except ValueError as e:
                raise ValueError(f"{where}.cron={d['cron']!r}: {e}") from e
        if d.get("from_stage") is not None and d["from_stage"] not in STAGES:
            raise ValueError(f"{where}.from_stage={d['from_stage']!r}: the stages are {STAGES}")
        if not isinstance(d.get("overrides") or [], list) or \
                not all(isinstance(o, str) for o in d.get("overrides") or []):
            raise ValueError(f"{where}.overrides must be a list of Hydra override strings")
    for name, p in pools.items():
        tpl = p.get("base_job_template")
        if tpl and not Path(tpl).is_file():
            raise ValueError(f"conf/deploy/default.yaml: pools.{name}.base_job_template: no file "
                             f"at {tpl}")


def _selected(cfg: dict, names: list[str] | None) -> dict[str, dict]:
    all_ = cfg.get("deployments") or {}
    if not names:
        return all_
    missing = [n for n in names if n not in all_]
    if missing:
        raise ValueError(f"unknown deployment(s) {missing}; conf/deploy/default.yaml defines "
                         f"{sorted(all_)}")
    return {n: all_[n] for n in names}


def parameters(d: dict, cfg: dict | None = None) -> dict:
    """The flow-run parameters a deployment starts with (editable per run in the UI): the
    config's base_overrides, then the deployment's own overrides."""
    base = list((cfg or {}).get("base_overrides") or [])
    return {"overrides": base + list(d.get("overrides") or []), "from_stage": d.get("from_stage")}


def workspace(cfg: dict) -> Path:
    """The absolute workspace of every flow run (resolved here, where deploy/serve runs)."""
    return Path(cfg["workdir"]).expanduser().resolve()


def run_env(cfg: dict) -> dict[str, str]:
    """The environment every flow run of these deployments gets: LLAMAFLOW_WORKDIR, and
    MLFLOW_TRACKING_URI / LLAMAFLOW_REMOTE as set here. A tracking URI holding a password is
    not copied into the deployment (the worker must have it in its own environment)."""
    env = {"LLAMAFLOW_WORKDIR": str(workspace(cfg))}
    for var in RUN_ENV_PASSED:
        value = os.environ.get(var)
        if value and "@" not in urlsplit(value).netloc:
            env[var] = value
    return env


def describe(cfg: dict) -> str:
    """Where the flow runs of these deployments will work and track (printed by the CLI)."""
    env = run_env(cfg)
    tracking = env.get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{workspace(cfg) / 'mlflow.db'}"
    if "@" in urlsplit(tracking).netloc:
        tracking = "MLFLOW_TRACKING_URI of the worker (it holds credentials: not copied)"
    return (f"flow runs use workspace {env['LLAMAFLOW_WORKDIR']} (LLAMAFLOW_WORKDIR), MLflow "
            f"{tracking}, Prefect {os.environ.get('PREFECT_API_URL') or 'ephemeral (no PREFECT_API_URL)'}; "
            f"every run's overrides start with {cfg.get('base_overrides') or []}")


def deployments(cfg: dict, names: list[str] | None = None, *, for_work_pools: bool = False) -> list:
    """RunnerDeployments of the lifecycle flow, one per entry of cfg["deployments"] (or `names`).

    for_work_pools=True sets each deployment's work pool and the flow runs' environment (for
    `deploy`); otherwise they are for `serve` (this process runs them, in its environment)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from pipelines.lifecycle import lifecycle

    out = []
    for name, d in _selected(cfg, names).items():
        kwargs = dict(name=name, description=d.get("description"), tags=list(d.get("tags") or []),
                      parameters=parameters(d, cfg))
        if d.get("cron"):
            kwargs["schedules"] = [Cron(d["cron"], timezone=d.get("timezone") or "UTC")]
        # Module path, not file path, for both: workers import the installed package (infra/docker
        # images), so a work-pool deployment needs neither code storage nor a built image; and a
        # served flow run loads the flow the same way from any directory. (A file-path
        # entrypoint is relative to the serving directory and needs the deployment's `path`,
        # which a deployment first made by `deploy` keeps at null: the served run then crashed
        # copying its code from `<cwd>/None`.)
        kwargs["entrypoint_type"] = EntrypointType.MODULE_PATH
        if for_work_pools:
            kwargs.update(work_pool_name=d["pool"], job_variables={"env": run_env(cfg)})
        out.append(lifecycle.to_deployment(**kwargs))
    return out


def ensure_work_pools(cfg: dict, pools: set[str] | None = None) -> dict[str, str]:
    """Create (or update the concurrency limit of) the configured work pools, and the task tag
    concurrency limits. Returns {pool name: pool type}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    made = {}
    with get_client(sync_client=True) as client:
        for name, p in (cfg.get("pools") or {}).items():
            if pools is not None and name not in pools:
                continue
            if p.get("base_job_template"):
                template = json.loads(Path(p["base_job_template"]).read_text())
            elif p["type"] == "process":
                template = ProcessWorker.get_default_base_job_template()
            else:  # the server fills in the default template of a known worker type
                template = {}
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type=p["type"], description=p.get("description"),
                    base_job_template=template, concurrency_limit=p.get("concurrency")))
            except ObjectAlreadyExists:
                client.update_work_pool(name, WorkPoolUpdate(
                    description=p.get("description"), concurrency_limit=p.get("concurrency"),
                    **({"base_job_template": template} if template else {})))
            made[name] = p["type"]
        for tag, limit in (cfg.get("task_concurrency") or {}).items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=int(limit))
    return made


def deploy(names: list[str] | None = None, work_pool: str | None = None, image: str | None = None,
           overrides: list[str] | tuple[str, ...] = ()) -> list:
    """Work pools + work-pool deployments on the Prefect server at PREFECT_API_URL.

    `work_pool` sends every selected deployment to that pool instead of its configured one;
    `image` (or cfg["image"]) is the image docker/kubernetes workers run. Returns deployment ids."""
    import prefect

    cfg = load_deploy_config(overrides)
    if work_pool is not None:
        if work_pool not in (cfg.get("pools") or {}):
            raise ValueError(f"work pool {work_pool!r} is not configured; conf/deploy/default.yaml "
                             f"pools: {sorted(cfg.get('pools') or {})}")
        for d in _selected(cfg, names).values():
            d["pool"] = work_pool
    image = image or cfg.get("image")
    selected = _selected(cfg, names)
    ensure_work_pools(cfg, {d["pool"] for d in selected.values()})
    ids = []
    for pool in sorted({d["pool"] for d in selected.values()}):
        group = [n for n, d in selected.items() if d["pool"] == pool]
        ids += prefect.deploy(*deployments(cfg, group, for_work_pools=True), work_pool_name=pool,
                              image=image, build=False, push=False,
                              print_next_steps_message=False, ignore_warnings=True)
    return ids


def serve(names: list[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Create the deployments and run their scheduled (and UI-triggered) flow runs in this
    process until interrupted. Tag concurrency limits are applied; work pools are not used."""
    import prefect
    from prefect.client.orchestration import get_client

    cfg = load_deploy_config(overrides)
    # The flow-run processes this runner starts inherit its environment.
    os.environ.update(run_env(cfg))
    with get_client(sync_client=True) as client:
        for tag, limit in (cfg.get("task_concurrency") or {}).items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=int(limit))
    prefect.serve(*deployments(cfg, names))
