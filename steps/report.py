"""Report stage: every evaluated model × every eval set in one table, plots, and quality gates.

Inputs are the evaluate stage's out_dirs (results.json each), the training stages' out_dirs
(trainer_log.jsonl) and the quantize stage's GGUF dirs. Outputs in out_dir:
    table.json, table.md      one row per (model, eval set): ppl ± err, bits/byte, char ppl,
                              tokens, Δ vs the reference model, GGUF size and bits per weight
    ppl_per_stage.png         perplexity and bits/byte per model, one line per eval set
    loss_curves.png           training (and eval) loss per step of each training run
    quant_size_vs_ppl.png     GGUF file size vs perplexity per quant type
    quantization.jsonl        per GGUF and set: type, imatrix, size, bpw, PPL, ΔPPL, KLD,
                              same top p, RMS Δp, pp/tg tokens/s (steps/quant_table.py)
    kld_vs_size.png           mean KLD against size per set, the Pareto front joined
    tg_vs_threads.png         generation tokens/s against threads per type
    gates.json                each configured gate with its measured value and pass/fail
    report.md                 the table, the vocabulary (tokens per character before and after
                              the vocab stage), the gates and the plots, for a Prefect markdown
                              artifact

Per-token perplexity compares only between models with the same tokenizer (the GGUFs and the
merged model; base vs base-zh do not share a vocabulary). Each row is matched with the reference
row of its eval set (column "vs ref", see compare_rows):
  * other vocabulary (n_vocab differs): a different token stream is legitimate, so no ΔPPL, only
    Δbits/byte, which normalises by the text;
  * same vocabulary, same text, different n_text_tokens: one of the two tokenizers is wrong (an HF
    tokenizer that dropped a text's edge newlines gave 1878 ids where llama.cpp gave 1883, and the
    ΔPPL of two different token streams looked like a quantisation error). The row is marked
    "TOKENS DIFFER", no Δ is computed (bits/byte would cover other scored text too), report.md
    lists it, and a gate on such a pair fails instead of measuring;
  * other text (the set's text_sha256 differs): nothing compares;
  * otherwise ΔPPL when the scored token counts agree, and Δbits/byte.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from steps import MetricsCallback, Stage, human_review, mc_table, quant_table
from steps.judge import markdown as judge_markdown
from steps.judge import single_scores

VERSION = "5"  # 5: multiple-choice accuracy
# one report of every evaluation: selected, forced and tagged with evaluate
STAGE = Stage(part_of="evaluate", tables={quant_table.QUANT_TABLE: ()})


class GateFailed(RuntimeError):
    """A configured quality gate failed and on_fail is "fail" (the report is written first)."""


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vs: str | None = Field(None, description=(
        "the model the Δ limits compare with: a label (e.g. gguf-f16) or a quant type (f16); "
        "null with KLD limits only (those are against the evaluation's KLD reference)"))
    max_delta_ppl_pct: float | None = Field(None, description=(
        "per-token perplexity may exceed the other model's by at most this % (same tokenizer "
        "only)"))
    max_delta_bpb_pct: float | None = Field(None, description="the same for bits per byte")
    max_mean_kld: float | None = Field(None, description=(
        "mean KL divergence from the KLD reference (evaluate.kld_reference) at most this"))
    min_same_top_p: float | None = Field(None, description=(
        "the likeliest token agrees with the KLD reference's at least this often (0-1)"))
    min_delta_acc_pp: float | None = Field(None, description=(
        "multiple-choice accuracy (evaluate.mc_sets) may fall at most this many percentage "
        "points below the `vs` model's, or the base model's when vs is null (-2: two points "
        "below at worst), on every set and shot count"))
    sets: list[str] | None = Field(None, description="eval sets to check; null = every set both "
                                                     "have")

    @model_validator(mode="after")
    def _limits_that_can_be_checked(self):
        if self.vs is None and (self.max_delta_ppl_pct is not None or
                                self.max_delta_bpb_pct is not None):
            raise ValueError("max_delta_ppl_pct/max_delta_bpb_pct compare with another model: "
                             "set vs (e.g. vs: f16)")
        if all(v is None for v in (self.max_delta_ppl_pct, self.max_delta_bpb_pct,
                                   self.max_mean_kld, self.min_same_top_p,
                                   self.min_delta_acc_pp)):
            raise ValueError("a gate with no limit checks nothing: set max_delta_ppl_pct, "
                             "max_delta_bpb_pct, max_mean_kld, min_same_top_p or "
                             "min_delta_acc_pp")
        return self


class Config(BaseModel):
    """report stage: one table of every evaluated model × every eval set, plots (perplexity per
    stage, training loss curves, GGUF size vs perplexity) and quality gates."""
    model_config = ConfigDict(extra="forbid")
    reference: str | None = Field("gguf-f16", description=(
        "Δ columns compare each model with this one (a model label, or a quant type such as f16)"))
    gates: dict[str, Gate] = Field(
        default_factory=lambda: {"q4_0": Gate(vs="f16", max_delta_ppl_pct=5.0)}, description=(
            "model label (or quant type) -> limits against another model, on every shared eval "
            "set unless `sets` lists some"))
    reviews: str | None = Field(None, description=(
        "people's 1-10 scores of the answers (a JSON list the flow writes from MLflow's "
        "assessments, `llamaflow review`): their means per model and agreement with the judge; "
        "null = none. Set by the flow"))
    on_fail: Literal["fail", "tag"] = Field("tag", description=(
        "what a failed gate does: \"fail\" raises after writing the report (the flow run "
        "fails); \"tag\" records gates_passed=0 in the metrics and carries on"))


DATA_FIELDS = ("reviews",)
# These hold the speed columns (tokens/s: other numbers on every run and machine), so the
# artifact digest counts them by name only; table.json and gates.json carry the results.
DIGEST_EXCLUDE = ("report.md", quant_table.QUANT_TABLE, "tg_vs_threads.png")


def _label(name: str, labels) -> str | None:
    """A gate/reference name as given ("gguf-q4_0") or short ("q4_0" → "gguf-q4_0")."""
    if name in labels:
        return name
    return f"gguf-{name}" if f"gguf-{name}" in labels else None


def gguf_size(path: Path) -> dict:
    """{"file_size", "n_params", "bpw"} of a .gguf (or a dir holding exactly one)."""
    import gguf

    from steps.quantize import find_gguf

    path = find_gguf(Path(path))
    n_params = int(sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors))
    size = path.stat().st_size
    return {"file_size": size, "n_params": n_params, "bpw": size * 8 / n_params}


def _quant_facts(quantize_dir: Path) -> dict:
    """gguf_size of a quantize artifact, and whether its type used the importance matrix."""
    info = Path(quantize_dir) / "quant_info.json"
    imatrix = info.is_file() and json.loads(info.read_text()).get("imatrix", False)
    return gguf_size(quantize_dir) | {"imatrix": bool(imatrix)}


def read_training_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _pct(a, b):
    return None if a is None or b in (None, 0) else (a / b - 1.0) * 100.0


SAME, OTHER_VOCAB, OTHER_TEXT, TOKENS_DIFFER = ("same tokens", "other vocabulary", "other text",
                                                "TOKENS DIFFER")


def compare_rows(r: dict, ref: dict) -> tuple[str, str | None]:
    """(status, reason) of table row `r` against row `ref` for the same eval set; status is one of
    SAME, OTHER_VOCAB, OTHER_TEXT, TOKENS_DIFFER (see the module docstring). Rows of evaluations
    written before n_vocab / text_sha256 were recorded count as same vocabulary and text."""
    if r.get("text_sha256") and ref.get("text_sha256") and r["text_sha256"] != ref["text_sha256"]:
        return OTHER_TEXT, "the eval set's text differs"
    if r.get("n_vocab") is not None and ref.get("n_vocab") is not None \
            and r["n_vocab"] != ref["n_vocab"]:
        return OTHER_VOCAB, f"n_vocab {r['n_vocab']} vs {ref['n_vocab']}"
    if r.get("n_text_tokens") is not None and ref.get("n_text_tokens") is not None \
            and r["n_text_tokens"] != ref["n_text_tokens"]:
        return TOKENS_DIFFER, (f"{r['n_text_tokens']} vs {ref['n_text_tokens']} text tokens with the "
                               f"same vocabulary (n_vocab {r.get('n_vocab', '?')}) on the same text: "
                               "one of the two tokenizers does not give the other's ids")
    return SAME, None


def build_report(evaluations: dict[str, Path], training_logs: dict[str, Path] | None = None,
                 quant_info: dict[str, dict] | None = None, out_dir: Path = Path("."), *,
                 gates: dict[str, Gate | dict] | None = None, reference: str | None = "gguf-f16",
                 on_fail: str = "tag", vocab_report: dict | None = None,
                 speeds: dict[str, list[dict]] | None = None, judge: dict | None = None,
                 human: dict | None = None) -> dict:
    """Write table/plots/gates for `evaluations` (label -> evaluate out_dir) into out_dir and
    return {"rows", "gates", "passed"}; raise GateFailed afterwards if a gate failed and
    on_fail == "fail"."""
    out_dir = Path(out_dir)
    training_logs, quant_info = training_logs or {}, quant_info or {}
    gates = {k: g if isinstance(g, Gate) else Gate(**g) for k, g in (gates or {}).items()}
    if on_fail not in ("fail", "tag"):
        raise ValueError(f"on_fail={on_fail!r}; choose fail or tag")
    results = _read_evaluations(evaluations)
    for label, f in training_logs.items():
        if not Path(f).is_file():
            raise FileNotFoundError(f"training log `{label}`: {f} not found")
    labels = list(results)
    ref = _label(reference, labels) if reference else None
    gates, skipped = _drop_unevaluated_gates(gates, labels)
    rows = _rows(results, quant_info)
    _compare_with_reference(rows, ref)
    checks = [c for key, g in gates.items() for c in _check_gate(key, g, results, rows, labels)]
    # None, not True, when nothing was checked (no gates, or every gate skipped): a report must
    # never claim a pass it did not measure
    passed = all(c["passed"] for c in checks) if checks else None
    gates_out = {"passed": passed, "on_fail": on_fail, "checks": checks, "skipped": skipped}
    mismatches = [r for r in rows if r["vs_ref"] == TOKENS_DIFFER]

    (out_dir / "table.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (out_dir / "gates.json").write_text(json.dumps(gates_out, indent=1), encoding="utf-8")
    table_md = markdown_table(rows, ref)
    (out_dir / "table.md").write_text(table_md + "\n", encoding="utf-8")
    plots = _plots(rows, labels, training_logs, out_dir, ref=ref,
                   limits=sorted({(c["model"], c["max_delta_pct"]) for c in checks
                                  if c.get("metric") == "ppl" and c["vs"] == ref}))
    qrows = quant_table.quantization_rows(rows, results, quant_info, speeds or {})
    if qrows:
        (out_dir / quant_table.QUANT_TABLE).write_text(
            "".join(json.dumps(r) + "\n" for r in qrows), encoding="utf-8")
        plots += quant_table.plots(qrows, speeds or {}, out_dir)
    arows = mc_table.accuracy_rows(results)
    mc_table.write(arows, out_dir)
    plots += [p for p in [mc_table.plot(arows, out_dir)] if p]
    sections = (vocabulary_markdown(vocab_report) + mc_table.markdown(arows)
                + quant_table.markdown(qrows) + judge_markdown(judge)
                + (human_review.markdown(human).splitlines() + [""] if human else []))
    report_md = _report_markdown(table_md, ref, mismatches, checks, skipped, plots, sections)
    (out_dir / "report.md").write_text(report_md, encoding="utf-8")

    if passed is False and on_fail == "fail":
        raise GateFailed("quality gate(s) failed: " + "; ".join(_failures(checks))
                         + f" (report in {out_dir})")
    return {"rows": rows, "gates": gates_out, "passed": passed, "plots": plots,
            "token_mismatches": len(mismatches), "quantization": qrows, "accuracy": arows}


def _read_evaluations(evaluations: dict[str, Path]) -> dict[str, dict]:
    """label -> the results.json of that evaluate stage output."""
    results = {}
    for label, d in evaluations.items():
        f = Path(d) / "results.json"
        if not f.is_file():
            raise FileNotFoundError(f"evaluation `{label}`: {f} not found (not an evaluate "
                                    "stage output)")
        results[label] = json.loads(f.read_text(encoding="utf-8"))
    return results


def _drop_unevaluated_gates(gates: dict[str, Gate], labels) -> tuple[dict[str, Gate], list[dict]]:
    """(the gates that can be checked, the skipped ones with their reason). A gate on a model this
    run did not evaluate (e.g. that quant type was not made) is listed as skipped in gates.json and
    report.md, never counted as passed."""
    skipped = [{"gate": k, "reason": f"no evaluated model `{n}` (models: {labels})"}
               for k, g in gates.items() for n in (k, g.vs)
               if n is not None and _label(n, labels) is None]
    gates = {k: g for k, g in gates.items() if k not in {s["gate"] for s in skipped}}
    return gates, skipped


def _rows(results: dict[str, dict], quant_info: dict[str, dict]) -> list[dict]:
    """One table row per (model, eval set), its "vs ref" and Δ columns still empty."""
    rows = []
    for label, res in results.items():
        q = quant_info.get(label, {})
        for set_name, r in res["sets"].items():
            rows.append({
                "model": label, "set": set_name, "backend": res.get("backend"),
                "protocol": r["protocol"], "n_ctx": r["n_ctx"],
                "ppl": r["ppl"], "ppl_err": r["ppl_err"], "bits_per_byte": r["bits_per_byte"],
                "char_ppl": r["char_ppl"], "n_scored": r["n_scored"],
                "n_text_tokens": r.get("n_text_tokens"), "n_bytes": r["n_bytes"],
                "n_vocab": res.get("n_vocab"), "text_sha256": r.get("text_sha256"),
                "vs_ref": None, "vs_ref_reason": None,
                "delta_ppl_pct": None, "delta_bpb_pct": None,
                "file_size": q.get("file_size"), "bpw": q.get("bpw")})
    return rows


def _by_model_set(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["set"]): r for r in rows}


def _compare_with_reference(rows: list[dict], ref: str | None) -> None:
    """Fill each row's "vs ref" status and the Δ columns that status allows (module docstring)."""
    by = _by_model_set(rows)
    for row in rows:
        rr = by.get((ref, row["set"])) if ref else None
        if rr is None:
            continue
        row["vs_ref"], row["vs_ref_reason"] = compare_rows(row, rr)
        if row["vs_ref"] in (SAME, OTHER_VOCAB):
            row["delta_bpb_pct"] = _pct(row["bits_per_byte"], rr["bits_per_byte"])
        if row["vs_ref"] == SAME and row["n_scored"] == rr["n_scored"]:
            row["delta_ppl_pct"] = _pct(row["ppl"], rr["ppl"])


def _check_gate(key: str, g: Gate, results: dict[str, dict], rows: list[dict],
                labels) -> list[dict]:
    """The checks of gate `key` (its model vs g.vs), one per eval set and limited metric."""
    label = _label(key, labels)
    checks = _kld_checks(key, g, label, results[label]["sets"])
    if g.min_delta_acc_pp is not None:
        checks += mc_table.checks(key, label, _label(g.vs, labels) if g.vs else None,
                                  g.min_delta_acc_pp, results, g.sets)
    if g.vs is None or (g.max_delta_ppl_pct is None and g.max_delta_bpb_pct is None):
        return checks
    by = _by_model_set(rows)
    vs = _label(g.vs, labels)
    for s in g.sets or [s for s in results[label]["sets"] if s in results[vs]["sets"]]:
        a, b = by.get((label, s)), by.get((vs, s))
        if a is None or b is None:
            checks.append({"gate": key, "model": label, "vs": vs, "set": s, "passed": False,
                           "reason": f"set `{s}` missing from one of the two evaluations"})
            continue
        status, reason = compare_rows(a, b)
        if status == TOKENS_DIFFER:   # two token streams: a Δ would measure the tokenizers
            checks.append({"gate": key, "model": label, "vs": vs, "set": s, "passed": False,
                           "reason": reason})
            continue
        for metric, limit in (("ppl", g.max_delta_ppl_pct), ("bits_per_byte", g.max_delta_bpb_pct)):
            if limit is None:
                continue
            delta = _pct(a[metric], b[metric])
            checks.append({"gate": key, "model": label, "vs": vs, "set": s, "metric": metric,
                           "value": a[metric], "reference": b[metric], "delta_pct": delta,
                           "max_delta_pct": limit, "passed": delta is not None and delta <= limit})
    return checks


def _kld_checks(key: str, g: Gate, label: str, sets: dict) -> list[dict]:
    """Gate `key`'s KLD and same-top-p limits, one check per eval set and limit."""
    checks = []
    for s in g.sets or list(sets):
        kld = (sets.get(s) or {}).get("kld")
        for metric, limit, ok in (("kld_mean", g.max_mean_kld, lambda v, lim: v <= lim),
                                  ("same_top_p", g.min_same_top_p, lambda v, lim: v >= lim)):
            if limit is None:
                continue
            base = {"gate": key, "model": label, "vs": kld["reference"] if kld else None,
                    "set": s, "metric": metric, "limit": limit}
            if kld is None:
                checks.append(base | {"passed": False, "reason": "no KL divergence measured "
                                      "for this set: only GGUF evaluations other than "
                                      "evaluate.kld_reference's get one (is it set?)"})
            else:
                checks.append(base | {"value": kld[metric], "passed": ok(kld[metric], limit)})
    return checks


def vocabulary_markdown(vocab_report: dict | None) -> list[str]:
    """The vocab stage's outcome: tokenizer sizes and, per measured text, tokens per character
    before and after, the figure that says whether extending the vocabulary paid (or would)."""
    if not vocab_report:
        return []
    mode = vocab_report.get("mode", "all")
    base = vocab_report["base_pieces"]
    size = vocab_report.get("tokenizer_size", base + vocab_report.get("pieces_added", 0))
    what = (f"no extension: the base's {base:,} tokens" if mode == "none" else
            f"{base:,} → {size:,} tokens ({vocab_report.get('pieces_added', 0):,} pieces added)")
    md = ["## Vocabulary", "", f"vocab.mode {mode}: {what}.", ""]
    sets = {k[len("eval_"):]: v for k, v in vocab_report.items()
            if k.startswith("eval_") and isinstance(v, dict)}
    if sets:
        md += ["| text | characters | tokens (base) | tokens (after) | tokens/char (base) | "
               "tokens/char (after) |", "|---|---|---|---|---|---|"]
        for name, st in sets.items():
            chars = max(st["chars"], 1)
            md.append(f"| {name} | {st['chars']:,} | {st['base_tokens']:,} | "
                      f"{st['merged_tokens']:,} | {st['base_tokens'] / chars:.3f} | "
                      f"{st['merged_tokens'] / chars:.3f} |")
        md.append("")
    return md


def _report_markdown(table_md: str, ref: str | None, mismatches: list[dict], checks: list[dict],
                     skipped: list[dict], plots: list[str], vocab_md: list[str] = ()) -> str:
    """report.md: the table, the vocabulary, the rows not compared, the gates, the skipped
    gates, the plots."""
    md = ["# llamaflow evaluation report", "", table_md, "", *vocab_md]
    if mismatches:
        md += ["## Token counts differ", "",
               f"These rows tokenized their eval set into another number of tokens than {ref} with "
               "the same vocabulary, so they are not compared with it (no Δ):", ""]
        md += [f"- {r['model']} / {r['set']}: {r['vs_ref_reason']}" for r in mismatches] + [""]
    if checks:
        md += ["## Gates", "", "| gate | set | metric | Δ % | max Δ % | result |", "|---|---|---|---|---|---|"]
        # KLD and same-top-p checks hold a value and a limit, not a Δ: they go in those columns
        md += [f"| {c['gate']} vs {c['vs']} | {c['set']} | {c.get('metric', '-')} | "
               f"{_fmt(c.get('delta_pct', c.get('value')), 2 if 'limit' not in c else 6)} | "
               f"{_fmt(c.get('max_delta_pct', c.get('limit')), 2 if 'limit' not in c else 6)} | "
               f"{'pass' if c['passed'] else 'FAIL'}{': ' + c['reason'] if 'reason' in c else ''} |"
               for c in checks]
        md.append("")
    md += [f"Gate `{s['gate']}` skipped: {s['reason']}" for s in skipped] + ([""] if skipped else [])
    md += [f"![{p}]({p})" for p in plots]
    return "\n".join(md) + "\n"


def _failures(checks: list[dict]) -> list[str]:
    """One line per failed check, for GateFailed's message."""
    return [f"{c['gate']}/{c['set']}: {c['reason']}" if "reason" in c else
            f"{c['gate']}/{c['set']}/{c['metric']}: {c['value']:.6g} against the limit "
            f"{c['limit']}" if "limit" in c else
            f"{c['gate']}/{c['set']}/{c.get('metric')}: Δ {_fmt(c.get('delta_pct'), 2)}% > "
            f"{c.get('max_delta_pct')}%" for c in checks if not c["passed"]]


def _fmt(v, nd=4):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown_table(rows: list[dict], reference: str | None) -> str:
    ref = reference or "-"
    head = ("| model | set | PPL ± err | bits/byte | char PPL | scored tokens | text tokens | "
            f"vs {ref} | ΔPPL % vs {ref} | Δbits/byte % vs {ref} | GGUF MB | bpw |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        size = r["file_size"] / 1e6 if r["file_size"] else None
        vs = r.get("vs_ref") or "-"
        if vs == TOKENS_DIFFER:
            vs = f"⚠ {vs}"
        lines.append(
            f"| {r['model']} | {r['set']} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | "
            f"{_fmt(r['bits_per_byte'])} | {_fmt(r['char_ppl'], 3)} | {r['n_scored']} | "
            f"{_fmt(r['n_text_tokens'])} | {vs} | {_fmt(r['delta_ppl_pct'], 3)} | "
            f"{_fmt(r['delta_bpb_pct'], 3)} | {_fmt(size, 2)} | {_fmt(r['bpw'], 2)} |")
    return "\n".join(lines)


def _plots(rows, labels, training_logs, out_dir: Path, *, ref: str | None = None,
           limits: list[tuple[str, float]] = ()) -> list[str]:
    """Draw the report's plots into out_dir; returns the file names of those there was data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    made = [_plot_ppl_per_stage(plt, rows, labels, sets, out_dir) if rows else None,
            _plot_loss_curves(plt, training_logs, out_dir) if training_logs else None,
            _plot_size_vs_ppl(plt, rows, sets, out_dir, ref=ref, limits=limits)]
    return [name for name in made if name is not None]


def _save(plt, fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return name


def _plot_ppl_per_stage(plt, rows, labels, sets, out_dir: Path) -> str:
    """Perplexity and bits per byte of each model, one line per eval set."""
    by = _by_model_set(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in sets:
        xs = [m for m in labels if (m, s) in by]
        axes[0].plot(xs, [by[m, s]["ppl"] for m in xs], marker="o", label=s)
        axes[1].plot(xs, [by[m, s]["bits_per_byte"] for m in xs], marker="o", label=s)
    axes[0].set(title="perplexity per token (same-tokenizer models compare)", ylabel="PPL")
    axes[0].set_yscale("log")
    axes[1].set(title="bits per byte (compares across tokenizers)", ylabel="bits/byte")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
        ax.grid(alpha=.3)
    return _save(plt, fig, out_dir, "ppl_per_stage.png")


def _plot_loss_curves(plt, training_logs, out_dir: Path) -> str:
    """Training (and eval) loss per step of each training run; non-finite losses left out."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, f in training_logs.items():
        recs = read_training_log(f)
        for key in ("loss", "train_loss", "eval_loss"):
            pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))
                   and "step" in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="." if key == "eval_loss" else None,
                        linestyle="--" if key == "eval_loss" else "-", label=f"{label} {key}")
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=.3)
    if ax.lines:
        ax.legend()
    return _save(plt, fig, out_dir, "loss_curves.png")


def _plot_size_vs_ppl(plt, rows, sets, out_dir: Path, *, ref: str | None,
                      limits: list[tuple[str, float]]) -> str | None:
    """Size vs quality of the GGUFs (None when no GGUF row has a ΔPPL). Perplexity Δ % against
    the reference, not raw perplexity, so eval sets with very different perplexities share one
    axis and a regression is read off directly (a gate's limit is a dashed line); size on a log
    axis, since each quant type roughly halves it; each GGUF named once on the top axis, not once
    per set beside its points, where the labels of close sizes piled up."""
    quant = [r for r in rows if r["file_size"] and r.get("delta_ppl_pct") is not None]
    if not quant:
        return None
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in sets:
        pts = sorted((r["file_size"] / 1e6, r["delta_ppl_pct"]) for r in quant if r["set"] == s)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=s)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    for model, limit in limits:
        ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.8)
        ax.annotate(f"gate {model.removeprefix('gguf-')}: +{limit:g} %", (0.01, limit),
                    xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(0, 3), fontsize=8, color="tab:red")
    ax.set_xscale("log")
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))
    sizes = sorted({r["file_size"] / 1e6: r["model"].removeprefix("gguf-") for r in quant}.items())
    top = ax.secondary_xaxis("top")
    top.set_xticks([x for x, _ in sizes], labels=[m for _, m in sizes], rotation=40,
                   fontsize=8, ha="left")
    top.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="GGUF file size (MB, log scale)",
           ylabel=f"Δ perplexity vs {ref or 'reference'} (%)")
    ax.set_title("GGUF size vs perplexity", pad=22)
    ax.grid(alpha=.3, which="both")
    ax.legend()
    return _save(plt, fig, out_dir, "quant_size_vs_ppl.png")


def _read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None


def _human_scores(reviews: str | None, judge: Path | None) -> dict | None:
    """The summary of people's scores (None without any), with their agreement with the judge's
    single scores of the same answers, matched by model and instruction."""
    records = _read_json(Path(reviews)) if reviews else None
    if not records:
        return None
    by_text = single_scores(judge) if judge is not None else {}
    index = {r["instruction"]: r["prompt_index"] for r in records}
    judge_scores = {m: {index[t]: v for t, v in scores.items() if t in index}
                    for m, scores in by_text.items()}
    return human_review.summarise(records, judge_scores or None)


def run(config: Config, out_dir: Path, *, on_metrics: MetricsCallback | None = None,
        evaluations: dict[str, Path], training: dict[str, Path] | None = None,
        quantized: dict[str, Path] | None = None, vocab: Path | None = None,
        speeds: dict[str, Path] | None = None, judge: Path | None = None) -> dict:
    """evaluations: model label -> evaluate out_dir; training: run label -> training stage
    out_dir (its trainer_log.jsonl is plotted); quantized: qtype -> quantize out_dir (its .gguf
    size and bits per weight go into the rows of the evaluation labelled gguf-<qtype>); vocab:
    the vocab stage's out_dir (its vocab_report.json: sizes and tokens per character); speeds:
    model label -> speed stage out_dir (its speed.json: pp/tg tokens/s per thread count); judge:
    the judge stage's out_dir (judge.json: pairwise and single scores); config.reviews: people's
    scores (steps/human_review.py), compared with the judge's single scores."""
    vocab_report = None
    if vocab is not None and (Path(vocab) / "vocab_report.json").is_file():
        vocab_report = json.loads((Path(vocab) / "vocab_report.json").read_text(encoding="utf-8"))
    evaluations = {k: Path(v) for k, v in evaluations.items() if v is not None}
    logs = {}
    for label, d in (training or {}).items():
        if d is None:
            continue
        f = Path(d) / "trainer_log.jsonl" if Path(d).is_dir() else Path(d)
        if not f.is_file():
            raise FileNotFoundError(f"training run `{label}`: {f} not found")
        logs[label] = f
    quant_info = {f"gguf-{q}" if not q.startswith("gguf-") else q: _quant_facts(Path(d))
                  for q, d in (quantized or {}).items() if d is not None}
    speeds = {label: rows for label, d in (speeds or {}).items()
              if d is not None and (rows := quant_table.read_speed(Path(d)))}
    judged = _read_json(Path(judge) / "judge.json") if judge is not None else None
    human = _human_scores(config.reviews, judge)
    rep = build_report(evaluations, logs, quant_info, out_dir, gates=config.gates,
                       reference=config.reference, on_fail=config.on_fail,
                       vocab_report=vocab_report, speeds=speeds, judge=judged, human=human)
    metrics = {f"{r['model']}.{r['set']}.{k}": r[k] for r in rep["rows"]
               for k in ("ppl", "bits_per_byte", "delta_ppl_pct") if r[k] is not None}
    for name, st in ((k[len("eval_"):], v) for k, v in (vocab_report or {}).items()
                     if k.startswith("eval_") and isinstance(v, dict)):
        metrics[f"vocab.tokens_per_char_{name}_base"] = st["base_tokens"] / max(st["chars"], 1)
        metrics[f"vocab.tokens_per_char_{name}_after"] = st["merged_tokens"] / max(st["chars"], 1)
    for r in rep["quantization"]:
        for k in ("kld_mean", "kld_p99", "same_top_p", "rms_dp", "pp_ts", "tg_ts"):
            if r[k] is not None:
                metrics[f"{r['model']}.{r['set']}.{k}"] = r[k]
    metrics |= mc_table.metrics(rep["accuracy"])
    metrics |= human_review.metrics(human) if human else {}
    metrics["token_mismatches"] = rep["token_mismatches"]
    metrics["gates_checked"] = len(rep["gates"]["checks"])
    metrics["gates_failed"] = sum(not c["passed"] for c in rep["gates"]["checks"])
    if rep["passed"] is not None:
        metrics["gates_passed"] = int(rep["passed"])
        if on_metrics:
            on_metrics({"gates_passed": metrics["gates_passed"]}, 0)
    return metrics
