"""`llamaflow serve-model` on the demo's GGUF: the OpenAI client against llama_cpp.server.

One server for the module, started through the CLI itself (`python -m pipelines.cli serve-model
<type>`) as a subprocess on 127.0.0.1 and stopped by PID (SIGTERM to the CLI, which stops its
server's process group; then SIGKILL to both). Greedy requests pass repeat_penalty=1.0:
llama_cpp.server's default is 1.1, applied before its greedy sampler even at temperature 0, while
the evaluate stage decodes with no penalty.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
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
    from tests.servers import serve_model

    workdir, _, qtype, _ = demo
    port = _free_port()
    with serve_model([qtype, "--workdir", str(workdir), "--port", str(port),
                      "--threads", "2"]) as (text, proc):
        yield {"base": f"http://127.0.0.1:{port}/v1", "banner": text, "proc": proc,
               "qtype": qtype}


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
    assert f"quant type:    {qtype}" in b and "gguf tokenizer.chat_template" in b
    r = requests.get(server["base"] + "/models", timeout=5)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == gguf.name


@pytest.mark.servers
def test_the_demos_chat_hint_works(server, demo):
    """The last line of the demo's summary says how to chat: that serve-model command is the
    one this module's server runs, and the request it shows gets an answer."""
    from pipelines.console import summary

    workdir, latest, qtype, _ = demo
    hint = summary({**latest, "workdir": str(workdir)}).splitlines()[-1]
    assert hint.startswith(f"chat:      `llamaflow serve-model {qtype} --workdir {workdir}`"), hint
    body = json.loads(hint.split(" -d '", 1)[1].rstrip("')"))
    r = requests.post(server["base"] + "/chat/completions",
                      json={**body, "max_tokens": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


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
    """(b) The GGUF carries the SFT stage's template (saved with the SFT adapter's tokenizer,
    through merge and the GGUF export); rendered as llama_cpp.server renders it, a user message
    becomes '<s>' + the SFT prompt byte for byte, and the completions endpoint on the
    hand-formatted prompt answers exactly as the chat endpoint on the message (same text, same
    tokens)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from steps.sft import chat_template

    info = S.gguf_info(S._gguf_in(Path(demo[1]["stages"][f"quantize[{demo[2]}]"]["artifact"])))
    assert info["chat_template"] == chat_template()
    fmt = Jinja2ChatFormatter(template=info["chat_template"], bos_token="<s>", eos_token="</s>")
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


# --- (g) the serve-champion deployment's flow ---------------------------------------------------

@pytest.fixture
def champion_ws(demo, tmp_path):
    """The demo's workspace with a registry of its own (mlflow.db copied; artifacts linked):
    moving the champion alias here leaves the shared demo workspace as it was."""
    import shutil

    workdir = demo[0]
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copyfile(workdir / "mlflow.db", ws / "mlflow.db")
    (ws / "artifacts").symlink_to(workdir / "artifacts")
    from pipelines.tracking import Tracker

    client = Tracker(ws, {}).client
    name = client.search_registered_models()[0].name
    yield ws, client, name
    S.reconcile(ws, stop=True)


def _version_tag(client, name, version):
    return client.get_model_version(name, version).tags.get(S.SERVING_TAG)


@pytest.mark.servers
def test_serve_champion_follows_the_alias(champion_ws, monkeypatch, prefect_harness):
    """Started once, unchanged while the alias stays, restarted on a new version when a run moves
    the alias (the old server stopped by PID, its tag removed, the new version tagged with the
    URL), restarted when the server died, stopped on request; through the deployment's flow."""
    from pipelines.serve_champion import serve_champion

    ws, client, name = champion_ws
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    first = client.get_model_version_by_alias(name, "champion")
    monkeypatch.setenv("LLAMAFLOW_WORKDIR", str(ws))
    r1 = serve_champion(port=port, threads=2)
    assert r1["action"] == "started" and r1["url"] == url and r1["version"] == str(first.version)
    assert requests.get(url + "/models", timeout=5).status_code == 200
    assert _version_tag(client, name, first.version) == url
    state = json.loads((ws / "serving" / "champion.json").read_text())
    assert state["pid"] == r1["pid"] and state["sha256"] == S.sha256_file(Path(state["path"]))

    again = S.reconcile(ws, port=port, threads=2)
    assert again["action"] == "unchanged" and again["pid"] == r1["pid"]

    # a later run registers a new version and moves the alias to it
    moved = client.create_model_version(name, first.source, run_id=first.run_id,
                                        tags={"llamaflow.digest": first.tags["llamaflow.digest"]})
    client.set_registered_model_alias(name, "champion", moved.version)
    r2 = S.reconcile(ws, port=port, threads=2)
    assert r2["action"] == "restarted" and r2["version"] == str(moved.version) != str(first.version)
    assert r2["pid"] != r1["pid"] and not S._serves(r1["pid"], r1["path"])
    assert _version_tag(client, name, first.version) is None
    assert _version_tag(client, name, moved.version) == url
    assert requests.get(url + "/models", timeout=5).status_code == 200

    # the server died: the next run starts it again
    os.killpg(r2["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while S._serves(r2["pid"], r2["path"]) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(r2["pid"], os.WNOHANG)
        time.sleep(0.1)
    r3 = S.reconcile(ws, port=port, threads=2)
    assert r3["action"] == "restarted" and r3["pid"] != r2["pid"]

    r4 = serve_champion(port=port, stop=True)
    assert r4["action"] == "stopped" and not S._serves(r3["pid"], r3["path"])
    assert _version_tag(client, name, moved.version) is None
    assert not (ws / "serving" / "champion.json").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/models", timeout=5)


def test_the_serve_champion_deployment_runs_the_serving_flow():
    from pipelines import deploy as D

    cfg = D.load_deploy_config()
    (dep,) = D.deployments(cfg, ["serve-champion"])
    assert dep.entrypoint == "pipelines.serve_champion.serve_champion"
    assert dep.parameters["alias"] == "champion" and dep.parameters["port"] == 8650
    assert "overrides" not in dep.parameters
    with pytest.raises(ValueError, match="unknown argument.*'prot'"):
        D.load_deploy_config(["+deployments.serve-champion.parameters.prot=1"])
    with pytest.raises(ValueError, match="flows are"):
        D.load_deploy_config(["deployments.serve-champion.flow=nosuch"])
