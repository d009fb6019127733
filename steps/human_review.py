"""Human scores of the models' answers, summarised for the report (pure Python: the scores come
from pipelines/reviews.py's snapshot, a JSON list of {model, prompt_index, instruction, score,
reviewer, time}).

    summarise(reviews, judge_scores=None) -> {
        "models": {model: {"mean": float, "n": int, "reviewers": int}},   # sorted by model
        "n": int,            # every review
        "reviewers": int,    # distinct reviewers overall
        "agreement": {"spearman": float | None, "p_value": float | None, "n": int} | None,
    }

`agreement` (only with judge_scores {model: {prompt_index: score}}): Spearman's rank correlation
between the human mean of each (model, prompt) and the judge's score, over the pairs both have;
None inside when fewer than 2 pairs or either side is constant.
"""
from __future__ import annotations

import math
from collections import defaultdict


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarise(reviews: list[dict], judge_scores: dict[str, dict[int, float]] | None = None
              ) -> dict:
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in reviews:
        by_model[str(r["model"])].append(r)
    models = {m: {"mean": _mean(float(r["score"]) for r in rs), "n": len(rs),
                  "reviewers": len({r.get("reviewer") for r in rs})}
              for m, rs in sorted(by_model.items())}
    out = {"models": models, "n": len(reviews),
           "reviewers": len({r.get("reviewer") for r in reviews}), "agreement": None}
    if judge_scores is not None:
        pairs: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in reviews:
            pairs[(str(r["model"]), int(r["prompt_index"]))].append(float(r["score"]))
        human, judge = [], []
        for (m, i), scores in sorted(pairs.items()):
            j = (judge_scores.get(m) or {})
            value = j.get(i, j.get(str(i)))   # JSON keys are strings
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            human.append(_mean(scores))
            judge.append(float(value))
        rho = p = None
        if len(human) >= 2 and len(set(human)) > 1 and len(set(judge)) > 1:
            from scipy.stats import spearmanr

            res = spearmanr(human, judge)
            rho, p = float(res.statistic), float(res.pvalue)
        out["agreement"] = {"spearman": rho, "p_value": p, "n": len(human)}
    return out


def markdown(summary: dict) -> str:
    """The report's "Human scores" section: a table model | mean | n | reviewers, and the
    agreement with the judge when there is one."""
    lines = ["## Human scores", ""]
    if not summary.get("n"):
        return "\n".join(lines + ["No human scores yet (`llamaflow review`).", ""])
    lines += [(f"{summary['n']} score(s) from {summary['reviewers']} reviewer(s), 1–10, answers "
               "shown blind and shuffled (`llamaflow review`)."), "",
              "| model | mean | n | reviewers |", "|---|---:|---:|---:|"]
    for m, s in summary["models"].items():
        lines.append(f"| {m} | {s['mean']:.2f} | {s['n']} | {s['reviewers']} |")
    a = summary.get("agreement")
    if a is not None:
        lines.append("")
        if a["spearman"] is None:
            lines.append(f"Agreement with the judge: not computable ({a['n']} (model, prompt) "
                         "pair(s) scored by both, or one side constant).")
        else:
            lines.append(f"Agreement with the judge: Spearman ρ = {a['spearman']:.3f} "
                         f"(p = {a['p_value']:.3g}) over {a['n']} (model, prompt) pairs "
                         "scored by both.")
    return "\n".join(lines) + "\n"


def metrics(summary: dict) -> dict[str, float | int]:
    """The summary as report metrics: human.<model>.mean / .n / .reviewers, human.n,
    human.reviewers and, with a judge, human.judge_spearman and human.judge_pairs."""
    out: dict[str, float | int] = {"human.n": summary["n"], "human.reviewers": summary["reviewers"]}
    for m, s in summary["models"].items():
        out |= {f"human.{m}.mean": s["mean"], f"human.{m}.n": s["n"],
                f"human.{m}.reviewers": s["reviewers"]}
    a = summary.get("agreement")
    if a is not None:
        out["human.judge_pairs"] = a["n"]
        if a["spearman"] is not None:
            out["human.judge_spearman"] = a["spearman"]
    return out
