"""judge stage: a model judge of the evaluate stage's greedy answers, as the Chinese-LLaMA-Alpaca
authors judged their models: GPT-4 shown two systems' answers to one prompt, asked for a score out
of ten for each (pairwise), and, as a second view, each answer scored alone (single).

Pairwise (the recipe's protocol): for each pair of models (`pairs`; null = every pair, in sorted
label order) and each prompt both answered, the judge is asked twice, once with each model as
System1, and each model's two scores are averaged, so the judge's liking for the first (or
second) position cancels. The pair's table: wins / ties / losses of `a` on the averaged scores,
each model's mean score, and position consistency, the fraction of prompts on which both orders
agree on the winner (or on a tie): how much the verdict owes to the order the answers were shown
in.

The judge: any OpenAI-compatible chat endpoint (POST <url>/chat/completions), its URL, key and
model name taken from the environment variables `url_env`, `key_env`, `model_env` name; or, when
the stage is given `judge_model` (a GGUF artifact dir or .gguf file; the flow's
`judge.local_model`), a local llama.cpp server the stage starts on it: llama-cpp-python's
`llama_cpp.server` (its own CLI, in a child process group, stopped by PID when the stage ends,
also on error), asked with a GBNF grammar that makes even a tiny model's reply start with the
score line. Replies are parsed strictly: a reply without both scores, a score that is not an
integer from 1 to 10, an HTTP error, a timeout: each a failure with its reason, counted and kept,
never dropped. An endpoint that refuses connections or times out (after `retries`) ends the
asking: the stage finishes with status "failed" and the reason, the prompts not asked recorded as
such. The key goes only into the Authorization header: error messages, replies and files show
*** in its place.

Outputs: judge.json (status, the judge's identity, the pair tables, the single-answer means),
judgements.jsonl (one record per request, each with the judge's identity), judge_timings.json and
judge_server.log (the local server's output), the last two counted by name only in the digest.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from steps import MetricsCallback, Stage
from steps.download import redact
from steps.sft import chat_template

log = logging.getLogger(__name__)

VERSION = "1"


class FlowKeys(BaseModel):
    """The judge keys the flow reads."""
    enabled: bool = Field(False, description=(
        "judge the evaluated models' greedy answers (pairwise, and each alone) with a chat model; "
        "false: no judge stage"))
    local_model: str | None = Field(None, description=(
        "which of the run's GGUFs serves as the judge, e.g. gguf-q8_0: the stage starts a local "
        "llama.cpp server (llama_cpp.server) on it; null = the OpenAI-compatible endpoint named "
        "by the environment (judge.url_env, judge.key_env, judge.model_env)"))


# judged alongside the evaluations: `stages`, `force` and `--from` say evaluate; the judgements
# as a table for review, without the judge's identity (the same on every row, in judge.json)
STAGE = Stage(part_of="evaluate", flow=FlowKeys, tables={"judgements.jsonl": ("judge",)})
DATA_FIELDS = ()
RESULTS_FILE, JUDGEMENTS_FILE = "judge.json", "judgements.jsonl"
TIMINGS_FILE, SERVER_LOG = "judge_timings.json", "judge_server.log"
# seconds per request and the server's own log (its port, its timings) differ on every run
DIGEST_EXCLUDE = (TIMINGS_FILE, SERVER_LOG)
# how fast and how patiently, not what: threads and waiting change no score
CACHE_EXCLUDE = ("n_threads", "timeout_s", "retries", "backoff_s", "startup_timeout_s")
REPLY_CHARS = 500        # raw reply kept per request
CHINESE_ALPACA = "chinese-alpaca"

# The recipe's judge prompt (Chinese-LLaMA-Alpaca's GPT-4 evaluation), in English, and the score
# line the reply must start with, which the parser reads and the grammar enforces.
PAIR_PROMPT = (
    "The followings are two ChatGPT-like systems' outputs. Please rate an overall score on a ten "
    "point scale for each system and give explanations to justify your scores. Try not to give "
    "the same scores to both systems unless they are equally good.\n\n"
    "Prompt:\n{question}\n\n"
    "System1:\n{answer1}\n\n"
    "System2:\n{answer2}\n\n"
    "Start your reply with \"System1: <score>, System2: <score>\" (each an integer from 1 to 10), "
    "then give your explanations.")
SINGLE_PROMPT = (
    "The following is a ChatGPT-like system's output. Please rate an overall score on a ten point "
    "scale for it, judging correctness, helpfulness and whether the answer is in the language of "
    "the prompt, and give explanations to justify your score.\n\n"
    "Prompt:\n{question}\n\n"
    "System:\n{answer}\n\n"
    "Start your reply with \"Score: <score>\" (an integer from 1 to 10), then give your "
    "explanations.")
# GBNF (llama.cpp's grammar format): the score line, then free text up to max_tokens
PAIR_GRAMMAR = ('root ::= "System1: " score ", System2: " score rest\n'
                'score ::= [1-9] | "10"\n'
                'rest ::= ("\\n" .*)?\n')
SINGLE_GRAMMAR = ('root ::= "Score: " score rest\n'
                  'score ::= [1-9] | "10"\n'
                  'rest ::= ("\\n" .*)?\n')


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_digests() -> dict:
    """sha256 of each judge prompt template: a changed prompt is another judge."""
    return {"pair_prompt_sha256": _sha256(PAIR_PROMPT),
            "single_prompt_sha256": _sha256(SINGLE_PROMPT)}


class Config(BaseModel):
    """judge stage: the evaluated models' greedy answers rated out of ten by a chat model,
    pairwise in both orders (the recipe's GPT-4 protocol) and each alone."""
    model_config = ConfigDict(extra="forbid")
    pairs: list[tuple[str, str]] | None = Field(None, description=(
        "model pairs [a, b] to compare, by the labels of the models given (e.g. [merged, "
        "gguf-q4_0]); null = every pair of the given models, in sorted label order"))
    single: bool = Field(True, description="also score each model's answers alone, 1-10")
    max_prompts: int | None = Field(None, ge=1, description=(
        "judge the first N prompts only (null = all): each costs 2 requests per pair and 1 per "
        "model"))
    url_env: str = Field("LLAMAFLOW_JUDGE_URL", description=(
        "environment variable holding the endpoint's API base (https://host/v1) or its full "
        ".../chat/completions URL; used when no local judge model is given"))
    key_env: str = Field("LLAMAFLOW_JUDGE_KEY", description=(
        "environment variable holding the API key (may be unset for a keyless server); it is sent "
        "only as `Authorization: Bearer` and never written or logged"))
    model_env: str = Field("LLAMAFLOW_JUDGE_MODEL", description=(
        "environment variable holding the endpoint's model name (e.g. gpt-4)"))
    grammar: Literal["auto", "on", "off"] = Field("auto", description=(
        "send a GBNF `grammar` request field constraining the reply to start with the score "
        "line (llama.cpp servers accept it); auto = on for the local server, off for other "
        "endpoints (OpenAI rejects unknown fields)"))
    max_tokens: int = Field(256, ge=16, description="reply tokens at most (score line + "
                                                   "explanation)")
    timeout_s: float = Field(120.0, gt=0, description="seconds per request before it counts "
                                                      "as timed out")
    retries: int = Field(2, ge=0, description=(
        "retries of a request after a connection error, timeout, HTTP 429 or 5xx, with "
        "exponential backoff; when they are spent on a connection error or timeout the endpoint "
        "counts as down and the stage finishes with status failed"))
    backoff_s: float = Field(1.0, ge=0, description="seconds before the first retry, doubled "
                                                    "for each next")
    chat_format: str | None = Field(CHINESE_ALPACA, description=(
        "local server only: the prompt format llama_cpp.server wraps the request in. "
        "chinese-alpaca: steps/sft.py's ALPACA_ZH_TEMPLATE (what the demo's and the recipe's "
        "Alpaca models are trained on; llama-cpp-python's own `alpaca` format differs: no "
        "newline after '### Instruction:' and no '### Response:' line); any llama_cpp.server "
        "--chat_format name (llama-3, chatml, alpaca, …); null = the GGUF's own chat template "
        "(llama-cpp-python falls back to llama-2)"))
    n_ctx: int = Field(2048, ge=256, description="local server: context tokens (prompt + two "
                                                 "answers + reply must fit)")
    n_threads: int | None = Field(None, ge=1, description="local server: threads (null = the "
                                                          "usable cores)")
    gpu_layers: int = Field(0, ge=-1, description=(
        "local server: layers offloaded to a GPU where llama.cpp was built with one (-1: all); "
        "the stage is not scheduled on a GPU pool, so 0 by default"))
    extra_buffers: bool = Field(False, description=(
        "local server: llama.cpp's extra CPU buffer types, as the evaluate stage's extra_buffers "
        "(off: a GGML_NATIVE build on a CPU advertising AMX dies on Q8_0/Q4_0 weights)"))
    startup_timeout_s: float = Field(300.0, gt=0, description=(
        "local server: seconds to wait for it to load the model and answer GET /v1/models"))


def public_config(config: Config) -> dict:
    """The config as the cache key and MLflow show it, with the judge it names: the endpoint
    from url_env (redacted), the model name from model_env and the prompts' digests. The key is
    left out (it changes no score). A local judge is keyed by its GGUF, an input of the stage."""
    data = config.model_dump(mode="json")
    url = os.environ.get(config.url_env, "")
    data["endpoint"] = {"url": redact(url) if url else None,
                        "model": os.environ.get(config.model_env) or None} | prompt_digests()
    return data


# ---------------------------------------------------------------------------------------------
# Reply parsing
# ---------------------------------------------------------------------------------------------

class ReplyError(ValueError):
    """A judge reply without the scores it was asked for."""


_SEP = r"[,，;；\n]"
_PAIR_LINE = re.compile(r"\s*System\s?1\s*[:：]\s*([^\s,，;；]+?)\s*" + _SEP +
                        r"\s*System\s?2\s*[:：]\s*([^\s,，;；]+)", re.IGNORECASE)
_SINGLE_LINE = re.compile(r"\s*Score\s*[:：]\s*([^\s,，;；]+)", re.IGNORECASE)


def _score(token: str, what: str) -> int:
    token = token.rstrip(".。")
    if not re.fullmatch(r"\d+", token):
        raise ReplyError(f"{what} score {token!r} is not an integer from 1 to 10")
    value = int(token)
    if not 1 <= value <= 10:
        raise ReplyError(f"{what} score {value} is outside 1-10")
    return value


def _plain(reply: str) -> str:
    # markdown emphasis and a heading mark around the score line change nothing
    return reply.replace("*", "").lstrip().lstrip("#").lstrip()


def parse_pair(reply: str) -> tuple[int, int]:
    """(System1's score, System2's score) from a reply that starts with
    `System1: <score>, System2: <score>`; ReplyError with the reason otherwise."""
    m = _PAIR_LINE.match(_plain(reply or ""))
    if not m:
        raise ReplyError("reply does not start with 'System1: <score>, System2: <score>'")
    return _score(m.group(1), "System1"), _score(m.group(2), "System2")


def parse_single(reply: str) -> int:
    """The score from a reply that starts with `Score: <score>`; ReplyError otherwise."""
    m = _SINGLE_LINE.match(_plain(reply or ""))
    if not m:
        raise ReplyError("reply does not start with 'Score: <score>'")
    return _score(m.group(1), "the")


# ---------------------------------------------------------------------------------------------
# The endpoint
# ---------------------------------------------------------------------------------------------

class EndpointDown(RuntimeError):
    """The endpoint refused, timed out or turned the credentials away: asking on is pointless."""


@dataclass
class Endpoint:
    """Where requests go. `key` is only ever put into the Authorization header."""
    url: str                     # the full .../chat/completions URL
    key: str
    model: str
    grammar: bool
    identity: dict               # what every record carries: model, endpoint (redacted), digests
    secrets: list[str] = field(default_factory=list)

    def scrub(self, text: str) -> str:
        """`text` with the key (and the URL's query and userinfo) replaced by ***."""
        for s in sorted({s for s in [self.key, *self.secrets] if s and len(s) >= 3},
                        key=len, reverse=True):
            text = text.replace(s, "***")
        return text


def chat_url(url: str) -> str:
    """The chat completions URL of an API base (https://host/v1) or of that URL itself; a query
    (Azure's ?api-version=...) stays at the end."""
    import urllib.parse

    p = urllib.parse.urlsplit(url)
    path = p.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urllib.parse.urlunsplit(p._replace(path=path))


class _ScrubRecords(logging.Filter):
    """Replaces an endpoint's secrets in the records of a library's logger (urllib3 logs each
    request's URL, query included, at DEBUG)."""

    def __init__(self, endpoint: Endpoint):
        super().__init__()
        self.endpoint = endpoint

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = self.endpoint.scrub(text)
        if clean != text:
            record.msg, record.args = clean, ()
        return True


def _check_url(url: str, env: str) -> None:
    import urllib.parse

    try:
        p = urllib.parse.urlsplit(url)
        ok = p.scheme in ("http", "https") and bool(p.hostname)
        p.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"judge.url_env: ${env} = {redact(url)!r} is not an http(s) URL; set it "
                         "to the endpoint's API base, e.g. https://api.openai.com/v1 or "
                         "http://127.0.0.1:8000/v1")


def _url_secrets(url: str) -> list[str]:
    """The parts of a URL that may carry a credential: its query, fragment and userinfo."""
    import urllib.parse

    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]
    return [s for s in (p.query, p.fragment, p.password, p.username,
                        p.netloc.rpartition("@")[0]) if s]


def ask(endpoint: Endpoint, prompt: str, grammar: str, config: Config, session) -> dict:
    """One chat request, retried on transient errors: {"reply", "error", "attempts", "seconds"}.
    Raises EndpointDown when the endpoint refused or timed out on every try, or answered 401/403/
    404 (every other request would fail alike). Every message is scrubbed of the key."""
    import requests

    body = {"model": endpoint.model, "temperature": 0, "max_tokens": config.max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    if endpoint.grammar:
        body["grammar"] = grammar
    headers = {"Content-Type": "application/json"}
    if endpoint.key:
        headers["Authorization"] = f"Bearer {endpoint.key}"
    t0 = time.monotonic()
    error, down = None, False
    for attempt in range(config.retries + 1):
        if attempt:
            time.sleep(config.backoff_s * 2 ** (attempt - 1))
        try:
            r = session.post(endpoint.url, json=body, headers=headers, timeout=config.timeout_s)
        except requests.Timeout as e:
            error, down = f"timed out after {config.timeout_s:g} s ({type(e).__name__})", True
            continue
        except requests.ConnectionError as e:
            error, down = f"connection failed: {type(e).__name__}: {e}", True
            continue
        except requests.RequestException as e:
            error, down = f"request failed: {type(e).__name__}: {e}", False
            break
        down = False
        if r.status_code == 429 or r.status_code >= 500:
            error = f"HTTP {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code in (401, 403, 404):
            error, down = f"HTTP {r.status_code}: {r.text[:200]}", True
            break
        if r.status_code != 200:
            error = f"HTTP {r.status_code}: {r.text[:200]}"
            break
        try:
            choice = r.json()["choices"][0]
            reply = choice["message"]["content"]
            if not isinstance(reply, str):
                raise TypeError(f"content is {type(reply).__name__}")
        except Exception as e:  # noqa: BLE001  a malformed answer fails this request only
            error = f"malformed response: {type(e).__name__}: {e}: {r.text[:200]}"
            break
        return {"reply": endpoint.scrub(reply), "error": None, "attempts": attempt + 1,
                "seconds": time.monotonic() - t0, "cut": choice.get("finish_reason") == "length"}
    error = endpoint.scrub(error or "no answer")
    if down:
        raise EndpointDown(error)
    return {"reply": "", "error": error, "attempts": attempt + 1,
            "seconds": time.monotonic() - t0, "cut": False}


# ---------------------------------------------------------------------------------------------
# The local llama.cpp server
# ---------------------------------------------------------------------------------------------

def gguf_file(model: Path) -> Path:
    """The .gguf file `model` names: the file, or a directory holding exactly one."""
    model = Path(model)
    if model.is_file() and model.suffix == ".gguf":
        return model
    found = sorted(model.glob("*.gguf")) if model.is_dir() else []
    if len(found) != 1:
        raise ValueError(f"judge_model {model} must be a .gguf file or a directory holding "
                         f"exactly one (found {[f.name for f in found] or 'none'}); pass the "
                         "judge's GGUF artifact (judge.local_model=gguf-<type>)")
    return found[0]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_chat_format(config: Config) -> None:
    if config.chat_format in (None, CHINESE_ALPACA):
        return
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerRegistry

    known = sorted(LlamaChatCompletionHandlerRegistry()._chat_handlers)
    if config.chat_format not in known:
        raise ValueError(f"judge.chat_format: {config.chat_format!r} is not a llama_cpp.server "
                         f"chat format; set it to {CHINESE_ALPACA}, null (the GGUF's own "
                         f"template) or one of {', '.join(known)}")


@contextlib.contextmanager
def local_server(gguf: Path, config: Config, log_path: Path, scratch: Path):
    """llama_cpp.server on `gguf` at 127.0.0.1:<free port>, in its own process group, its output
    in `log_path`: yields (base URL, Popen) once GET /v1/models answers; stopped by PID (SIGTERM
    to its group, then SIGKILL) when the block ends, also on error. RuntimeError (with the log's
    tail) when it exits or is not ready within startup_timeout_s."""
    import requests

    port = _free_port()
    n_threads = config.n_threads or len(os.sched_getaffinity(0))
    args = ["--model", str(gguf), "--model_alias", gguf.name, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(config.n_ctx), "--n_threads", str(n_threads),
            "--n_threads_batch", str(n_threads), "--n_gpu_layers", str(config.gpu_layers),
            "--interrupt_requests", "false", "--verbose", "false"]
    template_file = None
    if config.chat_format == CHINESE_ALPACA:
        template_file = scratch / ".judge_chat_template.json"
        template_file.write_text(json.dumps({"chat_template": chat_template(),
                                             "bos_token": "<s>", "eos_token": "</s>"}))
        args += ["--chat_format", "hf-tokenizer-config",
                 "--hf_tokenizer_config_path", str(template_file)]
    elif config.chat_format is not None:
        args += ["--chat_format", config.chat_format]
    # `python -m steps.judge`: llama_cpp.server's own main() with the extra-buffers default set
    cmd = [sys.executable, "-m", "steps.judge", "--extra-buffers",
           "1" if config.extra_buffers else "0", *args]
    # the server reads settings from the environment too (API_KEY, HOST, PORT, MODEL, …): the
    # child gets none of those (the launcher drops them) and not the judge key either
    env = {k: v for k, v in os.environ.items() if k != config.key_env}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    log.info("judge: llama_cpp.server pid %d on %s, port %d", proc.pid, gguf.name, port)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + config.startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode} before it "
                                   f"was ready: {_tail(log_path)}")
            try:
                if requests.get(base + "/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server not ready after "
                                   f"{config.startup_timeout_s:g} s: {_tail(log_path)}")
            time.sleep(0.25)
        yield base, proc
    finally:
        stop_process_group(proc)
        if template_file is not None:
            template_file.unlink(missing_ok=True)


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the group `proc` leads (its id is proc.pid), a wait, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def _question(g: dict) -> str:
    return g["instruction"] + (f"\n{g['input']}" if g.get("input") else "")


def load_answers(generations: dict[str, Path]) -> tuple[list[tuple[str, str]], dict]:
    """(prompts, answers): the prompts as (instruction, input) in order of first appearance over
    the sorted labels, and label -> {prompt index: greedy answer}."""
    prompts: dict[tuple[str, str], int] = {}
    answers: dict[str, dict[int, str]] = {}
    for label in sorted(generations):
        path = Path(generations[label])
        path = path / "generations.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"judge: model {label!r}: {path} does not exist (the "
                                    "evaluate stage's generations.jsonl)")
        answers[label] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            g = json.loads(line)
            if g.get("mode") != "greedy":
                continue
            key = (g["instruction"], g.get("input") or "")
            i = prompts.setdefault(key, len(prompts))
            answers[label].setdefault(i, g["output"])
    return list(prompts), answers


def prompt_groups(generations: dict[str, Path], prompts: list[tuple[str, str]]) -> list:
    """The task group of each prompt (the evaluate prompt set's "group"; None where it has
    none), as the first greedy record of that prompt gives it."""
    groups: dict[tuple[str, str], str | None] = {}
    for label in sorted(generations):
        path = Path(generations[label])
        path = path / "generations.jsonl" if path.is_dir() else path
        for line in path.read_text(encoding="utf-8").splitlines():
            g = json.loads(line) if line.strip() else {}
            if g.get("mode") == "greedy":
                groups.setdefault((g["instruction"], g.get("input") or ""), g.get("group"))
    return [groups.get(p) for p in prompts]


def group_means(results: dict, records: list[dict]) -> dict:
    """Mean scores per task group: {group: {"single": {model: mean}, "pairs": {"a vs b": {a:
    mean, b: mean}}}} (a pair's scores over both orders). {} when no prompt has a group."""
    groups = results.get("prompt_groups") or []
    if not any(groups):
        return {}
    sums: dict[str, dict] = {}
    for r in records:
        if r["scores"] is None or r["prompt"] >= len(groups) or groups[r["prompt"]] is None:
            continue
        g = sums.setdefault(groups[r["prompt"]], {"single": {}, "pairs": {}})
        into = g["single"] if r["kind"] == "single" else g["pairs"].setdefault(
            f"{r['pair'][0]} vs {r['pair'][1]}", {})
        for model, score in r["scores"].items():
            into.setdefault(model, []).append(score)

    def mean(d):
        return {k: (sum(v) / len(v) if isinstance(v, list) else mean(v)) for k, v in d.items()}
    return {g: mean(by) for g, by in sorted(sums.items())}


def _pairs(config: Config, labels: list[str]) -> tuple[list[tuple[str, str]], list[dict]]:
    """(the pairs to judge, the skipped ones with the reason). A pair naming a model this run
    did not evaluate (its quant type was not made) is skipped and listed, never judged as if;
    the flow start refuses a name that is no model of the lifecycle at all."""
    if config.pairs is None:
        return list(itertools.combinations(sorted(labels), 2)), []
    pairs, skipped = [], []
    for a, b in config.pairs:
        if a == b:
            raise ValueError(f"judge.pairs: [{a}, {b}] compares a model with itself; name two "
                             "different models")
        missing = [x for x in (a, b) if x not in labels]
        if missing:
            skipped.append({"pair": [a, b], "reason": (
                f"{', '.join(missing)} not among the models given "
                f"({', '.join(sorted(labels)) or 'none'})")})
        else:
            pairs.append((a, b))
    return pairs, skipped


# ---------------------------------------------------------------------------------------------
# Stage protocol
# ---------------------------------------------------------------------------------------------

def _winner(s: dict, a: str, b: str) -> str:
    return a if s[a] > s[b] else b if s[b] > s[a] else "tie"


def run(config: Config, out_dir: Path, *, on_metrics: MetricsCallback | None = None,
        generations: dict[str, Path], judge_model: Path | None = None) -> dict:
    """Judge the greedy answers in each `generations` artifact (label -> evaluate artifact dir
    or generations.jsonl) pairwise and singly, with the local llama.cpp server on `judge_model`
    when given, else the endpoint from the environment → out_dir/judge.json, judgements.jsonl.
    A bad config raises ValueError; an unreachable judge finishes with status "failed"."""
    out_dir = Path(out_dir)
    t_start = time.monotonic()
    prompts, answers = load_answers(generations)
    labels = sorted(answers)
    pairs, skipped_pairs = _pairs(config, labels)
    if config.max_prompts is not None:
        prompts = prompts[:config.max_prompts]
    if judge_model is not None:
        gguf = gguf_file(Path(judge_model))
        _check_chat_format(config)
    timings: dict = {"server_start_s": None, "requests": []}
    results: dict = {"status": "ok", "reason": None, "judge": None,
                     "models": {m: {"n_prompts": sum(i < len(prompts) for i in answers[m])}
                                for m in labels},
                     "n_prompts": len(prompts), "pairs": [], "skipped_pairs": skipped_pairs,
                     "single": {},
                     "prompt_groups": prompt_groups(generations, prompts)}

    # the requests: each pair in both orders, then each model alone
    todo = []
    for a, b in pairs:
        for i in range(len(prompts)):
            if i in answers[a] and i in answers[b]:
                todo += [("pair", (a, b), "ab", i), ("pair", (a, b), "ba", i)]
    if config.single:
        todo += [("single", m, None, i) for m in labels for i in range(len(prompts))
                 if i in answers[m]]

    # the judge: who it is (on every record) and where it answers; a bad URL is a config error
    url = model = key = ""
    secrets: list[str] = []
    if judge_model is not None:
        grammar = config.grammar != "off"
        identity = {"model": gguf.name, "endpoint": "local llama_cpp.server", "local": True,
                    "gguf_sha256": _file_sha256(gguf), "chat_format": config.chat_format}
    else:
        grammar = config.grammar == "on"
        url, model, key = (os.environ.get(v, "") for v in
                           (config.url_env, config.model_env, config.key_env))
        if url:
            _check_url(url, config.url_env)
            secrets = _url_secrets(url)
        identity = {"model": model or None, "endpoint": redact(url) if url else None,
                    "local": False}
    identity |= prompt_digests() | {"grammar": grammar}
    results["judge"] = identity
    scrubber = Endpoint(url, key, model, grammar, identity, secrets=secrets)

    records: list[dict] = []   # one per request of `todo`, in its order
    try:
        with contextlib.ExitStack() as stack:
            endpoint = None
            if judge_model is not None and todo:
                t0 = time.monotonic()
                try:
                    base, _ = stack.enter_context(
                        local_server(gguf, config, out_dir / SERVER_LOG, out_dir))
                    endpoint = Endpoint(chat_url(base), "", gguf.name, grammar, identity)
                except RuntimeError as e:
                    results |= {"status": "failed", "reason": str(e)}
                timings["server_start_s"] = time.monotonic() - t0
            elif judge_model is None and url and model:
                endpoint = Endpoint(chat_url(url), key, model, grammar, identity,
                                    secrets=secrets)
            elif judge_model is None:
                missing = [v for v, x in ((config.url_env, url), (config.model_env, model))
                           if not x]
                results |= {"status": "not configured", "reason": (
                    f"set {' and '.join(missing)} (and {config.key_env} where the endpoint "
                    "needs a key), or judge.local_model=gguf-<type> for a local judge")}
            if endpoint is not None:
                _ask_all(endpoint, todo, prompts, answers, config, results, timings,
                         on_metrics, records)
    except Exception as e:  # noqa: BLE001  whatever went wrong judging, the stage says so
        results |= {"status": "failed", "reason": scrubber.scrub(f"{type(e).__name__}: {e}")}
    if results["status"] == "failed":   # what was not asked is counted, with the reason
        records += [_record(identity, kind, who, order, i, prompts,
                            error=f"not asked: {results['reason'][:300]}")
                    for kind, who, order, i in todo[len(records):]]
    if results["status"] == "ok" and records and all(r["error"] for r in records):
        results |= {"status": "failed",
                    "reason": f"no reply gave scores; the first: {records[0]['error']}"}
    if not todo and results["status"] == "ok":
        results |= {"status": "nothing to judge", "reason": (
            "no prompt answered (greedy) by the models given" if labels else "no models given")}

    metrics = _summarize(results, records, pairs, labels, config)
    timings["total_s"] = time.monotonic() - t_start
    with open(out_dir / JUDGEMENTS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    (out_dir / TIMINGS_FILE).write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    log.info("judge: %s, %d requests, %d failed%s", results["status"], len(records),
             metrics["judge.failures"], f" ({results['reason']})" if results["reason"] else "")
    return metrics


def _record(identity: dict, kind: str, who, order, i: int, prompts, *, reply: str = "",
            scores: dict | None = None, error: str | None = None) -> dict:
    r = {"kind": kind}
    if kind == "pair":
        a, b = who
        first, second = (a, b) if order == "ab" else (b, a)
        r |= {"pair": [a, b], "order": order, "system1": first, "system2": second}
    else:
        r["model"] = who
    return r | {"prompt": i, "instruction": prompts[i][0], "scores": scores,
                "reply": reply[:REPLY_CHARS], "error": error, "judge": identity}


def _ask_all(endpoint: Endpoint, todo, prompts, answers, config: Config, results: dict,
             timings: dict, on_metrics, records: list[dict]) -> None:
    """Each request of `todo` asked, its record appended to `records`; once the endpoint is
    down the rest are recorded as not asked."""
    import requests

    scrub = _ScrubRecords(endpoint)
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    urllib3_log.addFilter(scrub)
    try:
        with requests.Session() as session:
            _ask_each(endpoint, todo, prompts, answers, config, results, timings, on_metrics,
                      session, records)
    finally:
        urllib3_log.removeFilter(scrub)


def _ask_each(endpoint: Endpoint, todo, prompts, answers, config: Config, results: dict,
              timings: dict, on_metrics, session, records: list[dict]) -> None:
    down = None
    for step, (kind, who, order, i) in enumerate(todo):
        if down is not None:
            records.append(_record(endpoint.identity, kind, who, order, i, prompts,
                                   error=f"not asked: the endpoint failed earlier ({down})"))
            continue
        question = _question({"instruction": prompts[i][0], "input": prompts[i][1]})
        if kind == "pair":
            a, b = who
            first, second = (a, b) if order == "ab" else (b, a)
            text = PAIR_PROMPT.format(question=question, answer1=answers[first][i],
                                      answer2=answers[second][i])
            grammar = PAIR_GRAMMAR
        else:
            text = SINGLE_PROMPT.format(question=question, answer=answers[who][i])
            grammar = SINGLE_GRAMMAR
        try:
            got = ask(endpoint, text, grammar, config, session)
        except EndpointDown as e:
            down = str(e)
            results |= {"status": "failed", "reason": f"judge endpoint "
                        f"{endpoint.identity['endpoint']}: {down}"}
            records.append(_record(endpoint.identity, kind, who, order, i, prompts,
                                   error=down))
            continue
        timings["requests"].append({"seconds": round(got["seconds"], 4),
                                    "attempts": got["attempts"]})
        scores, error = None, got["error"]
        if error is None:
            try:
                if kind == "pair":
                    s1, s2 = parse_pair(got["reply"])
                    scores = {first: s1, second: s2}
                else:
                    scores = {who: parse_single(got["reply"])}
            except ReplyError as e:
                error = str(e) + (f" (the reply was cut at max_tokens={config.max_tokens})"
                                  if got["cut"] else "")
        records.append(_record(endpoint.identity, kind, who, order, i, prompts,
                               reply=got["reply"], scores=scores, error=error))
        if on_metrics:
            on_metrics({"judge.requests_done": step + 1}, step)


def _summarize(results: dict, records: list[dict], pairs, labels, config: Config) -> dict:
    """The pair tables and single means into `results`; the flat metrics returned."""
    metrics: dict = {"judge.requests": len(records),
                     "judge.failures": sum(r["error"] is not None for r in records),
                     "judge.status": results["status"]}
    for a, b in pairs:
        mine = [r for r in records if r["kind"] == "pair" and r["pair"] == [a, b]]
        by_prompt: dict[int, dict] = {}
        for r in mine:
            by_prompt.setdefault(r["prompt"], {})[r["order"]] = r
        wins = ties = losses = consistent = 0
        sum_a = sum_b = 0.0
        judged = 0
        for i, orders in sorted(by_prompt.items()):
            if any(orders.get(o) is None or orders[o]["scores"] is None for o in ("ab", "ba")):
                continue
            ab, ba = orders["ab"]["scores"], orders["ba"]["scores"]
            mean = {m: (ab[m] + ba[m]) / 2 for m in (a, b)}
            judged += 1
            sum_a, sum_b = sum_a + mean[a], sum_b + mean[b]
            w = _winner(mean, a, b)
            wins, ties, losses = wins + (w == a), ties + (w == "tie"), losses + (w == b)
            consistent += _winner(ab, a, b) == _winner(ba, a, b)
        row = {"a": a, "b": b, "n_prompts": len(by_prompt), "n_judged": judged,
               "wins": wins, "ties": ties, "losses": losses,
               "win_rate": wins / judged if judged else None,
               "tie_rate": ties / judged if judged else None,
               "loss_rate": losses / judged if judged else None,
               "mean_a": sum_a / judged if judged else None,
               "mean_b": sum_b / judged if judged else None,
               "position_consistency": consistent / judged if judged else None,
               "failures": [{"prompt": r["prompt"], "order": r["order"], "error": r["error"]}
                            for r in mine if r["error"] is not None]}
        results["pairs"].append(row)
        name = f"judge.pair.{a}_vs_{b}"
        metrics[f"{name}.n"] = judged
        for k in ("win_rate", "tie_rate", "loss_rate", "mean_a", "mean_b",
                  "position_consistency"):
            if row[k] is not None:
                metrics[f"{name}.{k}"] = row[k]
    if config.single:
        for m in labels:
            mine = [r for r in records if r["kind"] == "single" and r["model"] == m]
            scored = [r["scores"][m] for r in mine if r["scores"] is not None]
            results["single"][m] = {
                "n_prompts": len(mine), "n_scored": len(scored),
                "mean": sum(scored) / len(scored) if scored else None,
                "failures": [{"prompt": r["prompt"], "error": r["error"]}
                             for r in mine if r["error"] is not None]}
            metrics[f"judge.single.{m}.n"] = len(scored)
            if scored:
                metrics[f"judge.single.{m}.mean"] = results["single"][m]["mean"]
    results["n_requests"], results["n_failures"] = metrics["judge.requests"], \
        metrics["judge.failures"]
    results["groups"] = group_means(results, records)
    return metrics


# ---------------------------------------------------------------------------------------------
# `python -m steps.judge --extra-buffers 0|1 <llama_cpp.server args>`: the local judge server
# ---------------------------------------------------------------------------------------------

def _serve(argv: list[str]) -> None:
    """llama_cpp.server's own main() on `argv`, with llama.cpp's extra CPU buffer types set as
    asked (Llama() has no argument for them) and none of its settings read from the
    environment (pydantic-settings would take API_KEY, HOST, PORT, MODEL, … from there)."""
    if argv[:1] != ["--extra-buffers"] or len(argv) < 2:
        raise SystemExit("usage: python -m steps.judge --extra-buffers 0|1 "
                         "<llama_cpp.server arguments>")
    use_extra, argv = argv[1] == "1", argv[2:]
    import llama_cpp
    import llama_cpp.llama as L
    from llama_cpp.server.settings import ConfigFileSettings, Settings

    names = {n.lower() for n in [*Settings.model_fields, *ConfigFileSettings.model_fields]}
    for k in [k for k in os.environ if k.lower() in names | {"host", "port", "config_file"}]:
        del os.environ[k]
    orig = L.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = use_extra
        return p

    L.llama_cpp.llama_model_default_params = llama_cpp.llama_model_default_params = params
    from llama_cpp.server.__main__ import main

    sys.argv = ["llama_cpp.server", *argv]
    main()


if __name__ == "__main__":
    _serve(sys.argv[1:])


def not_reusable(path: Path) -> str | None:
    """A judgement made while the judge was unreachable is not a result to keep: the next run
    asks again (the pipeline recomputes it instead of taking it from the cache)."""
    f = Path(path) / "judge.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text(encoding="utf-8"))
    return f"the judge failed: {res.get('reason')}" if res.get("status") == "failed" else None


def markdown(results: dict | None) -> list[str]:
    """The report's "Judge" section: who judged, the pairwise table (wins / ties / losses of the
    first model, mean scores, position consistency), the single-answer means, the means per task
    group; a failed or unconfigured judge says so with the reason."""
    if not results:
        return []
    who = results.get("judge") or {}
    md = ["## Judge", ""]
    ident = (f"judge {who.get('model')} ({who.get('endpoint')}"
             + (f", sha256 {who['gguf_sha256'][:12]}" if who.get("gguf_sha256") else "")
             + f"), pair prompt sha256 {str(who.get('pair_prompt_sha256'))[:12]}")
    if results["status"] != "ok":
        return md + [f"Judge {results['status']}: {results.get('reason')} ({ident}).", ""]
    md += [f"{ident}; {results.get('n_requests', 0)} requests, {results.get('n_failures', 0)} "
           "failed (each counted below, none dropped).", ""]
    if results.get("pairs"):
        md += ["| a vs b | prompts judged | a wins | ties | b wins | mean a | mean b | "
               "same winner both orders | failures |", "|---|---|---|---|---|---|---|---|---|"]
        for p in results["pairs"]:
            md.append(f"| {p['a']} vs {p['b']} | {p['n_judged']}/{p['n_prompts']} | {p['wins']} | "
                      f"{p['ties']} | {p['losses']} | {_num(p['mean_a'])} | {_num(p['mean_b'])} | "
                      f"{_num(p['position_consistency'], pct=True)} | {len(p['failures'])} |")
        md.append("")
    md += [f"Pair {' vs '.join(p['pair'])} skipped: {p['reason']}." for p in
           results.get("skipped_pairs") or []] + ([""] if results.get("skipped_pairs") else [])
    if results.get("single"):
        md += ["| model | mean score alone | scored | failures |", "|---|---|---|---|"]
        md += [f"| {m} | {_num(s['mean'])} | {s['n_scored']}/{s['n_prompts']} | "
               f"{len(s['failures'])} |" for m, s in results["single"].items()]
        md.append("")
    groups = results.get("groups") or {}
    if groups:
        singles = list(dict.fromkeys(m for by in groups.values() for m in by["single"]))
        pairs = list(dict.fromkeys(p for by in groups.values() for p in by["pairs"]))
        md += ["Mean scores per task group (alone; pairwise as a : b):", "",
               "| group | " + " | ".join(singles + pairs) + " |",
               "|---|" + "---|" * (len(singles) + len(pairs))]
        for g, by in groups.items():
            cells = [_num(by["single"].get(m)) for m in singles]
            cells += [" : ".join(_num(by["pairs"].get(p, {}).get(m)) for m in p.split(" vs "))
                      for p in pairs]
            md.append(f"| {g} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def _num(v, pct: bool = False) -> str:
    return "-" if v is None else f"{v * 100:.0f} %" if pct else f"{v:.2f}"


def single_scores(path: Path) -> dict[str, dict[str, float]]:
    """model -> {instruction: single-answer score} from a judge artifact's judgements.jsonl
    (what human scores are correlated with)."""
    f = Path(path) / "judgements.jsonl"
    out: dict[str, dict[int, float]] = {}
    for line in f.read_text(encoding="utf-8").splitlines() if f.is_file() else []:
        r = json.loads(line)
        if r["kind"] == "single" and r["scores"] is not None:
            out.setdefault(r["model"], {})[r["instruction"]] = float(r["scores"][r["model"]])
    return out
