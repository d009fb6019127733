"""Report stage: the table over real evaluations of a tiny model (HF; f32 and f16 GGUF exports;
q4_0 from llama.cpp's quantizer), PNG plots that open, and gates that pass and fail as
configured."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from steps import evaluate as ev
from steps import report as rp
from tests.tiny import DEMO_DATA

QTYPES = ("f32", "f16", "q4_0")


@pytest.fixture(scope="module")
def evaluated(tiny_hf_model, tmp_path_factory):
    """evaluate.run on the tiny HF model and its GGUFs (from the quantize stage's exporter)."""
    import llama_cpp  # noqa: F401  (a dev dependency: must be installed)
    from steps.quantize import export_gguf, quantize_gguf

    root = tmp_path_factory.mktemp("evaluated")
    for q in QTYPES:
        (root / f"q-{q}").mkdir()
    for q in ("f32", "f16"):
        export_gguf(tiny_hf_model, root / f"q-{q}" / "model.gguf", q)
    quantize_gguf(root / "q-f16" / "model.gguf", root / "q-q4_0" / "model.gguf", "q4_0")
    cfg = ev.Config(eval_sets={"en": {"path": str(DEMO_DATA / "corpus_en.txt"), "max_tokens": 256},
                               "zh": {"path": str(DEMO_DATA / "corpus_zh.txt"), "max_tokens": 256}},
                    n_ctx=64, prompts=None, n_threads=1)
    evals = {}
    for label, model in ({"merged": tiny_hf_model} | {f"gguf-{q}": root / f"q-{q}" for q in QTYPES}).items():
        out = root / f"eval-{label}"
        out.mkdir()
        ev.run(cfg, out, model=model)
        evals[label] = out
    log = root / "pt" / "trainer_log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "loss": 6.0 - 0.1 * s, "lr": 2e-4}) + "\n"
                           for s in range(1, 11))
                   + json.dumps({"step": 10, "eval_loss": 5.2}) + "\n", encoding="utf-8")
    return {"evaluations": evals, "training": {"pretrain": log.parent},
            "quantized": {q: root / f"q-{q}" for q in QTYPES}}


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 2_000_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_report_over_real_evaluations(evaluated, tmp_path):
    cfg = rp.Config(gates={"q4_0": {"vs": "f16", "max_delta_ppl_pct": 5.0}})
    m = rp.run(cfg, tmp_path, **evaluated)
    rows = json.loads((tmp_path / "table.json").read_text())
    labels = ["merged"] + [f"gguf-{q}" for q in QTYPES]
    assert [(r["model"], r["set"]) for r in rows] == [(m_, s) for m_ in labels for s in ("en", "zh")]
    by = {(r["model"], r["set"]): r for r in rows}
    for s in ("en", "zh"):
        res = json.loads((evaluated["evaluations"]["gguf-q4_0"] / "results.json").read_text())
        q4, f16, f32, hf = (by[k, s] for k in ("gguf-q4_0", "gguf-f16", "gguf-f32", "merged"))
        assert q4["ppl"] == res["sets"][s]["ppl"]
        assert q4["delta_ppl_pct"] == pytest.approx((q4["ppl"] / f16["ppl"] - 1) * 100)
        assert f16["delta_ppl_pct"] == 0.0 and 0 < abs(q4["delta_ppl_pct"]) < 5.0
        assert abs(f32["ppl"] / hf["ppl"] - 1) < 1e-5     # f32 GGUF = the fp32 HF model
        assert abs(f16["ppl"] / hf["ppl"] - 1) < 5e-3
    sizes = {r["model"]: r["file_size"] for r in rows}
    assert sizes["merged"] is None
    assert sizes["gguf-f16"] == (evaluated["quantized"]["f16"] / "model.gguf").stat().st_size
    assert sizes["gguf-q4_0"] < sizes["gguf-f16"] < sizes["gguf-f32"]
    assert by["gguf-q4_0", "en"]["bpw"] < 16 < by["gguf-f16", "en"]["bpw"] < by["gguf-f32", "en"]["bpw"]

    md = (tmp_path / "table.md").read_text()
    assert md.count("\n") == 2 + len(rows) and "| gguf-q4_0 | zh |" in md
    assert _png_size(tmp_path / "ppl_per_stage.png") == (1100, 400)
    assert _png_size(tmp_path / "loss_curves.png") == (700, 400)
    assert _png_size(tmp_path / "quant_size_vs_ppl.png") == (700, 400)
    gates = json.loads((tmp_path / "gates.json").read_text())
    assert gates["passed"] and len(gates["checks"]) == 2 and m["gates_passed"] == 1
    assert m["gguf-q4_0.en.ppl"] == by["gguf-q4_0", "en"]["ppl"]
    report = (tmp_path / "report.md").read_text()
    assert "![loss_curves.png](loss_curves.png)" in report and "| q4_0 vs gguf-f16 | en |" in report


def _fake_eval(d: Path, ppl: dict, bpb: dict, n_scored=100) -> Path:
    """A results.json with chosen numbers, to test the gate arithmetic exactly."""
    d.mkdir()
    sets = {s: {"ppl": p, "ppl_err": 0.1, "bits_per_byte": bpb[s], "char_ppl": 3.0,
                "n_scored": n_scored, "n_text_tokens": 1000, "n_bytes": 4000, "protocol": "llama.cpp",
                "n_ctx": 512, "tokens_per_s": 100.0} for s, p in ppl.items()}
    (d / "results.json").write_text(json.dumps({"backend": "gguf", "sets": sets}))
    return d


@pytest.fixture
def gate_evals(tmp_path):
    return {
        "gguf-f16": _fake_eval(tmp_path / "f16", {"wiki": 10.0, "zh": 20.0}, {"wiki": 1.0, "zh": 2.0}),
        "gguf-q4_0": _fake_eval(tmp_path / "q4", {"wiki": 10.4, "zh": 21.2}, {"wiki": 1.02, "zh": 2.1}),
        "base": _fake_eval(tmp_path / "base", {"wiki": 30.0, "zh": 90.0}, {"wiki": 1.5, "zh": 4.0},
                           n_scored=120)}


def test_gates_pass_and_fail(gate_evals, tmp_path):
    out = tmp_path / "ok"
    out.mkdir()
    rep = rp.build_report(gate_evals, {}, {}, out, gates={"q4_0": {"vs": "f16", "max_delta_ppl_pct": 6.5}})
    assert rep["passed"] and [round(c["delta_pct"], 6) for c in rep["gates"]["checks"]] == [4.0, 6.0]
    rows = {(r["model"], r["set"]): r for r in rep["rows"]}
    # base has another tokenizer (other token count): no per-token Δ, only bits/byte
    assert rows["base", "wiki"]["delta_ppl_pct"] is None
    assert rows["base", "wiki"]["delta_bpb_pct"] == pytest.approx(50.0)

    out = tmp_path / "tag"
    out.mkdir()
    rep = rp.build_report(gate_evals, {}, {}, out, on_fail="tag",
                          gates={"gguf-q4_0": {"vs": "gguf-f16", "max_delta_ppl_pct": 5.0}})
    assert not rep["passed"] and [c["passed"] for c in rep["gates"]["checks"]] == [True, False]

    out = tmp_path / "fail"
    out.mkdir()
    with pytest.raises(rp.GateFailed, match="q4_0/zh/ppl: Δ 6.00% > 5.0%"):
        rp.build_report(gate_evals, {}, {}, out, on_fail="fail",
                        gates={"q4_0": {"vs": "f16", "max_delta_ppl_pct": 5.0,
                                        "max_delta_bpb_pct": 10.0}})
    written = json.loads((out / "gates.json").read_text())   # the report is written before raising
    assert not written["passed"] and (out / "table.md").is_file() and (out / "report.md").is_file()
    assert [c["metric"] for c in written["checks"]] == ["ppl", "bits_per_byte", "ppl", "bits_per_byte"]

    cfg = rp.Config(gates={"q4_0": {"vs": "f16", "max_delta_ppl_pct": 5.0, "sets": ["wiki"]}},
                    on_fail="fail")
    out = tmp_path / "run"
    out.mkdir()
    assert rp.run(cfg, out, evaluations=gate_evals)["gates_passed"] == 1


def test_gate_on_a_model_not_evaluated_is_skipped_not_passed(gate_evals, tmp_path):
    rep = rp.build_report(gate_evals, {}, {}, tmp_path, on_fail="fail",
                          gates={"q8_0": {"vs": "f16", "max_delta_ppl_pct": 1.0}})
    assert rep["gates"]["checks"] == [] and rep["gates"]["skipped"][0]["gate"] == "q8_0"
    assert "Gate `q8_0` skipped" in (tmp_path / "report.md").read_text()
    # nothing was checked: neither passed nor failed
    assert rep["passed"] is None
    assert json.loads((tmp_path / "gates.json").read_text())["passed"] is None
    out = tmp_path / "run"
    out.mkdir()
    m = rp.run(rp.Config(gates={"q8_0": {"vs": "f16", "max_delta_ppl_pct": 1.0}}), out,
               evaluations=gate_evals)
    assert "gates_passed" not in m and m["gates_checked"] == 0 and m["gates_failed"] == 0


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation `x`"):
        rp.build_report({"x": tmp_path}, {}, {}, tmp_path)
    with pytest.raises(FileNotFoundError, match="training run `pt`"):
        rp.run(rp.Config(), tmp_path, evaluations={}, training={"pt": tmp_path})
    with pytest.raises(Exception, match="on_fail"):
        rp.Config(on_fail="explode")
