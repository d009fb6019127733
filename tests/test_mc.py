"""Multiple-choice benchmarks (steps/mc.py): the released C-Eval / CMMLU layouts and a JSONL set,
the prompts byte for byte, scores against transformers' own forward pass, the evaluate stage's
results, the report's accuracy table and gates, and bad input named at flow start.
(lm-evaluation-harness picking the same answers: tests/test_mc_lm_eval.py.)"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from steps import evaluate as ev
from steps import mc, mc_table, report

REPO = Path(__file__).resolve().parents[1]
MC = REPO / "pipelines" / "demo_data" / "mc"
CEVAL = mc.McSet(path=str(MC / "ceval"), layout="ceval")
CMMLU = mc.McSet(path=str(MC / "cmmlu"), layout="cmmlu")


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_sets_read_in_their_released_layouts():
    c = mc.read_set(CEVAL)
    assert list(c) == ["high_school_geography", "middle_school_mathematics"]
    geo = c["high_school_geography"]
    assert (geo.title, geo.category, len(geo.questions), len(geo.dev)) == ("高中地理", "Social Science", 6, 5)
    assert geo.questions[0].choices == ("上海", "广州", "北京", "南京") and geo.questions[0].answer == "C"
    m = mc.read_set(CMMLU)
    assert m["elementary_commonsense"].title == "小学常识" and m["elementary_mathematics"].category == "STEM"
    assert m["elementary_mathematics"].questions[0].id == "0"   # the unnamed index column
    assert len(mc.read_set(mc.McSet(path=str(MC / "ceval"), layout="ceval", max_questions=2,
                                    subjects=["middle_school_mathematics"]))
               ["middle_school_mathematics"].questions) == 2


def test_the_subject_tables_are_complete():
    from steps.mc_subjects import CATEGORIES, CEVAL as CE, CMMLU as CM

    assert len(CE) == 52 and len(CM) == 67
    assert {v[1] for v in CE.values()} == set(CATEGORIES) == {v[1] for v in CM.values()}


def test_bad_sets_are_named_with_the_file(tmp_path):
    with pytest.raises(ValueError, match="answers are not released: score split val"):
        mc.read_set(mc.McSet(path=str(MC / "ceval"), layout="ceval", split="test"))
    root = tmp_path / "c"
    _csv(root / "val" / "law_val.csv", "id,question,A,B,C\n0,q,a,b,c\n")
    with pytest.raises(ValueError, match=r"law_val.csv: no column D"):
        mc.read_set(mc.McSet(path=str(root), layout="ceval"))
    _csv(root / "val" / "law_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"law_val.csv line 2: answer 'E' is not one of A, B, C, D"):
        mc.read_set(mc.McSet(path=str(root), layout="ceval"))
    _csv(root / "val" / "law_val.csv", "id,question,A,B,C,D,answer\n")
    with pytest.raises(ValueError, match=r"law_val.csv: empty"):
        mc.read_set(mc.McSet(path=str(root), layout="ceval"))
    with pytest.raises(ValueError, match=r"subjects \['nope'\] not in"):
        mc.read_set(mc.McSet(path=str(MC / "ceval"), layout="ceval", subjects=["nope"]))
    with pytest.raises(ValueError, match="no column Question .*expected the released layout"):
        mc.read_set(mc.McSet(path=str(MC / "ceval"), layout="cmmlu"))   # C-Eval's files
    with pytest.raises(FileNotFoundError, match="expected the cmmlu layout"):
        mc.read_set(mc.McSet(path=str(MC / "ceval" / "dev"), layout="cmmlu"))
    with pytest.raises(ValueError, match="5-shot needs 5 dev examples.*law \\(0\\)"):
        _csv(root / "val" / "law_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n")
        mc.check_shots("c", mc.read_set(mc.McSet(path=str(root), layout="ceval")), [0, 5])


def test_a_jsonl_set_takes_its_dev_records_as_shots(tmp_path):
    f = tmp_path / "own.jsonl"
    recs = [{"subject": "own_law", "split": "dev", "question": "d", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"},
            {"subject": "own_law", "question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D",
             "subject_name": "法学", "category": "Humanities"},
            {"subject": "high_school_biology", "question": "q2", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    s = mc.read_set(mc.McSet(path=str(f), layout="jsonl"))
    assert (s["own_law"].title, s["own_law"].category, len(s["own_law"].dev),
            s["own_law"].questions[0].answer) == ("法学", "Humanities", 1, "D")
    assert (s["high_school_biology"].title, s["high_school_biology"].category) == ("高中生物", "STEM")
    f.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="own.jsonl: empty"):
        mc.read_set(mc.McSet(path=str(f), layout="jsonl"))


def test_the_prompts_are_the_recipes_and_lm_evals_byte_for_byte():
    sub = mc.read_set(CEVAL)["middle_school_mathematics"]
    q = sub.questions[0]
    ctx, delim = mc.prompt("ceval", sub, q, 1, "recipe")
    assert delim == "" and ctx == (
        "以下是中国关于初中数学考试的单项选择题，请选出其中的正确答案。\n\n"
        "计算 3 + 4 × 2 的结果是多少？\nA. 14\nB. 11\nC. 10\nD. 24\n答案：B\n\n"
        "计算 -3 + 5 的结果是\nA. 2\nB. -8\nC. 8\nD. -2\n答案：")
    ctx, delim = mc.prompt("ceval", sub, q, 1, "lm-eval")
    assert delim == " " and ctx == (
        "以下是中国关于初中数学的单项选择题，请选出其中的正确答案。\n\n"
        "计算 3 + 4 × 2 的结果是多少？\nA. 14\nB. 11\nC. 10\nD. 24\n答案： B\n\n"
        "计算 -3 + 5 的结果是\nA. 2\nB. -8\nC. 8\nD. -2\n答案：")
    sub = mc.read_set(CMMLU)["elementary_commonsense"]
    assert mc.prompt("cmmlu", sub, sub.questions[0], 0, "lm-eval")[0].startswith(
        "以下是关于小学常识的单项选择题，请直接给出正确答案的选项。\n\n春节是农历的哪一天？\nA. 正月十五")


def test_a_trailing_space_moves_to_the_continuation():
    tok = lambda s: [ord(c) for c in s]  # noqa: E731 - one id per character
    assert mc.encode_pair(tok, "答案： ", "A") == ([ord("答"), ord("案"), ord("：")], [32, 65])


def test_scores_are_transformers_log_softmax_of_the_letter(tiny_hf_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sub = mc.read_set(CEVAL)["high_school_geography"]
    context, delim = mc.prompt("ceval", sub, sub.questions[2], 5, "recipe")
    m = ev.load(tiny_hf_model)
    try:
        scores, n = mc.score_question(m, context, delim, "letter")
        cont_scores, _ = mc.score_question(m, context, delim, "continuation")
    finally:
        m.close()
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32).eval()
    ids = tok(context)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    want = []
    for letter in mc.LETTERS:
        cont = tok(context + letter)["input_ids"][len(ids):]
        want.append(float(lp[cont[0]]))
    assert n == len(ids) and np.allclose(scores, want, atol=1e-6)
    # the tiny tokenizer spells a letter after "：" in one piece: both scorings agree
    assert np.allclose(scores, cont_scores, atol=1e-9)


def test_accuracy_per_subject_category_and_overall():
    subs = mc.read_set(CEVAL)
    math_q = subs["middle_school_mathematics"].questions
    geo_q = subs["high_school_geography"].questions
    picks = ([(subs["middle_school_mathematics"], q, q.answer) for q in math_q[:3]]
             + [(subs["middle_school_mathematics"], q, "Z") for q in math_q[3:]]
             + [(subs["high_school_geography"], q, q.answer) for q in geo_q])
    a = mc._accuracy(picks)
    assert a["n"] == 12 and a["acc"] == 9 / 12 and a["subject_mean"] == (0.5 + 1.0) / 2
    assert a["categories"] == {"STEM": {"acc": 0.5, "n": 6}, "Social Science": {"acc": 1.0, "n": 6}}
    assert list(a["categories"]) == ["STEM", "Social Science"]   # the benchmarks' order


def test_the_stage_scores_every_set_and_shot(tiny_hf_model, tmp_path):
    cfg = ev.Config(mc_sets={"ceval": CEVAL, "cmmlu": CMMLU}, prompts=None)
    m = ev.run(cfg, tmp_path, model=tiny_hf_model)
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    answers = [json.loads(x) for x in (tmp_path / "mc_answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(answers) == (12 + 12) * 2 and {a["shots"] for a in answers} == {0, 5}
    for name in ("ceval", "cmmlu"):
        for shot in ("0shot", "5shot"):
            r = res["mc"][name][shot]
            mine = [a for a in answers if a["set"] == name and f"{a['shots']}shot" == shot]
            assert r["n"] == 12 and math.isclose(r["acc"], sum(a["correct"] for a in mine) / 12)
            assert m[f"mc.{name}.{shot}.acc"] == r["acc"]
    assert res["mc"]["ceval"]["split"] == "val" and res["mc"]["cmmlu"]["split"] == "test"
    assert "mc.ceval.5shot.subject.high_school_geography.acc" in m
    # the same model and files give the same bytes (no timings, no paths)
    again = tmp_path / "again"
    again.mkdir()
    ev.run(cfg, again, model=tiny_hf_model)
    assert (again / "mc_answers.jsonl").read_bytes() == (tmp_path / "mc_answers.jsonl").read_bytes()
    assert str(MC) not in (tmp_path / "results.json").read_text(encoding="utf-8")


def test_a_bad_set_fails_before_the_model_loads(tmp_path):
    cfg = ev.Config(mc_sets={"x": mc.McSet(path=str(MC / "ceval"), layout="ceval", split="test")},
                    prompts=None)
    with pytest.raises(ValueError, match=r"evaluate.mc_sets.x .*no answers"):
        ev.run(cfg, tmp_path, model=tmp_path)   # an empty dir: loading it would fail otherwise


def test_a_bad_set_is_named_at_flow_start(tmp_path):
    from pipelines.config import ConfigError
    from pipelines.validate import check

    _csv(tmp_path / "c" / "val" / "law_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n")
    with pytest.raises(ConfigError) as e:
        check([f"workdir={tmp_path / 'w'}", "stages=[evaluate]",
               f"+evaluate.mc_sets.mine={{path: {tmp_path / 'c'}, layout: ceval}}"])
    assert "evaluate.mc_sets.mine" in str(e.value) and "5-shot needs 5 dev examples" in str(e.value)


def _results(tmp_path: Path, accs: dict[str, float], n: int = 12) -> dict[str, Path]:
    """Evaluation dirs with one perplexity set and a ceval 0-shot accuracy each."""
    out = {}
    for label, acc in accs.items():
        d = tmp_path / label
        d.mkdir()
        r = {"acc": acc, "n": n, "subject_mean": acc, "categories": {"STEM": {"acc": acc, "n": n}},
             "subjects": {}}
        (d / "results.json").write_text(json.dumps({
            "model": label, "backend": "gguf" if label.startswith("gguf") else "hf", "n_vocab": 100,
            "sets": {"en": {"protocol": "llama.cpp", "n_ctx": 64, "ppl": 10.0, "ppl_err": 0.1,
                            "bits_per_byte": 1.0, "char_ppl": 2.0, "n_scored": 31, "n_bytes": 100,
                            "n_text_tokens": 200, "text_sha256": "x"}},
            "mc": {"ceval": {"layout": "ceval", "split": "val", "style": "recipe",
                             "scoring": "letter", "0shot": r}}}))
        out[label] = d
    return out


def test_the_report_has_the_accuracy_table_deltas_plot_and_gates(tmp_path):
    ev_dirs = _results(tmp_path, {"base": 0.5, "merged": 0.75, "gguf-f16": 0.75, "gguf-q4_0": 0.5})
    out = tmp_path / "report"
    out.mkdir()
    gates = {"merged": {"min_delta_acc_pp": -2}, "q4_0": {"vs": "f16", "min_delta_acc_pp": -10}}
    rep = report.build_report(ev_dirs, out_dir=out, gates=gates)
    rows = {r["model"]: r for r in rep["accuracy"]}
    assert rows["merged"]["delta_vs_base_pp"] == 25.0 and rows["gguf-q4_0"]["delta_vs_f16_pp"] == -25.0
    assert rows["base"]["delta_vs_base_pp"] is None
    checks = {c["gate"]: c for c in rep["gates"]["checks"]}
    assert checks["merged"]["passed"] and checks["merged"]["vs"] == "base"
    assert not checks["q4_0"]["passed"] and checks["q4_0"]["value"] == -25.0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Multiple-choice accuracy" in md and "| merged | ceval | 0 | 75.0 | 12 | 75.0 | +25.0 | +0.0 |" in md
    assert "accuracy.png" in rep["plots"] and (out / "accuracy.png").stat().st_size > 1000
    assert len((out / mc_table.ACCURACY_TABLE).read_text().splitlines()) == 4
    m = report.run(report.Config(gates={}), out, evaluations=ev_dirs)
    assert m["merged.mc.ceval.0shot.acc"] == 0.75 and m["merged.mc.ceval.0shot.delta_vs_base_pp"] == 25.0


def test_an_accuracy_gate_on_unscored_sets_fails_with_the_reason(tmp_path):
    ev_dirs = _results(tmp_path, {"base": 0.5, "merged": 0.75})
    res = json.loads((ev_dirs["base"] / "results.json").read_text())
    del res["mc"]
    (ev_dirs["base"] / "results.json").write_text(json.dumps(res))
    out = tmp_path / "r"
    out.mkdir()
    rep = report.build_report(ev_dirs, out_dir=out, gates={"merged": {"min_delta_acc_pp": -2}})
    (c,) = rep["gates"]["checks"]
    assert not c["passed"] and "not scored on the same questions" in c["reason"]
