"""The quantization table of the report: one row per GGUF and eval set, with what people who
quantize choose by: size and bits per weight, perplexity and its change, the KL divergence of the
type's token distributions from the reference's (mean ± error, p99), how often the two agree on
the likeliest token (same top p), the RMS change of the correct token's probability (RMS Δp),
and llama-bench's prompt (pp) and generation (tg) tokens/s at the best thread count.

Perplexity alone hides errors that cancel (a quant can score a lower perplexity than f16 on one
set while its distributions drift); KLD and same-top-p do not. The Pareto front of mean KLD
against file size marks the types no other type beats on both.

Inputs, all from the stages' own files: the evaluations' results.json (sets[name]["kld"], made
with a reference model), the speed stage's speed.json (steps/speed.py), and the quantize
artifacts' quant_info.json (size, bpw, whether an importance matrix was used).
"""
from __future__ import annotations

import json
from pathlib import Path

QUANT_TABLE = "quantization.jsonl"   # one JSON object per row: MLflow shows it as a table


def qtype_of(label: str) -> tuple[str, bool | None]:
    """("q4_k_m", True) for "gguf-q4_k_m@imatrix"; imatrix None when the label does not say
    (the quantize artifact's quant_info.json does)."""
    q = label.removeprefix("gguf-")
    return q.removesuffix("@imatrix"), True if q.endswith("@imatrix") else None


def read_speed(speed_dir: Path) -> list[dict]:
    """The rows of a speed stage's speed.json (none when it has none)."""
    f = Path(speed_dir) / "speed.json"
    return json.loads(f.read_text())["rows"] if f.is_file() else []


def _best(speed_rows: list[dict], kind: str) -> tuple[float | None, int | None]:
    from steps.speed import best

    top = best(speed_rows, kind)
    return (None, None) if top is None else (top["avg_ts"], top["threads"])


def quantization_rows(rows: list[dict], results: dict[str, dict], quant_info: dict[str, dict],
                      speeds: dict[str, list[dict]]) -> list[dict]:
    """The report's rows of GGUF models (label gguf-*), joined with their KLD, speed and
    quantize facts."""
    out = []
    for r in rows:
        label = r["model"]
        if not label.startswith("gguf-"):
            continue
        q, imatrix = qtype_of(label)
        info = quant_info.get(label, {})
        kld = results[label]["sets"].get(r["set"], {}).get("kld") or {}
        pp, pp_t = _best(speeds.get(label, []), "pp")
        tg, tg_t = _best(speeds.get(label, []), "tg")
        out.append({
            "model": label, "type": q, "imatrix": bool(info.get("imatrix", imatrix)),
            "set": r["set"], "file_size": info.get("file_size"), "bpw": info.get("bpw"),
            "ppl": r["ppl"], "ppl_err": r["ppl_err"], "delta_ppl_pct": r.get("delta_ppl_pct"),
            "kld_reference": kld.get("reference"), "kld_mean": kld.get("kld_mean"),
            "kld_err": kld.get("kld_err"), "kld_p99": kld.get("kld_p99"),
            "same_top_p": kld.get("same_top_p"), "same_top_p_err": kld.get("same_top_p_err"),
            "rms_dp": kld.get("rms_dp"), "pp_ts": pp, "pp_threads": pp_t, "tg_ts": tg,
            "tg_threads": tg_t})
    return out


def pareto_front(rows: list[dict]) -> set[str]:
    """Models of one set that no other model beats on both file size and mean KLD."""
    pts = [(r["file_size"], r["kld_mean"], r["model"]) for r in rows
           if r["file_size"] is not None and r["kld_mean"] is not None]
    return {m for s, k, m in pts
            if not any((s2 <= s and k2 <= k) and (s2 < s or k2 < k) for s2, k2, _ in pts)}


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(qrows: list[dict]) -> list[str]:
    """The "Quantization" section of report.md (nothing when no GGUF was evaluated)."""
    if not qrows:
        return []
    fronts = {s: pareto_front([r for r in qrows if r["set"] == s]) for s in {r["set"] for r in qrows}}
    md = ["## Quantization", "",
          "KLD, same top p and RMS Δp compare each type's token distributions with "
          f"{next((r['kld_reference'] for r in qrows if r['kld_reference']), 'the reference')}'s on "
          "the same tokens; ★ marks the Pareto front of mean KLD against size. Speed: "
          "llama-bench's pp/tg tokens/s at the best thread count (threads in brackets).", "",
          "| type | imatrix | set | GGUF MB | bpw | PPL ± err | ΔPPL % | mean KLD ± err | KLD p99 "
          "| same top p % | RMS Δp % | pp t/s | tg t/s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in qrows:
        star = " ★" if r["model"] in fronts[r["set"]] else ""
        size = None if r["file_size"] is None else r["file_size"] / 1e6
        kld = "-" if r["kld_mean"] is None else f"{r['kld_mean']:.6f} ± {r['kld_err']:.6f}"
        top = "-" if r["same_top_p"] is None else \
            f"{100 * r['same_top_p']:.2f} ± {100 * r['same_top_p_err']:.2f}"
        pp = "-" if r["pp_ts"] is None else f"{r['pp_ts']:,.0f} ({r['pp_threads']})"
        tg = "-" if r["tg_ts"] is None else f"{r['tg_ts']:,.0f} ({r['tg_threads']})"
        md.append(f"| {r['type']}{star} | {'yes' if r['imatrix'] else 'no'} | {r['set']} | "
                  f"{_f(size, '.2f')} | {_f(r['bpw'], '.2f')} | "
                  f"{r['ppl']:.4f} ± {r['ppl_err']:.4f} | {_f(r['delta_ppl_pct'], '.3f')} | "
                  f"{kld} | {_f(r['kld_p99'], '.6f')} | {top} | "
                  f"{_f(None if r['rms_dp'] is None else 100 * r['rms_dp'], '.3f')} | {pp} | {tg} |")
    return md + [""]


def plots(qrows: list[dict], speeds: dict[str, list[dict]], out_dir: Path) -> list[str]:
    """kld_vs_size.png (per set, the Pareto front joined) and tg_vs_threads.png (per type);
    each only when there is something to draw. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sets = sorted({r["set"] for r in qrows if r["kld_mean"] is not None and r["file_size"]})
    if sets:
        fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), squeeze=False)
        for ax, s in zip(axes[0], sets):
            rs = [r for r in qrows if r["set"] == s and r["kld_mean"] is not None and r["file_size"]]
            front = pareto_front(rs)
            for r in rs:
                on = r["model"] in front
                ax.scatter(r["file_size"] / 1e6, r["kld_mean"], color="C3" if on else "C0", zorder=3)
                ax.annotate(r["model"].removeprefix("gguf-"), (r["file_size"] / 1e6, r["kld_mean"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
            line = sorted((r["file_size"] / 1e6, r["kld_mean"]) for r in rs if r["model"] in front)
            ax.plot(*zip(*line), color="C3", lw=1, label="Pareto front")
            ax.set(xlabel="GGUF size (MB)", ylabel="mean KLD", title=f"KLD vs size: {s}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "kld_vs_size.png", dpi=110)
        plt.close(fig)
        written.append("kld_vs_size.png")
    tg = {m: sorted((r["threads"], r["avg_ts"]) for r in rows if r["test"].startswith("tg"))
          for m, rows in speeds.items()}
    tg = {m: pts for m, pts in tg.items() if pts}
    if tg:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for m, pts in sorted(tg.items()):
            ax.plot(*zip(*pts), marker="o", label=m.removeprefix("gguf-"))
        ax.set(xlabel="threads", ylabel="tg tokens/s", title="generation speed vs threads")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "tg_vs_threads.png", dpi=110)
        plt.close(fig)
        written.append("tg_vs_threads.png")
    return written
