"""Every recipe in conf/recipe/ that can run offline, end to end, as the README says to run it;
golden numbers of the stories260K lifecycle.

A new recipe must be listed in OFFLINE or NEEDS_CHECKPOINT, so none is left untested silently.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import CONF_DIR

pytestmark = pytest.mark.slow

OFFLINE = {"demo", "stories260k",
           "demo-llama3"}   # run end to end (Meta and HF-format starts) in tests/test_demo_llama3.py
# Real LLaMA checkpoints (tens of GB from Meta or the Hub): composed and validated in
# tests/test_config.py, never run here.
NEEDS_CHECKPOINT = {"chinese-llama-alpaca", "chinese-alpaca-plus", "chinese-llama2-alpaca2",
                    "chinese-llama-alpaca-3"}

# stories260K lifecycle (CPU, fp32 training), TinyStories sample, llama.cpp protocol, n_ctx 256.
# A change that moves one of these must change it here in the same commit, saying why.
# Pinned to 4 decimals (abs 1e-4 around the measured value). The GGUF values are those of
# llama.cpp built for x86-64-v3 (AVX2/FMA/F16C, the Makefile's LLAMA_CPP_CMAKE_ARGS), which runs
# the same kernels on every x86 CPU: a native build follows the host (AVX-512 Intel gave f16
# 8.257661 / q8_0 8.304662, AVX-512 AMD 8.257203 / 8.294120), so these values were re-measured
# when the build was fixed, with the merged HF value, computed by torch, unchanged.
STORIES_PPL = {"merged": 8.25768, "gguf-f16": 8.257156, "gguf-q8_0": 8.302896,
               "gguf-q4_0": 9.754529, "gguf-q4_k_m": 8.549340}


def test_every_recipe_is_classified():
    recipes = {p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")}
    assert recipes == OFFLINE | NEEDS_CHECKPOINT, recipes ^ (OFFLINE | NEEDS_CHECKPOINT)


def _table(workdir: Path, result: dict) -> list[dict]:
    report = workdir / result["stages"]["report"]["artifact"]
    return json.loads((report / "table.json").read_text())


def test_demo_recipe_end_to_end(demo_first_run):
    workdir, result = demo_first_run
    assert "report" in result["stages"]
    rows = _table(workdir, result)
    assert {r["set"] for r in rows} == {"en", "zh"}


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory, prefect_harness):
    from pipelines.cli import main

    workdir = tmp_path_factory.mktemp("stories260k")
    assert main(["run", "recipe=stories260k", f"workdir={workdir}"]) == 0
    latest = json.loads((workdir / "latest.json").read_text())
    return workdir, latest


def test_stories260k_recipe_end_to_end(stories_run):
    workdir, result = stories_run
    assert set(result["stages"]) >= {"download", "convert", "vocab", "pretrain", "sft", "merge",
                                     "report"} | {f"quantize[{q}]" for q in
                                                  ("f16", "q8_0", "q4_0", "q4_k_m")}
    rows = _table(workdir, result)
    assert {r["set"] for r in rows} == {"tinystories", "zh"}
    ppl = {r["model"]: r for r in rows if r["set"] == "tinystories"}
    # HF and GGUF rows of the merged model were scored on the same ids
    assert {ppl[m]["n_text_tokens"] for m in STORIES_PPL} == {ppl["merged"]["n_text_tokens"]}
    for model, golden in STORIES_PPL.items():
        assert ppl[model]["ppl"] == pytest.approx(golden, abs=1e-4), model
