"""`llamaflow serve-model` on the demo's GGUF: the OpenAI client against llama_cpp.server.

One server for the module, started through the CLI itself (`python -m pipelines.cli serve-model
<type>`) as a subprocess on 127.0.0.1 and stopped by PID (SIGTERM to the CLI, which stops its
server's process group; then SIGKILL to both). Greedy requests pass repeat_penalty=1.0:
llama_cpp.server's default is 1.1, applied before its greedy sampler even at temperature 0, while
the evaluate stage decodes with no penalty.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipelines import serve as S
from steps.sft import format_prompt

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "max_tokens": 24, "extra_body": {"repeat_penalty": 1.0}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(demo_first_run):
    workdir, _ = demo_first_run
    latest = json.loads((Path(workdir) / "latest.json").read_text(encoding="utf-8"))
    evals = sorted(k for k in latest["stages"] if k.startswith("evaluate[gguf-"))
    assert evals, f"the demo evaluated no GGUF: {sorted(latest['stages'])}"
    label = evals[0]
    qtype = label[len("evaluate[gguf-"):-1]
    gens = Path(latest["stages"][label]["artifact"]) / "generations.jsonl"
    records = [json.loads(line) for line in gens.read_text(encoding="utf-8").splitlines()]
    records = [r for r in records if r.get("mode", "greedy") == "greedy"]
    return Path(workdir), latest, qtype, records


@pytest.fixture(scope="module")
def server(demo):
    workdir, _, qtype, _ = demo
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve-model", qtype,
                             "--workdir", str(workdir), "--port", str(port), "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    banner, server_pid = [], None
    try:
        deadline = time.monotonic() + 90
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
        yield {"base": f"http://127.0.0.1:{port}/v1", "banner": text, "proc": proc,
               "qtype": qtype}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if server_pid is not None:   # stopped by the CLI; SIGKILL in case it was not
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"], api_key="none", max_retries=0, timeout=60)


def _question(r: dict) -> str:
    return r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")


@pytest.mark.servers
def test_banner_names_what_it_serves(server, demo):
    _, latest, qtype, _ = demo
    gguf = S._gguf_in(Path(latest["stages"][f"quantize[{qtype}]"]["artifact"]))
    b = server["banner"]
    assert server["base"] in b and str(gguf) in b and S.sha256_file(gguf) in b
    assert f"quant type:    {qtype}" in b and "chinese-alpaca" in b
    r = requests.get(server["base"] + "/models", timeout=5)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == gguf.name


@pytest.mark.servers
def test_greedy_chat_equals_evaluate_tokens(client, demo):
    """(a) Per prompt: the same text and the same number of generated tokens (usage) as the
    evaluate stage's greedy output_ids; and the text re-tokenized by the GGUF's own vocabulary
    gives the ids back where the evaluate ids are the canonical tokenization of their text."""
    records = demo[3]
    assert records
    for r in records:
        resp = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": _question(r)}], **GREEDY)
        choice = resp.choices[0]
        assert choice.message.content == r["output"], r["instruction"]
        assert resp.usage.completion_tokens == len(r["output_ids"]) == r["n_new_tokens"]
        assert choice.finish_reason == ("length" if len(r["output_ids"]) >= 24 else "stop")


@pytest.mark.servers
def test_chat_prompt_is_the_sft_template(client, demo):
    """(b) The formatter the server is given renders a user message into '<s>' + the SFT prompt
    byte for byte, and the completions endpoint on the hand-formatted prompt answers exactly as
    the chat endpoint on the message (same text, same tokens)."""
    from llama_cpp.llama_chat_format import hf_tokenizer_config_to_chat_formatter

    from steps.judge import chinese_alpaca_chat_template

    fmt = hf_tokenizer_config_to_chat_formatter(
        {"chat_template": chinese_alpaca_chat_template(), "bos_token": "<s>", "eos_token": "</s>"},
        add_generation_prompt=True)
    for r in demo[3]:
        built = fmt(messages=[{"role": "user", "content": _question(r)}]).prompt
        assert built.encode() == ("<s>" + format_prompt(r["instruction"], r["input"])).encode()
    r = demo[3][0]
    chat = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": _question(r)}], **GREEDY)
    comp = client.completions.create(model="x", prompt=format_prompt(r["instruction"], r["input"]),
                                     **GREEDY)
    assert comp.choices[0].text == chat.choices[0].message.content
    assert comp.usage.completion_tokens == chat.usage.completion_tokens
    assert comp.usage.prompt_tokens == chat.usage.prompt_tokens


@pytest.mark.servers
def test_generation_stops_at_eos(client, demo):
    """(c) The GGUF's EOS is </s> (id 2). The tiny demo model does not reach EOS by itself within
    its context on these prompts (its greedy answers run to max_tokens), so EOS is made the argmax
    with a logit bias on id 2: the server then ends there (finish_reason stop, no EOS text, no
    token counted), as the evaluate stage does (llama_vocab_is_eog)."""
    info = S.gguf_info(S._gguf_in(Path(demo[1]["stages"][f"quantize[{demo[2]}]"]["artifact"])))
    eos = int(info["eos_id"])
    assert eos == 2
    for kind in ("chat", "completion"):
        kw = {"temperature": 0, "max_tokens": 16,
              "extra_body": {"repeat_penalty": 1.0, "logit_bias": {str(eos): 100.0}}}
        r = demo[3][0]
        if kind == "chat":
            resp = client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": _question(r)}], **kw)
            text = resp.choices[0].message.content
        else:
            resp = client.completions.create(
                model="x", prompt=format_prompt(r["instruction"], r["input"]), **kw)
            text = resp.choices[0].text
        assert resp.choices[0].finish_reason == "stop", kind
        assert resp.usage.completion_tokens == 0 and text == "" and "</s>" not in text, kind


@pytest.mark.servers
def test_streaming_equals_non_streaming(client, demo):
    """(d) chat and completions, streamed and not: the same text."""
    r = demo[3][0]
    msg = [{"role": "user", "content": _question(r)}]
    whole = client.chat.completions.create(model="x", messages=msg, **GREEDY)
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model="x", messages=msg, stream=True, **GREEDY)
             if c.choices]
    assert "".join(parts) == whole.choices[0].message.content
    prompt = format_prompt(r["instruction"], r["input"])
    whole = client.completions.create(model="x", prompt=prompt, **GREEDY)
    parts = [c.choices[0].text for c in
             client.completions.create(model="x", prompt=prompt, stream=True, **GREEDY)]
    assert "".join(parts) == whole.choices[0].text


@pytest.mark.servers
def test_over_context_is_an_http_error(client, server, demo):
    """(e) A prompt longer than n_ctx: an HTTP 400 from the server, which still answers."""
    import openai

    info = S.gguf_info(S._gguf_in(Path(demo[1]["stages"][f"quantize[{demo[2]}]"]["artifact"])))
    n_ctx = int(info["n_ctx_train"])
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="x", prompt="的 " * (n_ctx * 2), max_tokens=4)
    assert 400 <= e.value.status_code < 500
    assert server["proc"].poll() is None
    assert requests.get(server["base"] + "/models", timeout=5).status_code == 200
    ok = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                        **GREEDY)
    assert ok.choices[0].finish_reason in ("stop", "length")


# --- (f) bad input, all before any server starts ------------------------------------------------

def _cli(argv, capsys) -> tuple[int, str]:
    from pipelines.cli import main

    rc = main(["serve-model", *argv])
    return rc, capsys.readouterr().err


def test_default_model_is_the_registered_f16(demo):
    workdir, latest, _, _ = demo
    path, how = S.resolve(None, workdir)
    assert path == S._gguf_in(Path(latest["stages"]["quantize[f16]"]["artifact"]))
    assert how.startswith("registry llamaflow-demo@") and how.endswith("f16")


def test_unknown_alias(demo, capsys):
    rc, err = _cli(["--workdir", str(demo[0]), "--alias", "nosuch", "--port", str(_free_port())],
                   capsys)
    assert rc != 0 and "no alias nosuch" in err and "--alias candidate" in err


def test_quant_type_without_a_gguf(demo, capsys):
    rc, err = _cli(["q2_k", "--workdir", str(demo[0]), "--port", str(_free_port())], capsys)
    assert rc != 0 and "'q2_k'" in err and "quant type" in err and "f16" in err


def test_port_in_use(demo, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, err = _cli([demo[2], "--workdir", str(demo[0]), "--port",
                        str(s.getsockname()[1])], capsys)
    assert rc != 0 and "already in use" in err and "--port" in err


def test_model_larger_than_available_memory(demo, capsys, monkeypatch):
    import psutil

    class VM:
        available = 1024
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM())
    rc, err = _cli([demo[2], "--workdir", str(demo[0]), "--port", str(_free_port())], capsys)
    assert rc != 0 and "GiB available" in err and "smaller quant type" in err


def test_missing_gguf_path(tmp_path, capsys):
    rc, err = _cli([str(tmp_path / "nope.gguf")], capsys)
    assert rc != 0 and "is not a file" in err
