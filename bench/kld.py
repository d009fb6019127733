"""Benchmark (not a test): what KL divergence costs in the evaluate stage, next to plain perplexity.

One model as f16 + q4_0 GGUFs (default: stories260K from ../shared/data; --synthetic: the random
1.36B LLaMA of bench/quantize.py, made in the workdir; --hf DIR: any HF model directory), one
text (default: the canonical wiki.test.raw, --max-tokens of it), the llama.cpp protocol:
  A. evaluate q4_0 alone                        (perplexity only)
  B. evaluate q4_0 with reference=f16           (perplexity + KLD, in the same run)
  C. llama-perplexity f16 --kl-divergence-base, then q4_0 --kl-divergence (--tool; builds the
     tools on first use), and whether its printed summary equals ours line for line
Each job runs in its own child process; we report wall time and the child's peak RSS, B's
perplexity and KLD seconds from its timings.json, and the ratios.

    .venv/bin/python bench/kld.py [--workdir /tmp/llamaflow-bench-kld] [--tool]
                                  [--synthetic --max-tokens 2048 | --hf DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))

# a child's wall time and peak RSS (VmHWM), printed as the last line of its stdout
CHILD = """
import json, re, sys, time
sys.path.insert(0, {repo!r})
t = time.perf_counter()
{call}
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_mb": int(hwm.group(1)) / 1024}}))
"""


def job(call: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), call=call)],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"job failed:\n{call}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_ggufs(w: Path, hf: Path | None) -> dict[str, Path]:
    sys.path.insert(0, str(REPO))
    from steps import quantize as Q

    if hf is None:
        from steps.convert import convert_meta_to_hf
        from steps.llama2c import import_llama2c

        d = SHARED / "models" / "stories260K"
        hf = w / "hf"
        if not (hf / "config.json").is_file():
            meta = import_llama2c(d / "stories260K.bin", d / "tok512.model", w / "meta")
            convert_meta_to_hf(meta, hf, dtype="float32")
    f16 = w / "f16.gguf"
    if not f16.is_file():
        Q.export_gguf(hf, f16, "f16")
    q4 = w / "q4_0.gguf"
    if not q4.is_file():
        Q.quantize_gguf(f16, q4, "q4_0")
    return {"f16": f16, "q4_0": q4}


def evaluate_call(out: Path, model: Path, reference: Path | None, text: Path, kind: str,
                  n_ctx: int, max_tokens: int, threads: int) -> str:
    ref = f", reference=Path({str(reference)!r})" if reference else ""
    return (f"from pathlib import Path\nfrom steps import evaluate as ev\n"
            f"out = Path({str(out)!r}); out.mkdir(parents=True, exist_ok=True)\n"
            f"cfg = ev.Config(eval_sets={{'t': {{'path': {str(text)!r}, 'kind': {kind!r}}}}}, "
            f"n_ctx={n_ctx}, max_tokens={max_tokens}, prompts=None, n_threads={threads})\n"
            f"ev.run(cfg, out, model=Path({str(model)!r}){ref})")


def tool_run(w: Path, g: dict, text: Path, kind: str, n_ctx: int, max_tokens: int,
             threads: int) -> dict:
    """llama-perplexity on the same tokens: the text as the stage read it, the same chunks."""
    from steps import llamacpp_tools as T
    from steps.evaluate import read_text

    raw = w / "text.txt"
    raw.write_text(read_text(text, kind), encoding="utf-8")
    common = ["-c", n_ctx, "-b", n_ctx, "-fa", "off", "-t", threads, "-nr", "-ngl", "0",
              "--chunks", max_tokens // n_ctx]
    exe = T.tool("llama-perplexity")
    base = [exe, "-m", g["f16"], "-f", raw, "--kl-divergence-base", w / "base.kld", *common]
    kld = [exe, "-m", g["q4_0"], "--kl-divergence-base", w / "base.kld", "--kl-divergence",
           *common]
    out = {}
    for name, cmd in (("tool_base", base), ("tool_kld", kld)):
        out[name] = _timed(name, [str(c) for c in cmd], w / f"{name}.out")
    return out


def _timed(name: str, cmd: list[str], log: Path) -> dict:
    """Wall time and the tool's own peak RSS (wait4's rusage of that one child)."""
    import time

    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if p.returncode:
        raise SystemExit(f"{name} failed: see {log}")
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llamaflow-bench-kld"))
    ap.add_argument("--hf", type=Path, default=None, help="an HF model dir instead of stories260K")
    ap.add_argument("--synthetic", action="store_true",
                    help="bench/quantize.py's random 1.36B model (~3 GB, plus ~3.5 GB of GGUFs)")
    ap.add_argument("--text", type=Path, default=SHARED / "eval" / "wikitext-2-raw"
                    / "wikitext-test.hf-joined.txt")
    ap.add_argument("--kind", default="wikitext", choices=("text", "wikitext"))
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256 * 200,
                    help="tokens fed (whole n_ctx chunks)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tool", action="store_true", help="also run llama-perplexity and compare")
    a = ap.parse_args()
    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    if a.synthetic:
        sys.path.insert(0, str(REPO / "bench"))
        from quantize import make_model

        a.hf = make_model(w / "synthetic-hf")
    g = make_ggufs(w, a.hf)
    rows = {"model": str(a.hf or "stories260K"), "n_ctx": a.n_ctx, "max_tokens": a.max_tokens,
            "threads": a.threads}
    for name, ref in (("ppl_only", None), ("ppl_and_kld", g["f16"])):
        rows[name] = job(evaluate_call(w / name, g["q4_0"], ref, a.text, a.kind, a.n_ctx,
                                       a.max_tokens, a.threads))
    t = json.loads((w / "ppl_and_kld" / "timings.json").read_text())["sets"]["t"]
    stats = json.loads((w / "ppl_and_kld" / "results.json").read_text())["sets"]["t"]["kld"]
    rows["same_run"] = {"ppl_seconds": t["seconds"], "kld_seconds": t["kld_seconds"],
                        "kld_over_ppl": t["kld_seconds"] / t["seconds"]}
    rows["ratio_wall"] = rows["ppl_and_kld"]["seconds"] / rows["ppl_only"]["seconds"]
    rows["ratio_peak_rss"] = rows["ppl_and_kld"]["peak_rss_mb"] / rows["ppl_only"]["peak_rss_mb"]
    rows["kld"] = {k: stats[k] for k in ("n_scored", "kld_mean", "kld_p99", "same_top_p",
                                         "rms_dp")}
    if a.tool:
        from steps.kld import printed_summary, report_lines

        rows |= tool_run(w, g, a.text, a.kind, a.n_ctx, a.max_tokens, a.threads)
        printed = printed_summary((w / "tool_kld.out").read_text())
        ours = report_lines(stats)
        rows["tool_summary_equal"] = printed == ours
        rows["tool_lines_differing"] = [(p, o) for p, o in zip(printed, ours) if p != o]
    (w / "bench_kld.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
