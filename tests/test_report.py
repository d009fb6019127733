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
    # the HF model and its GGUFs: one vocabulary, one token stream per text
    assert {(r["n_vocab"], r["vs_ref"]) for r in rows} == {(320, rp.SAME)}
    assert len({r["text_sha256"] for r in rows if r["set"] == "en"}) == 1
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
    assert _png_size(tmp_path / "quant_size_vs_ppl.png") == (800, 450)
    gates = json.loads((tmp_path / "gates.json").read_text())
    assert gates["passed"] and len(gates["checks"]) == 2 and m["gates_passed"] == 1
    assert m["gguf-q4_0.en.ppl"] == by["gguf-q4_0", "en"]["ppl"]
    report = (tmp_path / "report.md").read_text()
    assert "![loss_curves.png](loss_curves.png)" in report and "| q4_0 vs gguf-f16 | en |" in report


def _fake_eval(d: Path, ppl: dict, bpb: dict, n_scored=100, n_text_tokens=1000, n_vocab=None,
               text_sha256=None) -> Path:
    """A results.json with chosen numbers, to test the gate arithmetic exactly."""
    d.mkdir()
    sets = {s: {"ppl": p, "ppl_err": 0.1, "bits_per_byte": bpb[s], "char_ppl": 3.0,
                "n_scored": n_scored, "n_text_tokens": n_text_tokens, "n_bytes": 4000,
                "protocol": "llama.cpp", "n_ctx": 512, "tokens_per_s": 100.0,
                **({"text_sha256": text_sha256} if text_sha256 else {})} for s, p in ppl.items()}
    (d / "results.json").write_text(json.dumps({"backend": "gguf", "sets": sets,
                                                **({"n_vocab": n_vocab} if n_vocab else {})}))
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
    # a speed (an evaluation written before timings.json, here 100 tokens/s) is no part of the
    # report: the same evaluations give the same table.json bytes however fast they ran
    assert "tokens_per_s" not in (out / "table.json").read_text()

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


def test_same_vocabulary_other_token_count_is_marked_not_compared(tmp_path):
    # stories260K's HF tokenizer once gave 1878 ids on the TinyStories sample where llama.cpp gave
    # 1883: the same scored-token count (whole chunks) hid it, and the ΔPPL measured two token
    # streams. Same n_vocab + same text must mean the same token count, or no Δ.
    ppl, bpb, sha = {"stories": 10.0}, {"stories": 1.0}, "a" * 64
    evals = {
        "gguf-f16": _fake_eval(tmp_path / "f16", ppl, bpb, n_text_tokens=1883, n_vocab=512,
                               text_sha256=sha),
        "merged": _fake_eval(tmp_path / "hf", {"stories": 9.0}, {"stories": 0.9},
                             n_text_tokens=1878, n_vocab=512, text_sha256=sha),
        "gguf-q8_0": _fake_eval(tmp_path / "q8", {"stories": 10.1}, {"stories": 1.01},
                                n_text_tokens=1883, n_vocab=512, text_sha256=sha),
        "base": _fake_eval(tmp_path / "base", {"stories": 30.0}, {"stories": 1.5},
                           n_text_tokens=990, n_vocab=32000, text_sha256=sha),
        "other": _fake_eval(tmp_path / "other", ppl, bpb, n_text_tokens=1883, n_vocab=512,
                            text_sha256="0" * 64)}
    out = tmp_path / "out"
    out.mkdir()
    rep = rp.build_report(evals, {}, {}, out, gates={"merged": {"vs": "f16", "max_delta_ppl_pct": 50,
                                                              "max_delta_bpb_pct": 50}})
    rows = {r["model"]: r for r in rep["rows"]}
    hf = rows["merged"]
    assert hf["vs_ref"] == rp.TOKENS_DIFFER and "1878 vs 1883 text tokens" in hf["vs_ref_reason"]
    assert hf["delta_ppl_pct"] is None and hf["delta_bpb_pct"] is None
    assert rows["gguf-q8_0"]["vs_ref"] == rp.SAME
    assert rows["gguf-q8_0"]["delta_ppl_pct"] == pytest.approx(1.0)
    assert rows["base"]["vs_ref"] == rp.OTHER_VOCAB          # another vocabulary may differ
    assert rows["base"]["delta_ppl_pct"] is None and rows["base"]["delta_bpb_pct"] == pytest.approx(50)
    assert rows["other"]["vs_ref"] == rp.OTHER_TEXT and rows["other"]["delta_bpb_pct"] is None
    assert rep["token_mismatches"] == 1
    # the gate does not measure two token streams: it fails, naming why
    assert rep["passed"] is False
    assert [(c["passed"], "text tokens" in c["reason"]) for c in rep["gates"]["checks"]] == [(False, True)]
    assert "| merged | stories |" in (out / "table.md").read_text()
    assert "⚠ TOKENS DIFFER" in (out / "table.md").read_text()
    report = (out / "report.md").read_text()
    assert "## Token counts differ" in report and "- merged / stories: 1878 vs 1883" in report
    run_out = tmp_path / "run"
    run_out.mkdir()
    with pytest.raises(rp.GateFailed, match="merged/stories: 1878 vs 1883 text tokens"):
        rp.run(rp.Config(gates={"merged": {"vs": "f16", "max_delta_ppl_pct": 50}}, on_fail="fail"),
               run_out, evaluations=evals)
    m = rp.run(rp.Config(), tmp_path, evaluations=evals)
    assert m["token_mismatches"] == 1 and "merged.stories.delta_ppl_pct" not in m


def test_report_shows_tokens_per_character_of_the_vocab_stage(evaluated, tiny_hf_model, tmp_path):
    """The vocab stage's own vocab_report.json (mode none and a merge) becomes the report's
    Vocabulary section and its tokens-per-character metrics."""
    from steps import vocab

    runs = {"none": vocab.Config(mode="none", eval_zh=DEMO_DATA / "eval_zh.txt"),
            "all": vocab.Config(corpus=[DEMO_DATA / "corpus_zh.txt"], vocab_size=450,
                                num_threads=1, eval_zh=DEMO_DATA / "eval_zh.txt")}
    for mode, config in runs.items():
        zh = tmp_path / f"vocab-{mode}"
        zh.mkdir()
        vm = vocab.run(config, zh, model=tiny_hf_model)
        out = tmp_path / f"report-{mode}"
        out.mkdir()
        metrics = rp.run(rp.Config(reference=None), out, evaluations=evaluated["evaluations"],
                         vocab=zh)
        assert metrics["vocab.tokens_per_char_zh_base"] == vm["tokens_per_char_zh_base"]
        assert metrics["vocab.tokens_per_char_zh_after"] == vm["tokens_per_char_zh_merged"]
        md = (out / "report.md").read_text()
        assert "## Vocabulary" in md
        row = next(l for l in md.splitlines() if l.startswith("| zh |"))
        assert row.endswith(f"| {vm['tokens_per_char_zh_base']:.3f} | "
                            f"{vm['tokens_per_char_zh_merged']:.3f} |")
        if mode == "none":
            assert "vocab.mode none: no extension: the base's 320 tokens." in md
            assert vm["tokens_per_char_zh_base"] == vm["tokens_per_char_zh_merged"]
        else:
            assert f"320 → {vm['merged_vocab']:,} tokens" in md
            assert vm["tokens_per_char_zh_merged"] < 0.5 * vm["tokens_per_char_zh_base"]


def test_quantization_table_kld_speed_pareto_and_gates(evaluated, tmp_path):
    """The quantization section from the evaluations' own KLD statistics and speed rows (here
    written into copies of real evaluations), with KLD and same-top-p gates."""
    import shutil

    from steps import quant_table

    evals = {}
    kld = {"gguf-f32": None, "gguf-f16": (0.0004, 0.99), "gguf-q4_0": (0.05, 0.85)}
    for label, d in evaluated["evaluations"].items():
        evals[label] = tmp_path / label
        shutil.copytree(d, evals[label])
        res = json.loads((evals[label] / "results.json").read_text())
        if label.startswith("gguf-") and kld[label]:
            for st in res["sets"].values():
                st["kld"] = {"reference": "model-f32.gguf", "kld_mean": kld[label][0],
                             "kld_err": 1e-5, "kld_p99": 10 * kld[label][0],
                             "same_top_p": kld[label][1], "same_top_p_err": 0.01, "rms_dp": 0.02}
            speed = [{"test": t, "threads": n, "avg_ts": v, "stdev_ts": 1.0, "samples_ts": [v]}
                     for t, n, v in (("pp64", 1, 900.0), ("pp64", 2, 1500.0), ("tg16", 1, 300.0),
                                     ("tg16", 2, 280.0))]
            (evals[label] / "speed.json").write_text(json.dumps({"rows": speed}))
        (evals[label] / "results.json").write_text(json.dumps(res))
    out = tmp_path / "report"
    out.mkdir()
    gates = {"q4_0": {"max_mean_kld": 0.01, "min_same_top_p": 0.8},
             "f16": {"max_mean_kld": 0.001}, "f32": {"max_mean_kld": 0.001}}
    metrics = rp.run(rp.Config(gates=gates), out, evaluations=evals,
                     quantized=evaluated["quantized"],
                     speeds={k: v for k, v in evals.items() if (v / "speed.json").is_file()})
    rows = [json.loads(l) for l in (out / quant_table.QUANT_TABLE).read_text().splitlines()]
    assert {(r["type"], r["set"]) for r in rows} == {(q, s) for q in QTYPES for s in ("en", "zh")}
    q4 = next(r for r in rows if r["type"] == "q4_0" and r["set"] == "en")
    assert (q4["kld_mean"], q4["same_top_p"], q4["imatrix"]) == (0.05, 0.85, False)
    assert (q4["pp_ts"], q4["pp_threads"], q4["tg_ts"], q4["tg_threads"]) == (1500.0, 2, 300.0, 1)
    assert quant_table.pareto_front([r for r in rows if r["set"] == "en"]) == {"gguf-f16", "gguf-q4_0"}
    md = (out / "report.md").read_text()
    assert "## Quantization" in md and "| q4_0 ★ | no | en |" in md and "1,500 (2)" in md
    assert "![kld_vs_size.png](kld_vs_size.png)" in md and (out / "tg_vs_threads.png").is_file()
    assert metrics["gguf-q4_0.en.kld_mean"] == 0.05 and metrics["gguf-f16.zh.tg_ts"] == 300.0
    checks = json.loads((out / "gates.json").read_text())["checks"]
    by = {(c["gate"], c["set"], c["metric"]): c for c in checks}
    assert not by[("q4_0", "en", "kld_mean")]["passed"] and by[("q4_0", "en", "same_top_p")]["passed"]
    assert by[("f16", "zh", "kld_mean")]["passed"]
    assert "no KL divergence measured" in by[("f32", "en", "kld_mean")]["reason"]
    assert metrics["gates_passed"] == 0


def test_a_gate_must_be_able_to_check_something():
    with pytest.raises(ValueError, match="set vs"):
        rp.Gate(max_delta_ppl_pct=5.0)
    with pytest.raises(ValueError, match="checks nothing"):
        rp.Gate(vs="f16")
    assert rp.Gate(max_mean_kld=0.05).vs is None
