"""Prefect deployments of the lifecycle flow, with cron schedules, from conf/deploy/default.yaml.

    llamaflow serve [NAMES]    this process creates the deployments and runs their flow runs
                               (no work pool; needs PREFECT_API_URL for the schedules to persist)
    llamaflow deploy [NAMES]   work pools (cpu, gpu + concurrency limits) and work-pool
                               deployments; `prefect worker start --pool gpu` runs them

Every deployment runs the same flow, `pipelines.lifecycle.lifecycle(overrides, from_stage)`: a
nightly re-evaluation is `overrides=["stages=[evaluate]", "force=[evaluate]"]`, a weekly retrain
`from_stage="pretrain"`. Both parameters are plain JSON (a list of Hydra override strings, a
stage name), so the Prefect UI shows them as a form and every run can change them.

Every flow run works in one persistent workspace: `workdir` in conf/deploy/default.yaml, passed
to each flow run as LLAMAFLOW_WORKDIR. For `serve` and process pools, whose flow runs see this
machine's files, it is made absolute when `deploy`/`serve` runs (process pools: the
deployment's job variables `env`, with MLFLOW_TRACKING_URI and LLAMAFLOW_REMOTE when they are
set and hold no credentials; serve: this process's environment, which its flow-run processes
inherit). Docker and Kubernetes pools run in containers whose job template sets the environment
(infra/k8s/gpu-base-job-template.json: the workspace volume at /workspace, the in-cluster MLflow):
a deployment's `env` would replace those defaults, so it gets none, unless `workdir` was set
explicitly (`--overrides workdir=/mnt/ws`): then that path, as given, merged into the template's
defaults. Each deployment's `overrides` start with `base_overrides` (the demo recipe, shipped), so
the deployments run as shipped in a workspace `llamaflow demo` made.

GPU use is bounded twice: the gpu pool's concurrency limit (flow runs at once in the pool) and a
tag concurrency limit on "gpu" (task runs at once across all flow runs; pipelines/runner.py tags
the pretrain, sft and evaluate tasks with it).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.config import CONF_DIR, load_config

DEPLOY_CONFIG = "deploy/default"
# conf/deploy/default.yaml's own workdir: LLAMAFLOW_WORKDIR of the deploying shell, else
# ./workspace. Anything else (a `workdir=` override, an edited file) is a workdir set explicitly.
SHIPPED_WORKDIR = "${oc.env:LLAMAFLOW_WORKDIR,workspace}"
# A URL anywhere in an override string (`source.url=https://...`, `tracking.tracking_uri=...`).
_URL = re.compile(r"""[A-Za-z][\w+.-]*://[^\s'"\],]+""")
_DEPLOYMENT_KEYS = {"description", "pool", "cron", "timezone", "overrides", "from_stage", "tags",
                    "flow", "parameters"}
# The flows a deployment can run (its `flow`, default lifecycle): module and name.
FLOWS = {"lifecycle": ("pipelines.lifecycle", "lifecycle"),
         "serve-champion": ("pipelines.serve_champion", "serve_champion")}


def flow_of(d: dict):
    """The Prefect flow object deployment `d` runs."""
    import importlib

    module, name = FLOWS[d.get("flow") or "lifecycle"]
    return getattr(importlib.import_module(module), name)
# Variables of the deploying shell that flow runs of serve and process pools get too: where
# they track and share (docker/kubernetes pods get theirs from the job template).
RUN_ENV_PASSED = ("MLFLOW_TRACKING_URI", "LLAMAFLOW_REMOTE")


def load_deploy_config(overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """conf/deploy/default.yaml with Hydra overrides (e.g. `pools.gpu.concurrency=2`)."""
    cfg = load_config(list(overrides), config_name=DEPLOY_CONFIG)
    _check(cfg)
    return cfg


def _check(cfg: dict) -> None:
    """Clear errors for a bad deploy config, before anything talks to the server."""
    from prefect.schedules import validate_cron_string

    from pipelines.stages import stage_order

    stages = stage_order()
    pools = cfg.get("pools") or {}
    if not isinstance(cfg.get("workdir"), str) or not cfg["workdir"]:
        raise ValueError("conf/deploy/default.yaml: workdir must be a path (the workspace every "
                         "deployment run uses)")
    base = cfg.get("base_overrides") or []
    if not isinstance(base, list) or not all(isinstance(o, str) for o in base):
        raise ValueError("conf/deploy/default.yaml: base_overrides must be a list of Hydra "
                         "override strings")
    check_secrets(cfg)
    for name, d in (cfg.get("deployments") or {}).items():
        where = f"conf/deploy/default.yaml: deployments.{name}"
        unknown = set(d) - _DEPLOYMENT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; "
                             f"the keys are {sorted(_DEPLOYMENT_KEYS)}")
        kind = d.get("flow") or "lifecycle"
        if kind not in FLOWS:
            raise ValueError(f"{where}.flow={kind!r}: the flows are {sorted(FLOWS)}")
        if kind != "lifecycle":
            _check_flow_parameters(where, d)
        elif d.get("parameters"):
            raise ValueError(f"{where}.parameters: a lifecycle deployment takes `overrides` and "
                             "`from_stage`, not `parameters`")
        if d.get("pool") not in pools:
            raise ValueError(f"{where}.pool={d.get('pool')!r} is not one of the pools "
                             f"{sorted(pools)} (conf/deploy/default.yaml: pools)")
        if d.get("cron"):
            try:
                validate_cron_string(d["cron"])
            except ValueError as e:
                raise ValueError(f"{where}.cron={d['cron']!r}: {e}") from e
        if d.get("from_stage") is not None and d["from_stage"] not in stages:
            raise ValueError(f"{where}.from_stage={d['from_stage']!r}: the stages are {stages}")
        if not isinstance(d.get("overrides") or [], list) or \
                not all(isinstance(o, str) for o in d.get("overrides") or []):
            raise ValueError(f"{where}.overrides must be a list of Hydra override strings")
    for name, p in pools.items():
        tpl = p.get("base_job_template")
        if tpl and not Path(tpl).is_file():
            raise ValueError(f"conf/deploy/default.yaml: pools.{name}.base_job_template: no file "
                             f"at {tpl}")


def _check_flow_parameters(where: str, d: dict) -> None:
    """A non-lifecycle deployment: `parameters` names arguments of its flow, and the lifecycle's
    own keys are not given."""
    import inspect

    for key in ("overrides", "from_stage"):
        if d.get(key):
            raise ValueError(f"{where}.{key}: flow {d['flow']!r} takes `parameters`, not {key}")
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}.parameters must be a mapping of the flow's arguments")
    known = set(inspect.signature(flow_of(d).fn).parameters)
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"{where}.parameters: unknown argument(s) {sorted(unknown)} of flow "
                         f"{d['flow']!r}; its arguments are {sorted(known)}")


def holds_secret(uri: str) -> bool:
    """A URL with credentials (user:password@), a query string (a presigned URL's signature, a
    token) or a fragment: never stored in a deployment, printed only redacted."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return True
    return bool("@" in parts.netloc or parts.query or parts.fragment)


def redacted(text: str) -> str:
    """`text` with every URL in it redacted as MLflow params and logs are (no userinfo, query
    string or fragment; sqlite paths kept)."""
    from pipelines.tracking import redact

    return redact(text)


def check_secrets(cfg: dict) -> None:
    """Overrides become the deployments' parameters, stored on the Prefect server and shown in its
    UI to everyone who can read it: a signed URL or a password must come from the worker's
    environment instead (ValueError naming the override, redacted). Needs no Prefect import."""
    lists = [("base_overrides", cfg.get("base_overrides"))] + [
        (f"deployments.{n}.overrides", d.get("overrides"))
        for n, d in (cfg.get("deployments") or {}).items() if isinstance(d, dict)]
    for where, overrides in lists:
        _refuse_secrets(where, overrides if isinstance(overrides, list) else [])


def _refuse_secrets(where: str, overrides: list) -> None:
    for i, o in enumerate(overrides):
        if isinstance(o, str) and any(holds_secret(u) for u in _URL.findall(o)):
            raise ValueError(
                f"conf/deploy/default.yaml: {where}[{i}] {redacted(o)!r} holds a URL with "
                "credentials or a query string (a presigned URL's signature), which the "
                "deployment would store in its parameters on the Prefect server. Export the URL "
                "in the worker's environment (e.g. LLAMAFLOW_SOURCE_URL=...) and give "
                "source.url_env=LLAMAFLOW_SOURCE_URL instead (a tracking URI: MLFLOW_TRACKING_URI "
                "in the worker's environment).")


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
    config's base_overrides, then the deployment's own overrides; for another flow, its
    `parameters`."""
    if (d.get("flow") or "lifecycle") != "lifecycle":
        return dict(d.get("parameters") or {})
    base = list((cfg or {}).get("base_overrides") or [])
    return {"overrides": base + list(d.get("overrides") or []), "from_stage": d.get("from_stage")}


def workspace(cfg: dict) -> Path:
    """The absolute workspace of every flow run of `serve` and of process pools (resolved here,
    where deploy/serve runs)."""
    return Path(cfg["workdir"]).expanduser().resolve()


def workdir_given(overrides: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether `workdir` was set explicitly (a `workdir=` override, or conf/deploy/default.yaml
    edited), not LLAMAFLOW_WORKDIR of the deploying shell or ./workspace: only then do
    docker/kubernetes pools get it (the deploying shell's is a path on this machine)."""
    if any(o.lstrip("+").split("=", 1)[0] == "workdir" for o in overrides):
        return True
    import yaml

    raw = yaml.safe_load((CONF_DIR / f"{DEPLOY_CONFIG}.yaml").read_text()) or {}
    return raw.get("workdir") != SHIPPED_WORKDIR


def run_env(cfg: dict) -> dict[str, str]:
    """The environment every flow run of `serve` and of process pools gets: LLAMAFLOW_WORKDIR,
    and MLFLOW_TRACKING_URI / LLAMAFLOW_REMOTE as set here. A URI with credentials or a query
    string (a password, a token) is not copied into the deployment (the worker must have it in
    its own environment)."""
    env = {"LLAMAFLOW_WORKDIR": str(workspace(cfg))}
    for var in RUN_ENV_PASSED:
        value = os.environ.get(var)
        if value and not holds_secret(value):
            env[var] = value
    return env


def template_env(template: dict | None) -> dict[str, str]:
    """The defaults of a base job template's `env` variable (what its flow runs get when the
    deployment sets no `env`)."""
    props = ((template or {}).get("variables") or {}).get("properties") or {}
    return dict((props.get("env") or {}).get("default") or {})


def configured_pool(cfg: dict, name: str) -> dict:
    """A pool as conf/deploy describes it: its type and base job template (None when the server
    gives the type's default)."""
    p = (cfg.get("pools") or {})[name]
    tpl = p.get("base_job_template")
    return {"type": p["type"], "base_job_template": json.loads(Path(tpl).read_text()) if tpl else None}


def job_variables(cfg: dict, pool: dict, explicit_workdir: bool = False) -> dict:
    """A work-pool deployment's job variables. Prefect replaces the template's whole `env` with
    the deployment's, so whatever is set here is merged into the template's defaults.

    process: run_env (the workspace made absolute here, where the worker's files are this
    machine's). docker/kubernetes: nothing, the template's env stays (the workspace volume, the
    in-cluster MLflow), unless the workdir was set explicitly: then that path as given (a path
    inside the container; this machine's absolute path would lie outside the volume)."""
    defaults = template_env(pool.get("base_job_template"))
    if pool["type"] == "process":
        return {"env": {**defaults, **run_env(cfg)}}
    if explicit_workdir:
        return {"env": {**defaults, "LLAMAFLOW_WORKDIR": str(cfg["workdir"])}}
    return {}


def runs_here(cfg: dict, names: list[str] | None = None, work_pool: str | None = None) -> bool:
    """Whether any selected deployment goes to a process pool (its workspace is then a path on
    this machine, resolved and checked here)."""
    pools = cfg.get("pools") or {}
    chosen = {work_pool} if work_pool else {d.get("pool") for d in _selected(cfg, names).values()}
    return any((pools.get(p) or {}).get("type", "process") == "process" for p in chosen)


def describe(cfg: dict, names: list[str] | None = None, *, for_work_pools: bool = False,
             work_pool: str | None = None, explicit_workdir: bool = False) -> str:
    """Where the flow runs of these deployments will work and track (printed by the CLI),
    every URL redacted."""
    parts = []
    pools = {}
    if for_work_pools:
        for d in _selected(cfg, names).values():
            name = work_pool or d["pool"]
            pools[name] = configured_pool(cfg, name)
    local = [n for n, p in pools.items() if p["type"] == "process"]
    if not for_work_pools or local:
        env = run_env(cfg)
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{workspace(cfg) / 'mlflow.db'}"
        if "MLFLOW_TRACKING_URI" in os.environ and "MLFLOW_TRACKING_URI" not in env:
            tracking = f"{redacted(tracking)} (the worker's MLFLOW_TRACKING_URI: it holds " \
                "credentials or a query string, not copied)"
        where = f" (pool {', '.join(sorted(local))})" if for_work_pools else ""
        parts.append(f"flow runs use workspace {env['LLAMAFLOW_WORKDIR']} (LLAMAFLOW_WORKDIR), "
                     f"MLflow {tracking}{where}")
    for name, p in sorted(pools.items()):
        if p["type"] == "process":
            continue
        env = job_variables(cfg, p, explicit_workdir).get("env") or \
            template_env(p["base_job_template"])
        shown = ", ".join(f"{k}={redacted(env[k])}" for k in ("LLAMAFLOW_WORKDIR", "MLFLOW_TRACKING_URI")
                          if k in env) or "as its worker's job template sets them"
        parts.append(f"pool {name} ({p['type']}) flow runs use its job template's environment: "
                     f"{shown}")
    prefect = os.environ.get("PREFECT_API_URL")
    parts.append(f"Prefect {redacted(prefect) if prefect else 'ephemeral (no PREFECT_API_URL)'}")
    return "; ".join(parts) + f"; every run's overrides start with {cfg.get('base_overrides') or []}"


def deployments(cfg: dict, names: list[str] | None = None, *, for_work_pools: bool = False,
                pools: dict[str, dict] | None = None, explicit_workdir: bool = False) -> list:
    """RunnerDeployments of their flows (the lifecycle's, or `flow`), one per entry of cfg["deployments"] (or `names`).

    for_work_pools=True sets each deployment's work pool and job variables (for `deploy`; the
    pools' types and templates from `pools`, as the server has them, else from conf/deploy);
    otherwise they are for `serve` (this process runs them, in its environment)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

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
            pool = (pools or {}).get(d["pool"]) or configured_pool(cfg, d["pool"])
            kwargs.update(work_pool_name=d["pool"],
                          job_variables=job_variables(cfg, pool, explicit_workdir))
        out.append(flow_of(d).to_deployment(**kwargs))
    return out


def ensure_work_pools(cfg: dict, pools: set[str] | None = None) -> dict[str, dict]:
    """Create (or update the concurrency limit of) the configured work pools, and the task tag
    concurrency limits. Returns {pool name: {"type", "base_job_template"}} as the server has them.
    A pool that exists with another type is an error (its template is not overwritten)."""
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
                existing = client.read_work_pool(name)
                if existing.type != p["type"]:
                    raise ValueError(
                        f"work pool {name!r} exists on the Prefect server with type "
                        f"{existing.type!r}, conf/deploy/default.yaml says pools.{name}.type="
                        f"{p['type']!r}: set that (e.g. --overrides pools.{name}.type="
                        f"{existing.type}) or delete the pool (`prefect work-pool delete {name}`)"
                    ) from None
                client.update_work_pool(name, WorkPoolUpdate(
                    description=p.get("description"), concurrency_limit=p.get("concurrency"),
                    **({"base_job_template": template} if template else {})))
            pool = client.read_work_pool(name)
            made[name] = {"type": pool.type, "base_job_template": pool.base_job_template}
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
    pools = ensure_work_pools(cfg, {d["pool"] for d in selected.values()})
    explicit = workdir_given(overrides)
    ids = []
    for pool in sorted({d["pool"] for d in selected.values()}):
        group = [n for n, d in selected.items() if d["pool"] == pool]
        ids += prefect.deploy(*deployments(cfg, group, for_work_pools=True, pools=pools,
                                           explicit_workdir=explicit), work_pool_name=pool,
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
