"""`llamaflow` — the command line.

    llamaflow run [--from STAGE] [-m] [hydra overrides...]   the lifecycle (or part of it)
    llamaflow demo [--workdir DIR] [--http] [--from STAGE] [-m] [overrides...]
                                                            the tiny CPU lifecycle, offline; its
                                                            checkpoint stays for `run recipe=demo`
    llamaflow config [--check] [overrides...]               print the resolved config, or
                                                            check it (every stage, its files)
    llamaflow config --help-stage STAGE | --write-defaults  a stage's keys, defaults and meaning;
                                                            the generated conf/ files from them
    llamaflow ui [--workdir DIR] [--port N]                 the MLflow UI on the workspace database
    llamaflow verify [--workdir DIR] [STAGE...]             re-hash every artifact against its manifest
    llamaflow review [--workdir DIR] [--run ID] [--port N] [--reviewer NAME]
                                                            score a run's answers, blind (MLflow traces)
    llamaflow serve | deploy                                Prefect deployments with schedules
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.stages import declared, stage_order, task_names

# `source.url=https://...` or, quoted as Hydra needs when the URL holds `=`, `source.url='https://...'`
# (with Hydra's + or ++ in front too); and `tracking.tracking_uri=scheme://user:password@...`.
_URL_OVERRIDE = re.compile(
    r"""^\+{0,2}(?P<key>[\w.]*url)=(?P<q>['"]?)(?P<url>https?://(?P<host>[^/\s'"]*)[^\s'"]*)(?P=q)$""")
_TRACKING_URI_OVERRIDE = re.compile(
    r"""^\+{0,2}tracking\.tracking_uri=(?P<q>['"]?)(?P<uri>[a-z][a-z0-9+.-]*://[^\s'"]+)(?P=q)$""")


def _workdir(overrides: list[str]) -> Path:
    for o in overrides:
        if o.startswith("workdir="):
            return Path(o.split("=", 1)[1]).expanduser().resolve()
    return Path(os.environ.get("LLAMAFLOW_WORKDIR", "workspace")).resolve()


def _hide_secrets(overrides: list[str]) -> list[str]:
    """A presigned URL given on the command line (`source.url=https://...?Signature=...`) moves to
    an environment variable, so the signature never becomes a Prefect parameter, an MLflow param
    or a log line; the override becomes `source.url_env=LLAMAFLOW_SOURCE_URL`. A tracking URI
    with a password or a query string moves to MLFLOW_TRACKING_URI, which the tracker reads when
    `tracking.tracking_uri` is null."""
    out = []
    for o in overrides:
        m = _URL_OVERRIDE.match(o)
        t = _TRACKING_URI_OVERRIDE.match(o)
        if m and ("?" in m["url"] or "@" in m["host"]):
            os.environ["LLAMAFLOW_SOURCE_URL"] = m["url"]
            out += [f"{m['key']}=null", f"{m['key']}_env=LLAMAFLOW_SOURCE_URL"]
        elif t and ("@" in t["uri"].split("/", 3)[2] or "?" in t["uri"]):
            os.environ["MLFLOW_TRACKING_URI"] = t["uri"]
            out.append("tracking.tracking_uri=null")
        else:
            out.append(o)
    return out


def _prepare_environment(workdir: Path) -> None:
    """Before Prefect is imported: without PREFECT_API_URL the ephemeral Prefect server keeps its
    SQLite database in the workspace, beside MLflow's. A workspace that cannot be created or
    written is a ConfigError here (Prefect would only time out waiting for its server)."""
    from pipelines.config import ConfigError
    from pipelines.validate import workdir_problem

    problem = workdir_problem(workdir, create=True)
    if problem is not None:
        raise ConfigError([problem])
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    import pipelines  # noqa: F401  (sets the offline defaults)
    from pipelines.workspace import start_prefect_server

    try:
        start_prefect_server(workdir)  # once per workspace at a time; out of Ctrl-C's reach
    except RuntimeError as e:
        if not _ephemeral_server_timed_out(e):
            raise
        raise SystemExit(2) from None


def _pin_workdir(overrides: list[str]) -> None:
    """A workdir taken from LLAMAFLOW_WORKDIR or the default `workspace` is relative to this
    process's directory; make it absolute for the run, so paths composed from it (the demo
    source, `${workdir}/demo-source`, is part of the download stage's cache key) are the same
    strings whichever way the workspace was named."""
    if not any(o.startswith("workdir=") for o in overrides):
        os.environ["LLAMAFLOW_WORKDIR"] = str(_workdir(overrides))


def cmd_run(args) -> int:
    _pin_workdir(args.overrides)
    return _run(_hide_secrets(args.overrides), args.from_stage, args.multirun)


def _run(overrides: list[str], from_stage: str | None, multirun: bool) -> int:
    from pipelines.config import expand_sweep
    from pipelines.validate import check

    runs = expand_sweep(overrides) if multirun else [overrides]
    # Every run's config, every stage, before Prefect starts (the flow checks again: deployments)
    workdirs = [Path(check(ov, from_stage)[0]["workdir"]).expanduser().resolve() for ov in runs]
    _prepare_environment(workdirs[0] if workdirs else _workdir(overrides))
    from pipelines.console import error_line, quiet_engine_tracebacks, summary
    from pipelines.lifecycle import lifecycle

    quiet_engine_tracebacks()
    outcomes = []   # (title, result or the exception): every member is reported, failed or not
    for i, ov in enumerate(runs):
        title = f"multirun {i + 1}/{len(runs)}: {' '.join(ov)}" if len(runs) > 1 else None
        if title:
            print(f"== {title}", flush=True)
        try:
            outcomes.append((title, lifecycle(overrides=ov, from_stage=from_stage)))
        except Exception as e:
            if _ephemeral_server_timed_out(e):  # the later members would time out the same way
                outcomes.append((title, e))
                break
            outcomes.append((title, e))
    for title, outcome in outcomes:
        if isinstance(outcome, BaseException):
            print(f"\n== {title}" if title else "", file=sys.stderr)
            print(error_line(outcome), file=sys.stderr)
        else:
            print(summary(outcome, title), flush=True)
    failed = [o for _, o in outcomes if isinstance(o, BaseException)]
    # 2: nothing could have run (a config problem, no Prefect server); 1: a stage failed
    if failed and all(isinstance(o, ConfigError) or _timed_out(o) for o in failed):
        return 2
    return 1 if failed else 0


def _timed_out(e: BaseException) -> bool:
    return "Timed out while attempting to connect to ephemeral Prefect API server" in str(e)


def _ephemeral_server_timed_out(e: BaseException) -> bool:
    """Prefect's own error when its temporary server does not answer in time names no fix:
    print one that does (True), or leave the error alone (False)."""
    if not _timed_out(e):
        return False
    from pipelines import EPHEMERAL_STARTUP_TIMEOUT_ENV

    limit = os.environ.get(EPHEMERAL_STARTUP_TIMEOUT_ENV)
    print(f"llamaflow: Prefect's temporary server (PREFECT_HOME={os.environ.get('PREFECT_HOME')}) "
          f"did not start within {EPHEMERAL_STARTUP_TIMEOUT_ENV}={limit} s. On a busy machine "
          f"allow it longer, e.g. `export {EPHEMERAL_STARTUP_TIMEOUT_ENV}=600`, or start one "
          "server for all runs (`prefect server start`) and set PREFECT_API_URL="
          "http://127.0.0.1:4200/api.", file=sys.stderr)
    return True


def cmd_demo(args) -> int:
    """Synthesise the demo checkpoint into the workspace (once), then `run` recipe=demo on it,
    with the same --from/-m handling; --http downloads it from a 127.0.0.1 server instead."""
    import contextlib

    from pipelines.config import ConfigError
    from pipelines.validate import workdir_problem

    workdir = Path(args.workdir).expanduser().resolve()
    problem = workdir_problem(workdir, create=True)   # before anything is written there
    if problem is not None:
        raise ConfigError([problem])
    from pipelines.demo import demo_overrides, ensure_demo_source, serve_directory

    source = ensure_demo_source(workdir, recipe=args.recipe)
    with (serve_directory(source) if args.http else contextlib.nullcontext()) as url:
        if url:
            print(f"demo: serving the synthetic Meta checkpoint at {url}", flush=True)
        rc = _run(demo_overrides(workdir, _hide_secrets(args.overrides), url, args.recipe),
                  args.from_stage, args.multirun)
    if rc:
        return rc
    here = "" if _workdir([]) == workdir else f"LLAMAFLOW_WORKDIR={workdir} "
    print(f"Next:      {here}llamaflow run recipe={args.recipe} pretrain.lora.r=16   "
          "(README: Using it)")
    return 0


def cmd_config(args) -> int:
    from pipelines.config import load_config, to_yaml

    if args.help_stage or args.write_defaults:
        return _stage_defaults(args.help_stage, args.write_defaults)
    overrides = _hide_secrets(args.overrides)
    if args.check:  # what `llamaflow run` checks before any work, without running
        from pipelines.validate import check

        _, checked = check(overrides, args.from_stage)
        print(f"config OK: {len(checked)} stages checked ({', '.join(checked)})")
        return 0
    print(to_yaml(load_config(overrides)))
    return 0


def _stage_defaults(help_stage: str | None, write: bool) -> int:
    """--help-stage: a stage's keys with their defaults and meaning; --write-defaults: regenerate
    conf/<stage>/default.yaml and the group options written from a model (conf/source/<kind>.yaml,
    conf/launcher/single.yaml) from the stages' models (pipelines/defaults.py)."""
    from pipelines import defaults
    from pipelines.config import suggest
    from pipelines.stages import task_names

    if help_stage is not None:
        names = task_names()
        if help_stage not in names:
            print(f"llamaflow config: no stage {help_stage!r}{suggest(help_stage, names)} (the "
                  f"stages: {', '.join(names)})", file=sys.stderr)
            return 2
        print(defaults.describe(help_stage))
    if write:
        written = defaults.write()
        for path in written:
            print(f"wrote {path}")
        if not written:
            print("every generated conf/ file is already what its Config gives")
    return 0


def cmd_verify(args) -> int:
    """Every artifact (of the given stages) re-hashed against its manifest: each damaged one
    named with its files, exit 1 if any is."""
    from pipelines.artifacts import Store

    order, tasks = stage_order(), task_names()
    unknown = [s for s in args.stages if s not in tasks]
    if unknown:
        print(f"llamaflow verify: unknown stage(s) {', '.join(unknown)} (the stages: "
              f"{', '.join(tasks)})", file=sys.stderr)
        return 2
    store = Store(Path(args.workdir).expanduser().resolve() / "artifacts")
    arts = [a for stage in (args.stages or [None]) for a in store.artifacts(stage)]
    damaged = []
    for a in arts:
        bad = store.verify(a)
        if bad:
            damaged.append(a)
            what = [f"{f} ({'sha256 differs' if (a.path / f).is_file() else 'missing'})"
                    for f in bad]
            print(f"DAMAGED {a.stage} {a.path}: {', '.join(what)}", flush=True)
    print(f"{len(arts)} artifact(s) in {store.root} checked, {len(damaged)} damaged")
    if damaged:
        # force names the stage a part runs in (a damaged report: force=[evaluate])
        forced = {declared(a.stage).part_of or a.stage if a.stage in tasks else a.stage
                  for a in damaged}
        stages = sorted(forced, key=lambda s: order.index(s) if s in order else len(order))
        print(f"recompute them with `llamaflow run force=[{','.join(stages)}]` (the same "
              "overrides as the run that made them)")
    return 1 if damaged else 0


def cmd_ui(args) -> int:
    workdir = Path(args.workdir).expanduser().resolve()
    db = workdir / "mlflow.db"
    if not db.is_file():
        print(f"no MLflow database at {db}: run `llamaflow demo` or `llamaflow run` first",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    print(" ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)


def cmd_review(args) -> int:
    """The blind review page of one lifecycle run's answers (pipelines/reviews.py): each score
    becomes a human_score feedback on that answer's MLflow trace."""
    from pipelines import reviews
    from pipelines.tracking import Tracker

    workdir = Path(args.workdir).expanduser().resolve()
    db = workdir / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not db.is_file():
        print(f"llamaflow review: no MLflow database at {db}: run `llamaflow demo` or "
              "`llamaflow run` first (or set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 2
    try:
        run_id = args.run or reviews.latest_run_id(workdir)
        tracker = Tracker(workdir, {})
        server = reviews.make_server(tracker, run_id, args.host, args.port, args.reviewer or "")
    except reviews.ReviewError as e:
        print(f"llamaflow review: {e}; lifecycle runs are listed in {workdir / 'latest.json'} "
              "(the latest) and by `llamaflow ui` (experiment llamaflow, the parent runs)",
              file=sys.stderr)
        return 2
    except OSError as e:
        print(f"llamaflow review: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"llamaflow review: run {run_id}: http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nllamaflow review: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def cmd_deploy(args, serve: bool) -> int:
    from pipelines import deploy
    from pipelines.config import load_config

    cmd = "serve" if serve else "deploy"
    names = args.names or None
    work_pool = None if serve else args.work_pool
    # Composed without deploy's full check, which imports Prefect (PREFECT_HOME comes first):
    # enough to refuse secrets before anything starts and to see which pools the runs go to.
    raw = load_config(args.overrides, config_name=deploy.DEPLOY_CONFIG)
    try:
        deploy.check_secrets(raw)
        here = serve or deploy.runs_here(raw, names, work_pool)
    except ValueError as e:
        print(f"llamaflow {cmd}: {e}", file=sys.stderr)
        return 2
    if here:   # serve and process pools: the workspace is a path on this machine
        _prepare_environment(_workdir(args.overrides))
    elif not os.environ.get("PREFECT_API_URL"):
        print("llamaflow deploy: docker/kubernetes pools are polled by workers elsewhere: set "
              "PREFECT_API_URL to their Prefect server (a temporary one here would keep the "
              "deployments from them)", file=sys.stderr)
        return 2
    try:
        cfg = deploy.load_deploy_config(args.overrides)
        print(f"llamaflow {cmd}: " + deploy.describe(
            cfg, names, for_work_pools=not serve, work_pool=work_pool,
            explicit_workdir=deploy.workdir_given(args.overrides)), flush=True)
        if not serve:
            ids = deploy.deploy(names=names, work_pool=work_pool, image=args.image,
                                overrides=args.overrides)
    except ValueError as e:   # the config or the server's pools: the field and the fix
        print(f"llamaflow {cmd}: {e}", file=sys.stderr)
        return 2
    if serve:
        deploy.serve(names=names, overrides=args.overrides)
    else:
        print(f"llamaflow deploy: {len(ids)} deployment(s) created or updated; start a worker "
              "with `prefect worker start --pool cpu` (and --pool gpu)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llamaflow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the lifecycle with Hydra overrides")
    r.add_argument("--from", dest="from_stage", choices=stage_order(),
                   help="recompute this stage and all after it; upstream comes from the cache")
    r.add_argument("-m", "--multirun", action="store_true",
                   help="a=1,2 b=x,y → one lifecycle run per combination (shared upstream cache)")
    r.add_argument("overrides", nargs="*")
    d = sub.add_parser("demo", help="the tiny CPU lifecycle on a synthetic checkpoint it keeps "
                                    "in the workspace (then: llamaflow run recipe=demo ...)")
    d.add_argument("--workdir", default=os.environ.get("LLAMAFLOW_WORKDIR", "workspace"))
    d.add_argument("--recipe", default="demo", choices=("demo", "demo-llama3"),
                   help="demo-llama3: a Llama-3-shaped checkpoint with the real Llama 3 tokenizer "
                        "(from the llama-models package)")
    d.add_argument("--http", action="store_true",
                   help="download the checkpoint from a 127.0.0.1 HTTP server (a url source, as "
                        "Meta's presigned URLs are) instead of reading the folder")
    d.add_argument("--from", dest="from_stage", choices=stage_order(),
                   help="recompute this stage and all after it; upstream comes from the cache")
    d.add_argument("-m", "--multirun", action="store_true",
                   help="a=1,2 b=x,y → one lifecycle run per combination (shared upstream cache)")
    d.add_argument("overrides", nargs="*")
    c = sub.add_parser("config", help="print the resolved config (--check: validate it)")
    c.add_argument("--check", action="store_true",
                   help="check every stage's config and files as `run` does; exit 2 on problems")
    c.add_argument("--from", dest="from_stage", choices=stage_order(),
                   help="with --check: the stages a `run --from STAGE` would check")
    c.add_argument("--help-stage", metavar="STAGE",
                   help="every key of a stage's section: its default, type and what it does")
    c.add_argument("--write-defaults", action="store_true",
                   help="regenerate conf/<stage>/default.yaml, conf/source/<kind>.yaml and "
                        "conf/launcher/single.yaml from the stages' models")
    c.add_argument("overrides", nargs="*")
    u = sub.add_parser("ui", help="MLflow UI on the workspace database")
    u.add_argument("--workdir", default=os.environ.get("LLAMAFLOW_WORKDIR", "workspace"))
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    v = sub.add_parser("verify", help="re-hash every artifact (or those of the given stages) "
                                      "against its manifest; exit 1 when one is damaged")
    v.add_argument("--workdir", default=os.environ.get("LLAMAFLOW_WORKDIR", "workspace"))
    v.add_argument("stages", nargs="*", metavar="STAGE")
    rv = sub.add_parser("review", help="score the answers of a lifecycle run's models, blind "
                                       "(a page on 127.0.0.1; scores go to MLflow traces)")
    rv.add_argument("--workdir", default=os.environ.get("LLAMAFLOW_WORKDIR", "workspace"))
    rv.add_argument("--run", metavar="MLFLOW_PARENT_RUN_ID",
                    help="the lifecycle run (default: the workspace's latest.json)")
    rv.add_argument("--host", default="127.0.0.1")
    rv.add_argument("--port", type=int, default=8640)
    rv.add_argument("--reviewer", metavar="NAME", help="prefills the reviewer name")
    sm = sub.add_parser("serve-model", help="serve a GGUF the lifecycle made through an "
                                            "OpenAI-compatible llama.cpp server")
    sm.add_argument("model", nargs="?", default=None, metavar="MODEL",
                    help="default: the f16 GGUF of the registered model's champion (else "
                         "candidate); or a quant type (q4_k_m), a quantize artifact key prefix, "
                         "alias:NAME, or a path to a .gguf")
    sm.add_argument("--workdir", default=os.environ.get("LLAMAFLOW_WORKDIR", "workspace"))
    sm.add_argument("--host", default="127.0.0.1")
    sm.add_argument("--port", type=int, default=8650)
    sm.add_argument("--threads", type=int, default=None)
    sm.add_argument("--gpu-layers", type=int, default=0)
    sm.add_argument("--n-ctx", type=int, default=None,
                    help="default: the GGUF's context_length")
    sm.add_argument("--registered-model", default=None,
                    help="the MLflow registered model (default: the registry's only one)")
    sm.add_argument("--alias", default=None, help="default: champion, else candidate")
    sm.add_argument("--lora", default=None, metavar="ADAPTER",
                    help="serve this peft LoRA adapter (a directory, or pt / sft: the latest "
                         "run's) on MODEL, unmerged, exported with llama.cpp's converter; an "
                         "adapter with modules_to_save is refused with the reason")
    sm.add_argument("--lora-base", default=None, metavar="HF_DIR",
                    help="the HF model dir the adapter was trained on (its config.json)")
    for name in ("serve", "deploy"):
        s = sub.add_parser(name, help=f"Prefect deployments with schedules ({name})")
        s.add_argument("names", nargs="*", help="deployment names from conf/deploy (default all)")
        s.add_argument("--overrides", nargs="*", default=[],
                       help="Hydra overrides of conf/deploy (schedules, pools, parameters)")
        if name == "deploy":
            s.add_argument("--work-pool", help="send every deployment to this work pool")
            s.add_argument("--image", help="container image for docker/kubernetes pools")
    args = p.parse_args(argv)
    from pipelines.config import ConfigError

    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "config":
            return cmd_config(args)
        if args.cmd == "ui":
            return cmd_ui(args)
        if args.cmd == "verify":
            return cmd_verify(args)
        if args.cmd == "review":
            return cmd_review(args)
        if args.cmd == "serve-model":
            from pipelines import serve as serve_model
            return serve_model.main(args)
        return cmd_deploy(args, serve=args.cmd == "serve")
    except KeyboardInterrupt:  # the stage's MLflow runs are KILLED, its checkpoints kept
        print("\nllamaflow: interrupted; rerun the same command to resume (finished stages are "
              "cache hits, training restarts from its last checkpoint)", file=sys.stderr)
        return 130
    except ConfigError as e:  # every problem at once, with its key and fix; nothing ran
        print(f"llamaflow: {e}", file=sys.stderr)
        for hint in _demo_hints(e.problems):
            print(hint, file=sys.stderr)
        return 2


def _demo_hints(problems) -> list[str]:
    """For a demo recipe's missing source folder, the command that writes it."""
    from pipelines.demo import DEMO_SOURCES

    folders = {str(p.value).rstrip("/").rsplit("/", 1)[-1] for p in problems
               if p.key == "source.path"}
    hints = []
    for recipe, (folder, _) in DEMO_SOURCES.items():
        if folder in folders:
            cmd = "llamaflow demo" + ("" if recipe == "demo" else f" --recipe {recipe}")
            hints.append(f"llamaflow: recipe={recipe} reads the checkpoint `{cmd}` writes into the "
                         f"workspace: run `{cmd}` first, with the same workdir")
    return hints


if __name__ == "__main__":
    sys.exit(main())
