"""`llamaflow serve-model`: a GGUF the lifecycle made, behind an OpenAI-compatible HTTP server.

The server is llama-cpp-python's `llama_cpp.server` (started as `python -m steps.judge
--extra-buffers 0 ...`, the judge stage's launcher: llama_cpp.server's own main() with llama.cpp's
extra CPU buffer types off, without which Llama() dies with SIGILL on this VM, and with no server
setting read from the environment). Why that server and not llama.cpp's `llama-server`: it is
already installed and built with the llama-cpp-python wheel the evaluate/judge stages use (the
same libllama, so the same greedy tokens as the evaluate stage), while steps/llamacpp_tools.py
builds llama.cpp's own tools with LLAMA_BUILD_SERVER=OFF, so there is no `llama-server` binary.

The chat template: the SFT stage saves its prompt template as the tokenizer's chat template
(steps/sft.py chat_template), so the merged model's GGUF carries it in `tokenizer.chat_template`
and the server (or any llama.cpp client) builds the SFT prompt from a chat message. A GGUF
without one (base models, or a file exported before SFT saved it) is served with the default
Alpaca template passed to the server.

MODEL: default the f16 GGUF of the merged model behind the registered model's `champion` alias
(`candidate` when there is none); or a quant type (q4_k_m: that GGUF of the workspace's latest
run), an artifact key prefix (of a quantize artifact), or a path to a .gguf.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ALIASES = ("champion", "candidate")


class ServeError(Exception):
    """Bad input found before the server starts: what is wrong and the fix."""


@dataclass
class Served:
    path: Path
    digest: str
    qtype: str | None
    n_ctx_train: int | None
    chat_template: str | None          # the GGUF's own, or None
    template_name: str
    source: str                        # how MODEL was resolved
    extra: dict = field(default_factory=dict)
    lora_path: Path | None = None      # a GGUF LoRA adapter applied on top (unmerged)
    lora_source: str | None = None


# ---------------------------------------------------------------------------------------------
# Resolving MODEL
# ---------------------------------------------------------------------------------------------

def _manifests(workdir: Path, stage: str = "quantize") -> list[tuple[Path, dict]]:
    out = []
    for m in sorted((workdir / "artifacts" / stage).glob("*/manifest.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append((m.parent, json.loads(m.read_text(encoding="utf-8"))))
    return out


def _gguf_in(art: Path) -> Path:
    files = sorted(art.glob("*.gguf"))
    if not files:
        raise ServeError(f"{art} holds no .gguf file (a quantize artifact has model-<type>.gguf)")
    return files[0]


def _latest(workdir: Path) -> dict:
    p = workdir / "latest.json"
    if not p.is_file():
        raise ServeError(f"no {p}: run `llamaflow demo --workdir {workdir}` or `llamaflow run` "
                         "first, or pass a path to a .gguf")
    return json.loads(p.read_text(encoding="utf-8"))


def _quant_types(latest: dict) -> dict[str, Path]:
    out = {}
    for label, r in latest.get("stages", {}).items():
        if label.startswith("quantize[") and label.endswith("]"):
            out[label[len("quantize["):-1]] = Path(r["artifact"])
    return out


def _registry_digest(workdir: Path, name: str | None, alias: str | None) -> tuple[str, str, str]:
    """(registered model, alias, merged digest) of `alias` (default champion, else candidate)."""
    name, a, version = _registry_version(workdir, name, alias)
    return name, a, version.tags["llamaflow.digest"]


def _registry_version(workdir: Path, name: str | None, alias: str | None):
    """(registered model, alias, its ModelVersion), looked up once."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import Tracker

    db = workdir / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not db.is_file():
        raise ServeError(f"no MLflow database at {db}: run `llamaflow demo --workdir {workdir}` "
                         "first, or pass a path to a .gguf")
    client = Tracker(workdir, {}).client
    names = [name] if name else [m.name for m in client.search_registered_models()]
    if not names:
        raise ServeError("the MLflow registry has no registered model (tracking.registered_model "
                         "of the recipe); pass a quant type or a path to a .gguf instead")
    if len(names) > 1:
        raise ServeError(f"the registry has several registered models ({', '.join(sorted(names))}): "
                         "pick one with --registered-model NAME")
    tried = [alias] if alias else list(ALIASES)
    for a in tried:
        try:
            v = client.get_model_version_by_alias(names[0], a)
        except MlflowException:
            continue
        return names[0], a, v
    raise ServeError(f"registered model {names[0]!r} has no alias {' or '.join(tried)}: "
                     f"aliases are set by a lifecycle run that merges ({', '.join(ALIASES)}); use "
                     "--alias candidate, a quant type or a path to a .gguf")


def _f16_of(workdir: Path, digest: str, label: str) -> tuple[Path, str]:
    """The f16 GGUF quantized from merged model `digest` (the newest, when a later quantize
    version made another)."""
    hits = [(art, m) for art, m in _manifests(workdir)
            if (m.get("config") or {}).get("qtype") == "f16" and
            ((m.get("inputs") or {}).get("artifacts") or {}).get("model") == digest]
    if not hits:
        raise ServeError(f"registered model {label} (merged digest {digest[:12]}) has no f16 "
                         f"GGUF in {workdir / 'artifacts' / 'quantize'}: run the lifecycle's "
                         "quantize stage on it (llamaflow run ... stages=[quantize])")
    art = max(hits, key=lambda h: (h[0] / "manifest.json").stat().st_mtime)[0]
    return _gguf_in(art), f"registry {label} (merged {digest[:12]}), f16"


def resolve(model: str | None, workdir: Path, *, registered_model: str | None = None,
            alias: str | None = None) -> tuple[Path, str]:
    """(the GGUF, how it was found)."""
    if model and (model.endswith(".gguf") or os.sep in model):
        p = Path(model).expanduser()
        if not p.is_file():
            raise ServeError(f"{p} is not a file: give the path of an existing .gguf")
        return p.resolve(), "path"
    workdir = Path(workdir).expanduser().resolve()
    if model is None or model.startswith("alias:"):
        alias = model.split(":", 1)[1] if model else alias
        name, a, digest = _registry_digest(workdir, registered_model, alias)
        return _f16_of(workdir, digest, f"{name}@{a}")
    types = _quant_types(_latest(workdir))
    if model.lower() in types:
        return _gguf_in(types[model.lower()]), f"latest run, quantize[{model.lower()}]"
    hits = [art for art, m in _manifests(workdir) if m.get("key", "").startswith(model)]
    if len(hits) == 1:
        return _gguf_in(hits[0]), f"artifact quantize/{hits[0].name}"
    if len(hits) > 1:
        raise ServeError(f"artifact key prefix {model!r} matches {len(hits)} quantize artifacts: "
                         "give more of the key")
    raise ServeError(f"{model!r} is neither a quant type the workspace has a GGUF for (the latest "
                     f"run made: {', '.join(sorted(types)) or 'none'}), nor a quantize artifact key "
                     f"prefix, nor a .gguf path: pick one of those, or quantize it first "
                     f"(quantize.types=[...,{model}])")


# ---------------------------------------------------------------------------------------------
# What the GGUF says
# ---------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_info(path: Path) -> dict:
    """context_length, vocabulary size, the chat template (or None), file type and EOS id from
    the GGUF header."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def val(key):
        f = r.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = val("general.architecture") or "llama"
    tokens = r.fields.get("tokenizer.ggml.tokens")
    return {"arch": arch, "n_vocab": len(tokens.data) if tokens is not None else None, "n_ctx_train": val(f"{arch}.context_length"),
            "chat_template": val("tokenizer.chat_template"),
            "eos_id": val("tokenizer.ggml.eos_token_id"),
            "file_type": val("general.file_type"), "name": val("general.name")}


def _qtype_of(path: Path) -> str | None:
    stem = path.stem
    return stem[len("model-"):] if stem.startswith("model-") else None


def describe(path: Path, source: str) -> Served:
    info = gguf_info(path)
    own = info["chat_template"]
    return Served(path=path, digest=sha256_file(path), qtype=_qtype_of(path),
                  n_ctx_train=info["n_ctx_train"], chat_template=own,
                  template_name="gguf tokenizer.chat_template" if own else
                  "chinese-alpaca (SFT ALPACA_ZH_TEMPLATE, passed to the server: the GGUF has none)",
                  source=source, extra=info)


# ---------------------------------------------------------------------------------------------
# Checks and the server
# ---------------------------------------------------------------------------------------------

def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"port {port} on {host} is already in use ({e.strerror}): stop what "
                             f"listens there or pick another with --port") from None


def check_memory(path: Path, available: int | None = None) -> None:
    import psutil

    size = path.stat().st_size
    available = psutil.virtual_memory().available if available is None else available
    if size > available:
        raise ServeError(f"{path.name} is {size / 2**30:.2f} GiB but the machine has "
                         f"{available / 2**30:.2f} GiB available: serve a smaller quant type "
                         "(e.g. q4_k_m) or free memory")


def server_command(served: Served, host: str, port: int, *, threads: int | None = None,
                   gpu_layers: int = 0, n_ctx: int | None = None,
                   template_file: Path | None = None) -> list[str]:
    n_threads = threads or len(os.sched_getaffinity(0))
    ctx = n_ctx or served.n_ctx_train or 512
    args = ["--model", str(served.path), "--model_alias", served.path.name, "--host", host,
            "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(n_threads),
            "--n_threads_batch", str(n_threads), "--n_gpu_layers", str(gpu_layers),
            "--interrupt_requests", "false", "--verbose", "false"]
    if served.lora_path is not None:
        args += ["--lora_path", str(served.lora_path)]
    if served.chat_template is None:
        if template_file is None:
            raise ValueError("a GGUF without a chat template needs template_file")
        from steps.sft import chat_template

        template_file.write_text(json.dumps({"chat_template": chat_template(),
                                             "bos_token": "<s>", "eos_token": "</s>"}))
        args += ["--chat_format", "hf-tokenizer-config",
                 "--hf_tokenizer_config_path", str(template_file)]
    return [sys.executable, "-m", "steps.judge", "--extra-buffers", "0", *args]


def prepare(model: str | None, workdir: Path, host: str, port: int, *,
            registered_model: str | None = None, alias: str | None = None,
            lora: str | None = None, lora_base: str | None = None) -> Served:
    """Every check that can fail before the server starts (ServeError with the fix)."""
    path, source = resolve(model, workdir, registered_model=registered_model, alias=alias)
    check_memory(path)
    check_port(host, port)
    served = describe(path, source)
    if lora is not None:
        served.lora_path, served.lora_source = lora_gguf(lora, lora_base, served, Path(workdir))
    return served


def _adapter_dir(lora: str, workdir: Path) -> Path:
    stage = {"pt": "pretrain", "pretrain": "pretrain", "sft": "sft"}.get(lora)
    if stage is None:
        p = Path(lora).expanduser()
        if not p.is_dir():
            raise ServeError(f"--lora {lora}: not a directory, nor pt / sft (the latest run's "
                             "adapters): give a peft adapter directory")
        return p.resolve()
    latest = _latest(Path(workdir).expanduser().resolve())
    if stage not in latest["stages"]:
        raise ServeError(f"--lora {lora}: the latest run has no {stage} stage")
    return Path(latest["stages"][stage]["artifact"])


def lora_gguf(lora: str, lora_base: str | None, served: Served, workdir: Path) -> tuple[Path, str]:
    """The adapter `lora` as a GGUF LoRA adapter for the served base (exported once, kept in
    <workdir>/serving/lora/), after the checks: it holds LoRA pairs only, its vocabulary is the
    base GGUF's, and the HF base it was trained on is given."""
    from steps import lora_gguf as L
    from steps.checks import tokenizer_size
    from steps.tokenizer import carries_tokenizer

    if served.source.startswith("registry"):
        raise ServeError("--lora needs MODEL: the GGUF of the base the adapter was trained on (a "
                         "path or quant type); the default, the registry's merged model, "
                         "already has the lifecycle's adapters in it")
    adapter = _adapter_dir(lora, workdir)
    problem = L.lora_problem(adapter)
    if problem:
        raise ServeError(problem)
    n_vocab = served.extra.get("n_vocab")
    if carries_tokenizer(adapter) and n_vocab is not None:
        rows = tokenizer_size(adapter)[0]
        if rows != n_vocab:
            raise ServeError(f"{adapter}: the adapter's tokenizer has {rows} tokens but "
                             f"{served.path.name} has {n_vocab}: it was trained on another "
                             "model; serve it on the GGUF of its own base")
    if lora_base is None:
        raise ServeError("--lora needs --lora-base HF_DIR: the HF model dir the adapter was "
                         "trained on (llama.cpp's converter reads its config.json)")
    base = Path(lora_base).expanduser()
    if not (base / "config.json").is_file():
        raise ServeError(f"--lora-base {base}: no config.json there; give the HF model dir the "
                         "adapter was trained on")
    out = Path(workdir).expanduser() / "serving" / "lora" / \
        f"{L.export_key(adapter, base, 'f32')}.gguf"
    if not out.is_file():
        try:
            L.export_lora(adapter, base, out, "f32")
        except (RuntimeError, ValueError) as e:
            raise ServeError(str(e)) from None
    return out, str(adapter)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(requests.RequestException):
            if requests.get(base + "/models", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"llama_cpp.server not ready at {base} within {timeout:.0f} s")
        time.sleep(0.2)


def main(args) -> int:
    """The serve-model subcommand: checks, the banner, then the server in the foreground until
    Ctrl-C (it is stopped by PID, its process group, on the way out)."""
    import tempfile

    from steps.judge import stop_process_group

    try:
        served = prepare(args.model, Path(args.workdir), args.host, args.port,
                         registered_model=args.registered_model, alias=args.alias,
                         lora=args.lora, lora_base=args.lora_base)
    except ServeError as e:
        print(f"llamaflow serve-model: {e}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="llamaflow-serve-"))
    cmd = server_command(served, args.host, args.port, threads=args.threads,
                         gpu_layers=args.gpu_layers, n_ctx=args.n_ctx,
                         template_file=tmp / "chat_template.json")
    ctx = args.n_ctx or served.n_ctx_train or 512
    base = f"http://{args.host}:{args.port}/v1"
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "OPENAI_API_KEY")}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, env=env)

    def _term(signum, frame):   # SIGTERM (a stop by PID) stops the server too, via finally
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        wait_ready(base, proc)
        print(f"llamaflow serve-model: {base}  (OpenAI-compatible; health: GET {base}/models; "
              "Ctrl-C stops it)\n"
              f"  server pid:    {proc.pid}\n"
              f"  model:         {served.path}\n"
              f"  sha256:        {served.digest}\n"
              f"  quant type:    {served.qtype or '?'}\n"
              f"  from:          {served.source}\n"
              f"  n_ctx:         {ctx}" + ("" if args.n_ctx else " (the GGUF's context_length)") +
              f"\n  chat template: {served.template_name}\n" +
              (f"  LoRA adapter:  {served.lora_source} (as {served.lora_path})\n"
               if served.lora_path else "") +
              f"  EOS id:        {served.extra.get('eos_id')} (generation stops there)",
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print("\nllamaflow serve-model: stopped", file=sys.stderr)
        return 0
    except RuntimeError as e:
        print(f"llamaflow serve-model: {e}", file=sys.stderr)
        return 1
    finally:
        stop_process_group(proc)
        with contextlib.suppress(OSError):
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()


# ---------------------------------------------------------------------------------------------
# serve-champion: keep the registered model's alias served (the Prefect deployment's flow)
# ---------------------------------------------------------------------------------------------

SERVING_TAG = "llamaflow.serving_url"


def _serving_dir(workdir: Path) -> Path:
    return Path(workdir) / "serving"


def _read_state(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def _serves(pid: int, gguf: str) -> bool:
    """Whether process `pid` is alive and is a server of `gguf` (a PID the kernel has given to
    another program since is not ours to stop)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return gguf.encode() in cmdline


def _stop_pid(pid: int, timeout: float = 15) -> None:
    """Stop the server's process group by PID: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), \
            socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), 2):
        return True
    return False


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _serving_lock(workdir: Path, alias: str):
    """One reconcile per alias at a time (two scheduled runs must not start two servers)."""
    import fcntl

    d = _serving_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{alias}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _tag(client, name: str, version: str, url: str | None) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        if url is None:
            client.delete_model_version_tag(name, version, SERVING_TAG)
        else:
            client.set_model_version_tag(name, version, SERVING_TAG, url)


def _stop_state(client, state: dict | None) -> None:
    if not state:
        return
    if _serves(state["pid"], state["path"]):
        _stop_pid(state["pid"])
    _tag(client, state["registered_model"], state["version"], None)


def reconcile(workdir: Path, *, alias: str = "champion", host: str = "127.0.0.1",
              port: int = 8650, registered_model: str | None = None, threads: int | None = None,
              gpu_layers: int = 0, n_ctx: int | None = None, stop: bool = False,
              startup_timeout: float = 180) -> dict:
    """Make what is served on host:port the f16 GGUF of the registered model's `alias` version.

    Unchanged (same version, its server alive: the PID still serves that file and its port
    accepts connections): nothing is done. Without the alias (a fresh workspace, or removed) a
    server started for it is stopped and {"action": "none"} returned. Otherwise the new version's
    GGUF is checked first; then the server started before (its PID in <workdir>/serving/<alias>.json) is stopped and its version
    loses the `llamaflow.serving_url` tag, then the alias's GGUF is started detached (it outlives
    the flow run; its output in serving/<alias>.log) and, once it answers, its version gets the
    tag with the URL. stop=True only stops. Returns {"action": unchanged|started|restarted|
    stopped|none, ...}."""
    from pipelines.tracking import Tracker

    workdir = Path(workdir).expanduser().resolve()
    d = _serving_dir(workdir)
    state_file = d / f"{alias}.json"
    with _serving_lock(workdir, alias):
        state = _read_state(state_file)
        client = Tracker(workdir, {}).client
        if stop:
            _stop_state(client, state)
            state_file.unlink(missing_ok=True)
            return {"action": "stopped" if state else "none", "alias": alias}
        try:
            name, a, mv = _registry_version(workdir, registered_model, alias)
        except ServeError as e:   # no such alias (yet, or any more): nothing is to be served
            _stop_state(client, state)
            state_file.unlink(missing_ok=True)
            return {"action": "none", "alias": alias, "reason": str(e)}
        version, digest = str(mv.version), mv.tags["llamaflow.digest"]
        url = f"http://{host}:{port}/v1"
        # alive = our PID still serves that file and its port accepts connections (not an HTTP
        # request: llama_cpp.server answers /v1/models only between generations)
        if state and state["version"] == version and state["url"] == url and \
                _serves(state["pid"], state["path"]) and _port_open(host, port):
            return {"action": "unchanged", **state}
        # everything about the new version is checked before the old server is stopped
        gguf, source = _f16_of(workdir, digest, f"{name}@{a}")
        check_memory(gguf)
        served = describe(gguf, source)
        _stop_state(client, state)
        state_file.unlink(missing_ok=True)
        check_port(host, port)
        cmd = server_command(served, host, port, threads=threads, gpu_layers=gpu_layers,
                             n_ctx=n_ctx, template_file=d / f"{alias}.chat_template.json")
        env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "OPENAI_API_KEY")}
        with open(d / f"{alias}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
        new = {"alias": a, "registered_model": name, "version": version, "digest": digest,
               "path": str(served.path), "sha256": served.digest, "url": url, "pid": proc.pid,
               "started": time.time()}
        # recorded at once: a start that is interrupted (a cancelled flow run) leaves a PID the
        # next run stops, not a server nobody knows of holding the port
        _write_state(state_file, {**new, "starting": True})
        try:
            wait_ready(url, proc, startup_timeout)
        except BaseException as e:
            _stop_pid(proc.pid)
            state_file.unlink(missing_ok=True)
            if isinstance(e, RuntimeError):
                raise RuntimeError(f"{e}; its output is in {d / (alias + '.log')}") from None
            raise
        _write_state(state_file, new)
        _tag(client, name, version, url)
        return {"action": "restarted" if state else "started", **new}

