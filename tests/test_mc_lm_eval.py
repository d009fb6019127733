"""steps/mc.py (style lm-eval, scoring continuation) picks what lm-evaluation-harness itself picks,
on every question of the demo C-Eval / CMMLU sets, 0 and 5 shots: lm-eval's own ceval-valid /
cmmlu task YAMLs pointed at the local files (bench/mc_lm_eval.py), on a trained model
(stories260K) and the random tiny one. Also: the recipe's letter scoring picks the same on the
f16 GGUF as on the HF model."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mc_lm_eval", REPO / "bench" / "mc_lm_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stories260k_hf(shared_data, tmp_path_factory) -> Path:
    from steps.convert import convert_meta_to_hf
    from steps.llama2c import import_llama2c

    d = shared_data / "models" / "stories260K"
    tmp = tmp_path_factory.mktemp("stories260K_mc")
    meta = import_llama2c(d / "stories260K.bin", d / "tok512.model", tmp / "meta")
    return convert_meta_to_hf(meta, tmp / "hf", dtype="float32")


def _check(name: str, res: dict, bench) -> None:
    print(f"\n{name}:\n{bench.table(res)}")
    assert res["prompt_mismatches"] == 0, f"{name}: contexts differ from lm-eval's"
    assert res["agreement"] == 1.0, f"{name}: picks differ from lm-eval's"
    assert res["max_abs_dll"] < 1e-3, f"{name}: max |Δloglik| {res['max_abs_dll']:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "stories260K"])
def test_picks_match_lm_eval(which, request):
    bench = _bench()
    model = request.getfixturevalue("tiny_hf_model" if which == "tiny" else "stories260k_hf")
    t0 = time.perf_counter()
    res = bench.compare_model(model, shots=(0, 5))
    print(f"{which}: {res['n']} questions compared in {time.perf_counter() - t0:.1f} s, "
          f"max |Δloglik| {res['max_abs_dll']:.2e}")
    _check(which, res, bench)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "stories260K"])
def test_gguf_letter_picks_match_hf(which, request, tmp_path):
    """style recipe, scoring letter: the f16 GGUF picks what the fp32 HF model picks."""
    from steps import mc
    from steps import quantize as Q
    from steps.evaluate import load

    tiny_hf_model = request.getfixturevalue("tiny_hf_model" if which == "tiny" else "stories260k_hf")
    gguf = Q.export_gguf(tiny_hf_model, tmp_path / "f16.gguf", "f16")
    models = {"hf": load(tiny_hf_model, device="cpu"), "gguf": load(gguf, n_ctx=2048, n_threads=2)}
    for layout in ("ceval", "cmmlu"):
        s = mc.McSet(path=str(REPO / "pipelines" / "demo_data" / "mc" / layout), layout=layout)
        subjects = mc.read_set(s)
        recs = {k: mc.evaluate_set(m, layout, s, subjects, [0, 5], style="recipe",
                                   scoring="letter", progress=False)[1]
                for k, m in models.items()}
        d = max(abs(a - b) for x, y in zip(recs["hf"], recs["gguf"])
                for a, b in zip(x["scores"], y["scores"]))
        same = sum(x["pick"] == y["pick"] for x, y in zip(recs["hf"], recs["gguf"]))
        print(f"{which} {layout}: GGUF f16 vs HF picks {same}/{len(recs['hf'])}, max |Δscore| {d:.2e}")
        assert same == len(recs["hf"]), layout
