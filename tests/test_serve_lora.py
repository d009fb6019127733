"""Serving a LoRA adapter unmerged (`llamaflow serve-model MODEL --lora ADAPTER`).

- The lifecycle's adapters train embed_tokens/lm_head in full (modules_to_save): refused with the
  reason before anything starts, and llama.cpp's own convert_lora_to_gguf.py refuses them too
  (it exits on the first tensor that is not a LoRA pair).
- A plain LoRA (pairs only), exported by llama.cpp's converter and applied by llama.cpp on the
  f32 base GGUF, gives peft's logits; served, its greedy answer is llama.cpp's in-process one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from steps import lora_gguf as L

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plain_lora(tiny_hf_model, tmp_path_factory):
    """A peft LoRA on q/v/down projections with non-zero B (so it changes the model), saved as
    peft saves it: LoRA pairs only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                              "down_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("plain_lora") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_f32(tiny_hf_model, tmp_path_factory):
    from steps import quantize as Q

    return Q.export_gguf(tiny_hf_model, tmp_path_factory.mktemp("lora_base") / "base-f32.gguf",
                         "f32")


def test_plain_lora_on_llama_cpp_gives_pefts_logits(plain_lora, base_f32, tiny_hf_model,
                                                   tmp_path):
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steps.evaluate import _model_params

    assert L.lora_problem(plain_lora) is None
    lora = L.export_lora(plain_lora, tiny_hf_model, tmp_path / "lora.gguf")
    ids = [1, 45, 67, 89, 120, 200, 17, 3, 250, 99]
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0].numpy()
        ref = PeftModel.from_pretrained(base, plain_lora)(torch.tensor([ids])).logits[0].numpy()
    got = {}
    for name, kw in (("lora", {"lora_path": str(lora)}), ("base", {})):
        with _model_params(False):
            llm = Llama(str(base_f32), n_ctx=64, logits_all=True, n_threads=2, verbose=False, **kw)
        llm.eval(ids)
        got[name] = np.array(llm.scores[:len(ids)])
        llm.close()
    lora_err = float(np.abs(got["lora"] - ref).max())
    base_err = float(np.abs(got["base"] - plain).max())
    effect = float(np.abs(ref - plain).max())
    print(f"max |Δlogit| llama.cpp+LoRA vs peft: {lora_err:.2e}; base vs HF {base_err:.2e}; "
          f"the LoRA moves logits by {effect:.2e}")
    assert effect > 100 * lora_err and lora_err < 1e-3, (lora_err, effect)


def test_served_lora_answers_as_llama_cpp_in_process(plain_lora, base_f32, tiny_hf_model,
                                                     tmp_path):
    from llama_cpp import Llama

    from steps.evaluate import _model_params

    from tests.servers import serve_model

    port = _free_port()
    with serve_model([str(base_f32), "--lora", str(plain_lora), "--lora-base", str(tiny_hf_model),
                      "--workdir", str(tmp_path / "ws"), "--port", str(port), "--threads", "2"],
                     timeout=300) as (text, _):
        assert "LoRA adapter:" in text and str(plain_lora) in text, text
        exported = next((tmp_path / "ws" / "serving" / "lora").glob("*.gguf"))
        prompt = "Once upon a time"
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 12, "temperature": 0, "repeat_penalty": 1.0})
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["text"]
    with _model_params(False):
        llm = Llama(str(base_f32), lora_path=str(exported), n_ctx=512, n_threads=2,
                    verbose=False)
    local = llm.create_completion(prompt, max_tokens=12, temperature=0,
                                  repeat_penalty=1.0)["choices"][0]["text"]
    llm.close()
    assert served == local


def test_lifecycle_adapters_are_refused_with_the_reason(demo_first_run, capsys):
    """The demo's pt and sft adapters carry embed_tokens/lm_head in full: serve-model says why it
    will not serve them unmerged (and what to serve) before any server starts; llama.cpp's own
    LoRA converter refuses the same adapter."""
    from pipelines.cli import main
    from steps.llamacpp_tools import converters

    workdir, _ = demo_first_run
    latest = json.loads((Path(workdir) / "latest.json").read_text(encoding="utf-8"))
    for which in ("pt", "sft"):
        rc = main(["serve-model", "f16", "--workdir", str(workdir), "--lora", which,
                   "--port", str(_free_port())])
        err = capsys.readouterr().err
        assert rc == 2 and "modules_to_save" in err and "embed_tokens" in err, err
        assert "serve-model f16" in err and "modules_to_save=[]" in err
    # without MODEL the default is the registry's merged model, which has the adapters in it
    rc = main(["serve-model", "--workdir", str(workdir), "--lora", "sft", "--port",
               str(_free_port())])
    assert rc == 2 and "--lora needs MODEL" in capsys.readouterr().err
    sft = Path(latest["stages"]["sft"]["artifact"])
    base = Path(latest["stages"]["vocab"]["artifact"])
    r = subprocess.run([sys.executable, str(converters() / "convert_lora_to_gguf.py"), str(sft),
                        "--base", str(base), "--outfile", str(sft.parent / "refused.gguf")],
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})
    assert r.returncode != 0 and "Not a lora_A or lora_B tensor" in r.stderr, r.stderr[-2000:]
    assert "modules_to_save" in r.stderr
    assert not (sft.parent / "refused.gguf").exists()


def test_what_counts_as_a_weight_trained_in_full():
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
             "base_model.model.model.embed_tokens.lora_embedding_A",
             "base_model.model.model.embed_tokens.base_layer.weight",   # skipped by llama.cpp too
             "base_model.model.model.layers.0.input_layernorm.weight"]
    assert L.full_weights(names) == []
    full = ["base_model.model.lm_head.modules_to_save.weight",
            "base_model.model.model.embed_tokens.weight"]
    assert L.full_weights(names + full) == sorted(full)


def test_lora_bad_input(plain_lora, base_f32, tmp_path, capsys, tiny_hf_model):
    from pipelines.cli import main

    def run(*extra):
        rc = main(["serve-model", str(base_f32), "--workdir", str(tmp_path), "--port",
                   str(_free_port()), *extra])
        return rc, capsys.readouterr().err

    rc, err = run("--lora", str(tmp_path / "nope"))
    assert rc == 2 and "not a directory" in err
    rc, err = run("--lora", str(plain_lora))
    assert rc == 2 and "--lora-base" in err
    rc, err = run("--lora", str(plain_lora), "--lora-base", str(tmp_path))
    assert rc == 2 and "no config.json" in err
    # an adapter whose tokenizer is not the GGUF's vocabulary
    import shutil

    other = tmp_path / "other"
    shutil.copytree(plain_lora, other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_hf_model / f).is_file():
            shutil.copy(tiny_hf_model / f, other / f)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 10_000, "content": "[EXTRA]", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False,
                                "special": True})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    rc, err = run("--lora", str(other), "--lora-base", str(tiny_hf_model))
    assert rc == 2 and "trained on another model" in err, err
