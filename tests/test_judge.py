"""judge stage against real llama.cpp servers (llama-cpp-python's llama_cpp.server on a tiny f16
GGUF): the stage's own local server, one started here as "the endpoint from the environment",
a port that refuses, a socket that never answers; and the reply parser."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from steps import judge as J
from tests.servers import free_port, port_open, stop_group, wait_until

SECRET = "sk-test-Zq7xSECRETvalue9"
QUESTIONS = [("什么是困惑度？", ""), ("What is a checksum?", ""), ("Translate to English:", "你好")]
ANSWERS = {"alpha": ["困惑度是语言模型预测文本时的平均不确定性。",
                     "A checksum is a short digest that detects changed data.",
                     "Hello."],
           "beta": ["不知道。", "no", "Goodbye."]}
# replies of a few tokens: the tiny tokenizer spends ~20 on the score line
FAST = {"max_tokens": 40, "n_ctx": 1024, "n_threads": 2}


@pytest.fixture(autouse=True)
def _no_judge_env(monkeypatch):
    for k in ("LLAMAFLOW_JUDGE_URL", "LLAMAFLOW_JUDGE_KEY", "LLAMAFLOW_JUDGE_MODEL"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def judge_gguf(tiny_hf_model, tmp_path_factory) -> Path:
    """The tiny model as an f16 GGUF artifact dir (what the quantize stage makes)."""
    from steps.quantize import export_gguf

    out = tmp_path_factory.mktemp("judge_gguf")
    export_gguf(tiny_hf_model, out / "model-f16.gguf", "f16")
    return out


def write_generations(root: Path, answers: dict[str, list[str]] = ANSWERS) -> dict[str, Path]:
    """Evaluate-stage artifact dirs, one per model: greedy and sampled records."""
    out = {}
    for label, texts in answers.items():
        d = root / f"eval-{label}"
        d.mkdir(parents=True)
        with open(d / "generations.jsonl", "w", encoding="utf-8") as f:
            for mode in ("greedy", "sampled"):
                for (q, i), a in zip(QUESTIONS, texts):
                    f.write(json.dumps({"instruction": q, "input": i, "prompt": q,
                                        "output": a if mode == "greedy" else a + " (sampled)",
                                        "mode": mode, "n_new_tokens": 3,
                                        "output_ids": [5, 6, 7]}, ensure_ascii=False) + "\n")
        out[label] = d
    return out


def _out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / J.JUDGEMENTS_FILE).read_text().splitlines()]


def _server_pid(caplog) -> int:
    found = re.findall(r"llama_cpp\.server pid (\d+)", caplog.text)
    assert found, caplog.text
    return int(found[-1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); its state says it is dead
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z"


# ---------------------------------------------------------------------------------------------
# (a) the stage's own local llama.cpp server
# ---------------------------------------------------------------------------------------------

def test_local_server_end_to_end(judge_gguf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="steps.judge")
    gens = write_generations(tmp_path)
    out = _out(tmp_path)
    t0 = time.monotonic()
    metrics = J.run(J.Config(**FAST), out, generations=gens, judge_model=judge_gguf)
    seconds = time.monotonic() - t0
    print(f"local judge: {seconds:.1f} s")

    results = json.loads((out / J.RESULTS_FILE).read_text())
    records = _records(out)
    # 3 prompts x 2 orders for the one pair, + 3 prompts x 2 models alone
    assert len(records) == 12
    # every request reached the server: its access log has one POST per record
    posts = (out / J.SERVER_LOG).read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert posts == 12, (out / J.SERVER_LOG).read_text()[-2000:]
    # the grammar made even a random tiny model's reply parse
    assert all(r["error"] is None and r["scores"] for r in records), records
    pair = [r for r in records if r["kind"] == "pair"]
    assert {(r["prompt"], r["order"]) for r in pair} == {(i, o) for i in range(3)
                                                         for o in ("ab", "ba")}
    for r in pair:
        assert r["system1"] == ("alpha" if r["order"] == "ab" else "beta")
        assert r["reply"].startswith(f"System1: {r['scores'][r['system1']]}, System2: ")
        assert sorted(r["scores"]) == ["alpha", "beta"]
    # the judge's identity on every record: model, local, the GGUF's and the prompt's digests
    ident = records[0]["judge"]
    assert ident["model"] == "model-f16.gguf" and ident["local"] is True
    assert ident["gguf_sha256"] == J._file_sha256(judge_gguf / "model-f16.gguf")
    assert ident["pair_prompt_sha256"] == J._sha256(J.PAIR_PROMPT)
    assert ident["grammar"] is True
    assert all(r["judge"] == ident for r in records)

    assert results["status"] == "ok" and results["judge"] == ident
    [row] = results["pairs"]
    assert (row["a"], row["b"], row["n_prompts"], row["n_judged"]) == ("alpha", "beta", 3, 3)
    assert row["wins"] + row["ties"] + row["losses"] == 3 and row["failures"] == []
    assert 1 <= row["mean_a"] <= 10 and 0 <= row["position_consistency"] <= 1
    assert results["single"]["alpha"]["n_scored"] == 3
    assert metrics["judge.requests"] == 12 and metrics["judge.failures"] == 0
    assert metrics["judge.pair.alpha_vs_beta.win_rate"] == row["wins"] / 3
    assert metrics["judge.single.beta.mean"] == results["single"]["beta"]["mean"]
    # the server is gone, and its chat-template scratch file with it
    pid = _server_pid(caplog)
    assert _gone(pid), f"llama_cpp.server pid {pid} still running"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [J.RESULTS_FILE, J.JUDGEMENTS_FILE, J.TIMINGS_FILE, J.SERVER_LOG])
    assert seconds < 60

    # temperature 0 on the same judge: the same bytes (the files the artifact digest counts)
    again = tmp_path / "again"
    again.mkdir()
    J.run(J.Config(**FAST), again, generations=gens, judge_model=judge_gguf)
    for name in (J.RESULTS_FILE, J.JUDGEMENTS_FILE):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_local_server_stopped_when_it_fails_to_start(judge_gguf, tmp_path, caplog):
    """Not ready in time: the stage finishes failed, nothing asked, the server stopped."""
    caplog.set_level(logging.INFO, logger="steps.judge")
    gens = write_generations(tmp_path)
    out = _out(tmp_path)
    metrics = J.run(J.Config(**FAST, startup_timeout_s=0.05), out, generations=gens,
                    judge_model=judge_gguf)
    results = json.loads((out / J.RESULTS_FILE).read_text())
    assert results["status"] == "failed" and "not ready after" in results["reason"]
    records = _records(out)
    assert len(records) == 12 and all(r["error"].startswith("not asked") for r in records)
    assert metrics["judge.failures"] == 12
    assert _gone(_server_pid(caplog))


# ---------------------------------------------------------------------------------------------
# (b) an endpoint from the environment: a real llama_cpp.server that wants a key
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(judge_gguf, tmp_path_factory):
    """`python -m llama_cpp.server` on the tiny GGUF, demanding SECRET; stopped by PID."""
    port = free_port()
    log = tmp_path_factory.mktemp("keyed_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("api_key", "host", "port")}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model",
             str(judge_gguf / "model-f16.gguf"), "--model_alias", "tiny-judge", "--host",
             "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "2",
             "--chat_format", "alpaca", "--api_key", SECRET, "--verbose", "false"],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=env)
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2,
                                        headers={"Authorization": f"Bearer {SECRET}"}).ok,
                   120, "llama_cpp.server", proc, log)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        stop_group(proc)
        assert not port_open(port)


def _all_text(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


def test_env_endpoint_with_key(keyed_server, tmp_path, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    url, server_log = keyed_server
    monkeypatch.setenv("LLAMAFLOW_JUDGE_URL", url + "?token=QUERYSECRET")
    monkeypatch.setenv("LLAMAFLOW_JUDGE_KEY", SECRET)
    monkeypatch.setenv("LLAMAFLOW_JUDGE_MODEL", "tiny-judge")
    gens = write_generations(tmp_path)
    before = server_log.read_text().count("POST /v1/chat/completions")
    out = _out(tmp_path)
    # a llama.cpp server takes the grammar field: asked for explicitly (auto is off remotely)
    metrics = J.run(J.Config(**FAST, grammar="on"), out, generations=gens)
    results = json.loads((out / J.RESULTS_FILE).read_text())
    assert results["status"] == "ok", results
    assert results["judge"]["endpoint"] == url and results["judge"]["model"] == "tiny-judge"
    assert results["judge"]["local"] is False and "gguf_sha256" not in results["judge"]
    assert metrics["judge.requests"] == 12 and metrics["judge.failures"] == 0
    assert server_log.read_text().count("POST /v1/chat/completions") - before == 12
    assert {r["order"] for r in _records(out) if r["kind"] == "pair"} == {"ab", "ba"}
    # the key (and the URL's query) reached the server only: in no file, log or output
    captured = capfd.readouterr()
    for secret in (SECRET, "QUERYSECRET"):
        assert secret not in _all_text(out)
        assert secret not in caplog.text
        assert secret not in captured.out + captured.err
        assert secret not in json.dumps(J.public_config(J.Config()))

    # a wrong key: 401, the endpoint counts as down, the stage finishes failed
    monkeypatch.setenv("LLAMAFLOW_JUDGE_KEY", "sk-wrong-KEY12345")
    out2 = tmp_path / "out2"
    out2.mkdir()
    J.run(J.Config(**FAST, grammar="on"), out2, generations=gens)
    results = json.loads((out2 / J.RESULTS_FILE).read_text())
    assert results["status"] == "failed" and "HTTP 401" in results["reason"]
    assert "sk-wrong-KEY12345" not in _all_text(out2)


def test_public_config_names_the_judge(monkeypatch):
    monkeypatch.setenv("LLAMAFLOW_JUDGE_URL", "https://user:pw@judge.example:8443/v1?sig=abc#x")
    monkeypatch.setenv("LLAMAFLOW_JUDGE_KEY", SECRET)
    monkeypatch.setenv("LLAMAFLOW_JUDGE_MODEL", "gpt-4")
    shown = J.public_config(J.Config())
    assert shown["endpoint"] == {"url": "https://judge.example:8443/v1", "model": "gpt-4",
                                 **J.prompt_digests()}
    assert SECRET not in json.dumps(shown) and "pw" not in json.dumps(shown)
    monkeypatch.setenv("LLAMAFLOW_JUDGE_MODEL", "gpt-4o")   # another judge: another key
    assert J.public_config(J.Config()) != shown
    monkeypatch.setenv("LLAMAFLOW_JUDGE_MODEL", "gpt-4")
    monkeypatch.setenv("LLAMAFLOW_JUDGE_KEY", "another-key")  # the key changes no score
    assert J.public_config(J.Config()) == shown


# ---------------------------------------------------------------------------------------------
# (c) an endpoint that refuses, one that never answers
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def silent_socket():
    """A port that accepts connections and never answers, until the test ends."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    for c in held:
        c.close()
    srv.close()


@pytest.mark.parametrize("kind", ["refused", "timeout"])
def test_unreachable_endpoint_finishes_failed(kind, tmp_path, monkeypatch, request):
    port = free_port() if kind == "refused" else request.getfixturevalue("silent_socket")
    monkeypatch.setenv("LLAMAFLOW_JUDGE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("LLAMAFLOW_JUDGE_KEY", SECRET)
    monkeypatch.setenv("LLAMAFLOW_JUDGE_MODEL", "gpt-4")
    gens = write_generations(tmp_path)
    out = _out(tmp_path)
    t0 = time.monotonic()
    metrics = J.run(J.Config(timeout_s=1, retries=1, backoff_s=0.1), out, generations=gens)
    seconds = time.monotonic() - t0
    assert seconds < 10, seconds   # one request, two tries, then nothing more is asked
    results = json.loads((out / J.RESULTS_FILE).read_text())
    assert results["status"] == "failed"
    assert (("connection failed" in results["reason"]) if kind == "refused"
            else ("timed out after 1 s" in results["reason"])), results["reason"]
    assert f"127.0.0.1:{port}" in results["reason"] and SECRET not in results["reason"]
    records = _records(out)
    assert len(records) == 12 and metrics["judge.failures"] == 12   # counted, never dropped
    assert all(r["error"].startswith("not asked") for r in records[1:])
    assert SECRET not in _all_text(out)


def test_single_off_and_max_prompts(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFLOW_JUDGE_URL", f"http://127.0.0.1:{free_port()}/v1")
    monkeypatch.setenv("LLAMAFLOW_JUDGE_MODEL", "gpt-4")
    gens = write_generations(tmp_path)
    out = _out(tmp_path)
    J.run(J.Config(single=False, max_prompts=2, retries=0), out, generations=gens)
    records = _records(out)
    assert [(r["kind"], r["prompt"], r["order"]) for r in records] == [
        ("pair", 0, "ab"), ("pair", 0, "ba"), ("pair", 1, "ab"), ("pair", 1, "ba")]
    results = json.loads((out / J.RESULTS_FILE).read_text())
    assert results["single"] == {} and results["pairs"][0]["n_prompts"] == 2


def test_not_configured(tmp_path):
    gens = write_generations(tmp_path)
    out = _out(tmp_path)
    metrics = J.run(J.Config(), out, generations=gens)
    results = json.loads((out / J.RESULTS_FILE).read_text())
    assert results["status"] == "not configured"
    assert "LLAMAFLOW_JUDGE_URL and LLAMAFLOW_JUDGE_MODEL" in results["reason"]
    assert metrics["judge.requests"] == 0


# ---------------------------------------------------------------------------------------------
# (d) the reply parser
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, scores", [
    ("System1: 8, System2: 6\nSystem1 is more accurate.", (8, 6)),
    ("System1: 10, System2: 1", (10, 1)),
    ("  **System1: 7**, **System2: 7**. Both are fine.", (7, 7)),
    ("System 1: 9; System 2: 3.", (9, 3)),
    ("system1：5，system2：4", (5, 4)),
    ("System1: 6\nSystem2: 8\nexplanation", (6, 8)),
])
def test_parse_pair_good(reply, scores):
    assert J.parse_pair(reply) == scores


@pytest.mark.parametrize("reply, reason", [
    ("", "does not start with"),
    ("I think System1 is better. System1: 8, System2: 6", "does not start with"),
    ("System1: 8", "does not start with"),
    ("System1: 8, System3: 6", "does not start with"),
    ("System1: 7.5, System2: 6", "'7.5' is not an integer"),
    ("System1: 8/10, System2: 6/10", "'8/10' is not an integer"),
    ("System1: 11, System2: 6", "11 is outside 1-10"),
    ("System1: 8, System2: 0", "0 is outside 1-10"),
    ("System1: eight, System2: six", "'eight' is not an integer"),
])
def test_parse_pair_bad(reply, reason):
    with pytest.raises(J.ReplyError, match=re.escape(reason)):
        J.parse_pair(reply)


def test_parse_single():
    assert J.parse_single("Score: 9\nGood answer.") == 9
    assert J.parse_single("**Score:** 3") == 3
    for bad, why in [("9", "does not start with"), ("Score: 12", "outside 1-10"),
                     ("Score: 4.5", "not an integer")]:
        with pytest.raises(J.ReplyError, match=why):
            J.parse_single(bad)


def test_grammars_are_accepted_by_llama_cpp():
    from llama_cpp import LlamaGrammar

    for g in (J.PAIR_GRAMMAR, J.SINGLE_GRAMMAR):
        LlamaGrammar.from_string(g, verbose=False)


def test_chinese_alpaca_template_is_the_sft_prompt():
    from llama_cpp.llama_chat_format import hf_tokenizer_config_to_chat_formatter

    from steps.sft import ALPACA_ZH_TEMPLATE, chat_template

    fmt = hf_tokenizer_config_to_chat_formatter({"chat_template": chat_template(),
                                                 "bos_token": "<s>", "eos_token": "</s>"})
    text = "什么是困惑度？\n请简短回答。"
    assert fmt(messages=[{"role": "user", "content": text}]).prompt == \
        "<s>" + ALPACA_ZH_TEMPLATE.format(instruction=text)


# ---------------------------------------------------------------------------------------------
# (e) bad config
# ---------------------------------------------------------------------------------------------

def test_bad_config_raises(tmp_path, monkeypatch, judge_gguf):
    gens = write_generations(tmp_path)
    # a model this run did not evaluate: that pair is skipped and said so, the others judged
    out = _out(tmp_path)
    J.run(J.Config(pairs=[["alpha", "gamma"]], single=False), out, generations=gens)
    res = json.loads((out / "judge.json").read_text())
    assert res["pairs"] == [] and res["skipped_pairs"] == [
        {"pair": ["alpha", "gamma"], "reason": "gamma not among the models given (alpha, beta)"}]
    with pytest.raises(ValueError, match=r"judge\.pairs: \[alpha, alpha\]"):
        J.run(J.Config(pairs=[["alpha", "alpha"]]), tmp_path, generations=gens)
    with pytest.raises(ValueError, match=r"judge\.chat_format: 'nonesuch'"):
        J.run(J.Config(chat_format="nonesuch"), tmp_path, generations=gens,
              judge_model=judge_gguf)
    monkeypatch.setenv("LLAMAFLOW_JUDGE_URL", "127.0.0.1:8000/v1")
    monkeypatch.setenv("LLAMAFLOW_JUDGE_MODEL", "gpt-4")
    with pytest.raises(ValueError, match=r"judge\.url_env: \$LLAMAFLOW_JUDGE_URL"):
        J.run(J.Config(), tmp_path, generations=gens)
    with pytest.raises(ValueError, match="exactly one"):
        J.run(J.Config(), tmp_path, generations=gens, judge_model=tmp_path)


def test_pairs_default_every_pair_sorted(tmp_path):
    gens = write_generations(tmp_path, {"gguf-q4_0": ["a", "b", "c"], "merged": ["d", "e", "f"],
                                        "base": ["g", "h", "i"]})
    assert J._pairs(J.Config(), sorted(gens)) == ([("base", "gguf-q4_0"), ("base", "merged"),
                                                   ("gguf-q4_0", "merged")], [])
    prompts, answers = J.load_answers(gens)
    assert prompts == QUESTIONS and answers["merged"] == {0: "d", 1: "e", 2: "f"}  # greedy only


def test_scores_per_task_group_and_the_report_section(tmp_path):
    results = {"status": "ok", "n_requests": 4, "n_failures": 0, "prompt_groups": ["qa", "qa", None],
               "judge": {"model": "j.gguf", "endpoint": "local", "gguf_sha256": "ab" * 32,
                         "pair_prompt_sha256": "cd" * 32},
               "pairs": [{"a": "m", "b": "q", "n_prompts": 2, "n_judged": 2, "wins": 1, "ties": 1,
                          "losses": 0, "mean_a": 6.0, "mean_b": 5.0, "position_consistency": 0.5,
                          "failures": []}],
               "single": {"m": {"mean": 7.0, "n_scored": 2, "n_prompts": 2, "failures": []}}}
    records = [{"kind": "single", "model": "m", "prompt": 0, "scores": {"m": 8}},
               {"kind": "single", "model": "m", "prompt": 1, "scores": {"m": 6}},
               {"kind": "single", "model": "m", "prompt": 2, "scores": {"m": 1}},   # no group
               {"kind": "pair", "pair": ["m", "q"], "prompt": 0, "scores": {"m": 7, "q": 3}},
               {"kind": "pair", "pair": ["m", "q"], "prompt": 0, "scores": {"m": 5, "q": 5}},
               {"kind": "single", "model": "q", "prompt": 1, "scores": None}]   # a failure
    results["groups"] = J.group_means(results, records)
    assert results["groups"] == {"qa": {"single": {"m": 7.0}, "pairs": {"m vs q": {"m": 6.0, "q": 4.0}}}}
    md = "\n".join(J.markdown(results))
    assert "| m vs q | 2/2 | 1 | 1 | 0 | 6.00 | 5.00 | 50 % | 0 |" in md
    assert "| qa | 7.00 | 6.00 : 4.00 |" in md and "sha256 abababababab" in md
    failed = results | {"status": "failed", "reason": "ConnectionError: refused"}
    assert "Judge failed: ConnectionError: refused" in "\n".join(J.markdown(failed))


def test_a_failed_judgement_is_not_reused(tmp_path):
    (tmp_path / "judge.json").write_text(json.dumps({"status": "failed", "reason": "timed out"}))
    assert J.not_reusable(tmp_path) == "the judge failed: timed out"
    (tmp_path / "judge.json").write_text(json.dumps({"status": "ok", "reason": None}))
    assert J.not_reusable(tmp_path) is None
