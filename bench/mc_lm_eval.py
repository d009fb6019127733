"""steps/mc.py (style lm-eval, scoring continuation) against lm-evaluation-harness itself.

Runs lm-eval's own ceval-valid_<subject> / cmmlu_<subject> task definitions (the installed
package's YAMLs, `include`d; only the data source is overridden to point at local csv files in
the released layouts) with HFLM(float32, cpu, batch 1), log_samples on, then our evaluate_set on
the same model and files, and compares per question: the rendered context byte for byte, each
choice's log-likelihood and the pick.

    python bench/mc_lm_eval.py --model HF_DIR [--shots 0 5] [--out result.json]

Limit of the csv route: the datasets csv builder infers column types with pandas and takes no
dtype. A column where only some options are numbers stays text (rendered as written); a column
that is numbers in every row of one split and text in another makes load_dataset fail with a
schema cast error; one that is all numbers in every split would render "0.90" as 0.9 (compare()
then reports the prompt as differing). The demo sets have none of these.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEMO_MC = REPO / "pipelines" / "demo_data" / "mc"
DEFAULT_SETS = {"ceval": (DEMO_MC / "ceval", "ceval"), "cmmlu": (DEMO_MC / "cmmlu", "cmmlu")}


def _tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_task_yamls(tmpdir: Path, name: str, root: Path, layout: str,
                     subjects: list[str]) -> dict[str, str]:
    """One YAML per subject in tmpdir including lm-eval's own task file; {subject: task name}."""
    tasks = {}
    for sub in subjects:
        if layout == "ceval":
            base = _tasks_dir() / "ceval" / f"ceval-valid_{sub}.yaml"
            files = {"val": str(root / "val" / f"{sub}_val.csv"),
                     "dev": str(root / "dev" / f"{sub}_dev.csv")}
        else:
            base = _tasks_dir() / "cmmlu" / f"cmmlu_{sub}.yaml"
            files = {"test": str(root / "test" / f"{sub}.csv"),
                     "dev": str(root / "dev" / f"{sub}.csv")}
        if not base.is_file():
            raise FileNotFoundError(f"{base}: lm-eval has no task for subject {sub}")
        task = f"llamaflow_{name}_{sub}"
        q = "question" if layout == "ceval" else "Question"
        cols = ["id" if layout == "ceval" else "", q, "A", "B", "C", "D", q.replace("uestion", "") and
                ("answer" if layout == "ceval" else "Answer")]
        kwargs = {"data_files": files,
                  # ceval's dev adds an explanation column, which the csv builder refuses (every
                  # split must have the same columns): read only the columns the task uses
                  "usecols": [c for c in cols if c] if layout == "ceval" else None,
                  # the hub's copies are typed string; pandas would read "None"/"NA" as NaN (the
                  # csv builder takes no dtype, so "8" still becomes an int, rendered the same,
                  # and "0.90" the float 0.9, which is not: compare() reports such prompts)
                  "keep_default_na": False, "na_filter": False}
        cfg = {"include": str(base), "task": task, "dataset_path": "csv", "dataset_name": None,
               "dataset_kwargs": {k: v for k, v in kwargs.items() if v is not None}}
        (tmpdir / f"{task}.yaml").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        tasks[sub] = task
    return tasks


def _choice_lls(sample: dict) -> list[float]:
    resps = sample.get("filtered_resps") or sample["resps"]
    out = []
    for r in resps:
        while isinstance(r, (list, tuple)) and r and isinstance(r[0], (list, tuple)):
            r = r[0]
        out.append(float(r[0] if isinstance(r, (list, tuple)) else r))
    return out


def _context(sample: dict) -> str:
    a = sample["arguments"]
    if isinstance(a, dict):      # newer layouts: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}}
        first = next(iter(a.values()))
        return first["arg_0"] if isinstance(first, dict) else first[0]
    return a[0][0]


def run_lm_eval(model_dir: Path, sets: dict[str, tuple[Path, str]], shots: list[int],
                max_length: int = 4096) -> dict:
    """{(set, shots, subject): [sample, ... in doc order]}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from steps.mc import McSet, read_set

    # max_length: the tiny test models' contexts (256/512 positions) are shorter than a 5-shot
    # prompt of byte-fallback CJK; lm-eval would cut the prompt from the left and we would not
    # (evaluate_set refuses, or feeds it whole): let both see the whole prompt
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=1,
              max_length=max_length)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = {}
        for name, (root, layout) in sets.items():
            subjects = list(read_set(McSet(path=str(root), layout=layout)))
            for sub, task in write_task_yamls(tmp, name, root, layout, subjects).items():
                names[task] = (name, sub)
        tm = TaskManager(include_path=str(tmp))
        for k in shots:
            res = simple_evaluate(model=lm, tasks=list(names), num_fewshot=k, task_manager=tm,
                                  log_samples=True, batch_size=1, device="cpu",
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
            for task, samples in res["samples"].items():
                name, sub = names[task]
                out[(name, k, sub)] = sorted(samples, key=lambda s: s["doc_id"])
    return out, lm


def run_ours(model_dir: Path, sets: dict[str, tuple[Path, str]], shots: list[int]) -> dict:
    """{(set, shots, subject): [(record, context), ...]} from steps.mc.evaluate_set."""
    from steps import mc
    from steps.evaluate import load

    m = load(model_dir, device="cpu")
    out = {}
    for name, (root, layout) in sets.items():
        s = mc.McSet(path=str(root), layout=layout)
        subjects = mc.read_set(s)
        _, records = mc.evaluate_set(m, name, s, subjects, shots, style="lm-eval",
                                     scoring="continuation", progress=False)
        it = iter(records)
        for k in shots:
            for sub in subjects.values():
                for q in sub.questions:
                    r = next(it)
                    assert (r["shots"], r["subject"], r["id"]) == (k, sub.name, q.id)
                    ctx, _ = mc.prompt(layout, sub, q, k, "lm-eval")
                    out.setdefault((name, k, sub.name), []).append((r, ctx))
    return out


def compare(lm_out: dict, ours: dict) -> dict:
    rows, per = [], {}
    for key, recs in ours.items():
        samples = lm_out.get(key)
        if samples is None or len(samples) != len(recs):
            raise RuntimeError(f"{key}: lm-eval scored {len(samples or [])} questions, we {len(recs)}")
        name, k, sub = key
        for (r, ctx), s in zip(recs, samples):
            lls = _choice_lls(s)
            theirs = "ABCD"[max(range(len(lls)), key=lambda i: (lls[i], -i))]
            lm_ctx = _context(s)
            d = max(abs(a - b) for a, b in zip(lls, r["scores"]))
            rows.append({"set": name, "shots": k, "subject": sub, "id": r["id"],
                         "doc_id": s["doc_id"], "pick": r["pick"], "lm_eval_pick": theirs,
                         "same_pick": theirs == r["pick"], "prompt_equal": lm_ctx == ctx,
                         "max_abs_dll": d, "scores": r["scores"], "lm_eval_lls": lls,
                         **({} if lm_ctx == ctx else {"ours": ctx, "lm_eval": lm_ctx})})
            p = per.setdefault(f"{name} {k}shot", {"n": 0, "same_pick": 0,
                                                    "prompt_mismatch": 0, "max_abs_dll": 0.0})
            p["n"] += 1
            p["same_pick"] += theirs == r["pick"]
            p["prompt_mismatch"] += lm_ctx != ctx
            p["max_abs_dll"] = max(p["max_abs_dll"], d)
    for p in per.values():
        p["agreement"] = p["same_pick"] / p["n"]
    return {"per": per, "rows": rows,
            "agreement": sum(r["same_pick"] for r in rows) / len(rows),
            "prompt_mismatches": sum(not r["prompt_equal"] for r in rows),
            "max_abs_dll": max(r["max_abs_dll"] for r in rows), "n": len(rows)}


def compare_model(model_dir: Path, shots=(0, 5), sets: dict | None = None) -> dict:
    sets = sets or DEFAULT_SETS
    lm_out, lm = run_lm_eval(Path(model_dir), sets, list(shots))
    del lm
    return compare(lm_out, run_ours(Path(model_dir), sets, list(shots)))


def table(res: dict) -> str:
    lines = [f"{'set × shots':16s} {'n':>4s} {'agree':>7s} {'prompt≠':>8s} {'max|Δll|':>10s}"]
    for k, p in res["per"].items():
        lines.append(f"{k:16s} {p['n']:4d} {p['agreement']:7.3f} {p['prompt_mismatch']:8d} "
                     f"{p['max_abs_dll']:10.2e}")
    for r in res["rows"]:
        if not r["prompt_equal"]:
            lines.append(f"prompt differs: {r['set']} {r['shots']}shot {r['subject']} {r['id']}:"
                         f"\n  ours    {r['ours']!r}\n  lm-eval {r['lm_eval']!r}")
        if not r["same_pick"]:
            lines.append(f"pick differs: {r['set']} {r['shots']}shot {r['subject']} {r['id']}: "
                         f"ours {r['pick']} {r['scores']} lm-eval {r['lm_eval_pick']} {r['lm_eval_lls']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="an HF model directory")
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    res = compare_model(a.model, a.shots)
    print(table(res))
    if a.out:
        a.out.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
    ok = res["agreement"] == 1.0 and res["prompt_mismatches"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
