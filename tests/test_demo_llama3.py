"""recipe=demo-llama3 end to end on a CPU: a synthetic Llama-3.1-shaped Meta checkpoint (2 shards,
GQA, scaled rope) with the real Llama 3 tokenizer from `llama-models`, through download → convert
→ vocab (mode none) → pretrain → sft → merge → quantize → evaluate → report; then the same
lifecycle started from the HF folder that convert wrote (source=local_hf).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

llama_models = pytest.importorskip("llama_models",
                                   reason="the real Llama 3 tokenizer comes from llama-models")

DEMO_DATA = Path(__file__).resolve().parents[1] / "pipelines" / "demo_data"
STAGES = {"download", "convert", "vocab", "pretrain", "sft", "merge", "quantize[f16]",
          "quantize[q8_0]", "speed[f16]", "speed[q8_0]", "judge", "report"} | {f"evaluate[{m}]" for m in (
              "base", "base-zh", "base-zh+pt", "merged", "gguf-f16", "gguf-q8_0")}
# The merged model's perplexity on the demo texts (fp32 CPU training, random start, so near the
# 128K vocabulary's size). A change that moves one of these must change it here, saying why.
MERGED_PPL = {"en": 25562.3016, "zh": 41945.2494}


def _run(workdir: Path, *overrides: str) -> dict:
    from pipelines.cli import main

    assert main(["run", "recipe=demo-llama3", f"workdir={workdir}", *overrides]) == 0
    return json.loads((workdir / "latest.json").read_text())


def _manifest(workdir: Path, result: dict, stage: str) -> dict:
    return json.loads((workdir / result["stages"][stage]["artifact"] / "manifest.json").read_text())


def _rows(workdir: Path, result: dict) -> dict[tuple[str, str], dict]:
    report = workdir / result["stages"]["report"]["artifact"]
    return {(r["model"], r["set"]): r for r in json.loads((report / "table.json").read_text())}


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory, prefect_harness):
    from pipelines.demo import ensure_demo_source

    workdir = tmp_path_factory.mktemp("demo_llama3")
    ensure_demo_source(workdir, recipe="demo-llama3")
    return workdir, _run(workdir)


def test_every_stage_ran_on_the_llama3_vocabulary(llama3_run):
    workdir, result = llama3_run
    assert set(result["stages"]) == STAGES
    convert = json.loads((workdir / result["stages"]["convert"]["artifact"] / "config.json")
                         .read_text())
    assert convert["vocab_size"] == 128256 and convert["num_key_value_heads"] == 2
    assert convert["rope_scaling"]["rope_type"] == "llama3"
    assert not (workdir / result["stages"]["convert"]["artifact"] / "tokenizer.model").exists()


def test_vocab_none_reports_metas_tokens_per_character(llama3_run):
    """tokens_per_char_zh_base counts what Meta's own tiktoken tokenizer gives the eval text."""
    from llama_models.llama3.tokenizer import Tokenizer

    workdir, result = llama3_run
    metrics = _manifest(workdir, result, "vocab")["metrics"]
    meta = Tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    for lang in ("zh", "en"):
        lines = [l for l in (DEMO_DATA / f"eval_{lang}.txt").read_text(encoding="utf-8")
                 .splitlines() if l.strip()]
        tokens = sum(len(meta.encode(l, bos=False, eos=False)) for l in lines)
        assert metrics[f"tokens_per_char_{lang}_base"] == tokens / sum(map(len, lines)), lang
    assert metrics["tokens_per_char_zh_base"] == pytest.approx(167 / 188)
    assert metrics["pieces_added"] == 0 and metrics["embedding_rows"] == 128256


def test_hf_and_gguf_f16_agree_on_the_same_ids(llama3_run):
    workdir, result = llama3_run
    rows = _rows(workdir, result)
    for s in ("en", "zh"):
        hf, gguf = rows[("merged", s)], rows[("gguf-f16", s)]
        assert hf["n_text_tokens"] == gguf["n_text_tokens"]
        # the HF side reads bytes off byte-level pieces as llama.cpp's token_to_piece does
        assert hf["n_bytes"] == gguf["n_bytes"]
        assert gguf["ppl"] == pytest.approx(hf["ppl"], rel=1e-3)
        assert gguf["bits_per_byte"] == pytest.approx(hf["bits_per_byte"], rel=1e-3)
        assert rows[("merged", s)]["ppl"] < rows[("base", s)]["ppl"] / 3   # it learnt
    for s, golden in MERGED_PPL.items():
        assert rows[("merged", s)]["ppl"] == pytest.approx(golden, rel=1e-4), s


def test_the_same_lifecycle_from_the_hf_folder(llama3_run, tmp_path):
    """source=local_hf on convert's output: the import writes the same convert artifact, so
    every later stage is the Meta start's (cache hits on the same keys)."""
    workdir, meta_run = llama3_run
    hf_dir = workdir / meta_run["stages"]["convert"]["artifact"]
    result = _run(workdir, "source=local_hf", f"source.path={hf_dir}")
    assert set(result["stages"]) == STAGES
    assert result["stages"]["download"]["artifact"] != meta_run["stages"]["download"]["artifact"]
    assert _manifest(workdir, result, "convert")["digest"] == \
        _manifest(workdir, meta_run, "convert")["digest"]
    assert _rows(workdir, result) == _rows(workdir, meta_run)
