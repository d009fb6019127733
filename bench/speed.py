"""Benchmark (not a test): steps/speed.py against llama.cpp's own `llama-bench`, same GGUF, same
settings, in one run; the figure is the ratio of our tokens/s to llama-bench's per (type, test,
threads), which should be ~1 (within the two tools' noise).

    .venv/bin/python bench/speed.py [--gguf A.gguf B.gguf ...] [--threads 1 2] [-p 512] [-n 128]
                                    [-r 5] [--out results.json]

Without --gguf it makes stories260K's f16, q8_0 and q4_0 GGUFs (../shared/data) the way the
lifecycle does. llama-bench runs against the installed llama-cpp-python's own libllama (the
kernels the evaluate stage uses) with --repack 0 -fa off, matching the stage's defaults
(extra_buffers false, flash_attn false). llama-bench is built on first use
(steps/llamacpp_tools.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))


def stories_ggufs(root: Path) -> list[Path]:
    from steps.convert import convert_meta_to_hf
    from steps.llama2c import import_llama2c
    from steps.quantize import export_gguf, quantize_gguf

    s = SHARED / "models" / "stories260K"
    meta = import_llama2c(s / "stories260K.bin", s / "tok512.model", root / "meta")
    hf = convert_meta_to_hf(meta, root / "hf", dtype="float32", context_length=512)
    out = [export_gguf(hf, root / "model-f16.gguf", "f16")]
    for q in ("q8_0", "q4_0"):
        quantize_gguf(root / "model-f16.gguf", root / f"model-{q}.gguf", q)
        out.append(root / f"model-{q}.gguf")
    return out


def llama_bench(gguf: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> list[dict]:
    from steps import llamacpp_tools

    cmd = [str(llamacpp_tools.tool("llama-bench")), "-m", str(gguf), "-p", str(n_prompt),
           "-n", str(n_gen), "-t", str(threads), "-r", str(reps), "-fa", "off", "--repack", "0",
           "-o", "json"]
    out = subprocess.run(cmd, env=llamacpp_tools.env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _test_name(row: dict) -> str:
    return f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"


def main() -> int:
    from steps import speed

    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", nargs="*", type=Path)
    ap.add_argument("--threads", nargs="*", type=int)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    threads = args.threads or speed.default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        ggufs = args.gguf or stories_ggufs(Path(tmp))
        results = []
        print(f"{'model':<22} {'test':<6} {'t':>3} {'ours t/s':>12} {'llama-bench':>12} {'ratio':>6}")
        for g in ggufs:
            ours = {(r["test"], r["threads"]): r for r in speed.measure(
                g, threads, n_prompt=args.p, n_gen=args.n, repetitions=args.r)}
            for t in threads:
                for ref in llama_bench(g, t, args.p, args.n, args.r):
                    key = (_test_name(ref), t)
                    mine = ours[key]
                    ratio = mine["avg_ts"] / ref["avg_ts"]
                    results.append({"model": g.name, "test": key[0], "threads": t,
                                    "ours_ts": mine["avg_ts"], "ours_stdev": mine["stdev_ts"],
                                    "llama_bench_ts": ref["avg_ts"],
                                    "llama_bench_stdev": ref["stddev_ts"], "ratio": ratio})
                    print(f"{g.name:<22} {key[0]:<6} {t:>3} {mine['avg_ts']:>12.1f} "
                          f"{ref['avg_ts']:>12.1f} {ratio:>6.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
