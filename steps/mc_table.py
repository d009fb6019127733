"""The report's accuracy section: multiple-choice accuracy (evaluate's results["mc"]) per model ×
set × shot count, its Δ in percentage points against the base model and against the f16 GGUF
(what the vocabulary and training bought, what quantization cost), a grouped bar plot, and the
accuracy gates (min_delta_acc_pp)."""
from __future__ import annotations

import json
from pathlib import Path

ACCURACY_TABLE = "accuracy.jsonl"
BASE, F16 = "base", "gguf-f16"


def accuracy_rows(results: dict[str, dict]) -> list[dict]:
    """One row per (model, set, shots) with accuracy, n, the categories' accuracies and the Δ
    (percentage points) against `base` and `gguf-f16` where those scored the same set at the
    same shots on the same questions."""
    rows = []
    for label, res in results.items():
        for set_name, mc in (res.get("mc") or {}).items():
            for shot, r in mc.items():
                if not shot.endswith("shot"):
                    continue
                rows.append({"model": label, "set": set_name, "shots": int(shot[:-4]),
                             "acc": r["acc"], "n": r["n"], "subject_mean": r["subject_mean"],
                             "categories": {c: v["acc"] for c, v in r["categories"].items()},
                             "style": mc.get("style"), "scoring": mc.get("scoring")})
    by = {(r["model"], r["set"], r["shots"]): r for r in rows}
    for r in rows:
        for ref, key in ((BASE, "delta_vs_base_pp"), (F16, "delta_vs_f16_pp")):
            other = by.get((ref, r["set"], r["shots"]))
            r[key] = (None if other is None or other["n"] != r["n"] or ref == r["model"]
                      else (r["acc"] - other["acc"]) * 100.0)
    return rows


def write(rows: list[dict], out_dir: Path) -> None:
    if rows:
        (Path(out_dir) / ACCURACY_TABLE).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _pp(v) -> str:
    return "-" if v is None else f"{v:+.1f}"


def markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cats = list(dict.fromkeys(c for r in rows for c in r["categories"]))
    r0 = rows[0]
    md = ["## Multiple-choice accuracy", "",
          f"Prompt style {r0['style']}, scoring {r0['scoring']}; accuracy in % of n questions; "
          "Δ in percentage points against the base model and against the f16 GGUF.", "",
          "| model | set | shots | acc % | n | " + " | ".join(f"{c} %" for c in cats)
          + " | Δ vs base | Δ vs f16 |",
          "|" + "---|" * (7 + len(cats))]
    for r in rows:
        md.append(f"| {r['model']} | {r['set']} | {r['shots']} | {r['acc'] * 100:.1f} | {r['n']} | "
                  + " | ".join("-" if r["categories"].get(c) is None
                               else f"{r['categories'][c] * 100:.1f}" for c in cats)
                  + f" | {_pp(r['delta_vs_base_pp'])} | {_pp(r['delta_vs_f16_pp'])} |")
    return md + [""]


def metrics(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        key = f"{r['model']}.mc.{r['set']}.{r['shots']}shot"
        out[f"{key}.acc"] = r["acc"]
        for k in ("delta_vs_base_pp", "delta_vs_f16_pp"):
            if r[k] is not None:
                out[f"{key}.{k}"] = r[k]
    return out


def checks(key: str, label: str, vs: str | None, limit: float, results: dict,
           sets: list[str] | None) -> list[dict]:
    """Gate `key`: accuracy of `label` at most -limit points below `vs`'s (base when None), one
    check per set and shot count both scored; a set/shot only one of them scored fails."""
    vs = vs or BASE
    mine, theirs = (results.get(label) or {}).get("mc") or {}, (results.get(vs) or {}).get("mc") or {}
    names = sets or sorted(set(mine) | set(theirs))
    out = []
    for s in names:
        shots = sorted({k for k in (mine.get(s) or {}) if k.endswith("shot")}
                       | {k for k in (theirs.get(s) or {}) if k.endswith("shot")})
        for shot in shots or ["-"]:
            a, b = (mine.get(s) or {}).get(shot), (theirs.get(s) or {}).get(shot)
            base = {"gate": key, "model": label, "vs": vs, "set": f"{s} {shot}",
                    "metric": "acc_pp", "limit": limit}
            if a is None or b is None or a["n"] != b["n"]:
                out.append(base | {"passed": False, "reason": (
                    f"multiple-choice set `{s}` {shot} not scored on the same questions by both "
                    "(evaluate.mc_sets)")})
                continue
            delta = (a["acc"] - b["acc"]) * 100.0
            out.append(base | {"value": delta, "passed": delta >= limit})
    return out


def plot(rows: list[dict], out_dir: Path) -> str | None:
    """Grouped bars: accuracy of each model, one group per (set, shots)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(dict.fromkeys((r["set"], r["shots"]) for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["set"], r["shots"]): r["acc"] * 100 for r in rows}
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(len(models), 2) / 2), 4))
    x = np.arange(len(groups))
    for i, m in enumerate(models):
        ax.bar(x + i * width - 0.4 + width / 2, [by.get((m, *g), 0) for g in groups], width,
               label=m)
    ax.axhline(25.0, color="grey", linestyle="--", linewidth=0.8)   # chance with four choices
    ax.set_xticks(x, [f"{s} {k}-shot" for s, k in groups])
    ax.set(ylabel="accuracy (%)", title="multiple-choice accuracy (dashed: chance)", ylim=(0, 100))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=.3, axis="y")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "accuracy.png", dpi=100)
    plt.close(fig)
    return "accuracy.png"
