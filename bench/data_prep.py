"""Benchmark: the pretrain stage's data preparation (tokenize + group into blocks) against a plain
batched fast-tokenizer loop over the same file, on the same cores.

    .venv/bin/python bench/data_prep.py [--sizes 50,500] [--block-size 512] [--workdir DIR]

The corpus is ../shared/data's CLUECorpusSmall sample (Chinese, one document per line) repeated
to each size in MB; the tokenizer is the LLaMA tokenizer from ../shared/data as HF files. Each run
is a child process that reports its wall time (after imports) and peak RSS (VmHWM):
- plain: read the file 1,000 lines at a time, `tokenizer(lines)["input_ids"]`, count tokens (no
  output written): the least a tokenizing stage does;
- ours: `steps.pretrain.build_blocks` (datasets Arrow on disk, BOS per line, blocks of
  block_size), with `num_proc` as the stage would use on these cores.
Targets (issue 19): ours at least as fast as plain (ratio ≥ 1.0 in MB/s), its peak RSS flat as the
corpus grows (the 500 MB run's within 1.25x of the 50 MB run's). Timings are noisy on shared
cores; both are measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
CORPUS = SHARED / "corpora" / "CLUECorpusSmall_sampled.txt"
SP_MODEL = SHARED / "tokenizers" / "llama_tokenizer.model"


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(kind: str, corpus: Path, tok_dir: Path, work: Path, block_size: int,
          num_proc: int | None) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    if kind == "plain":
        n_tok = 0
        with open(corpus, encoding="utf-8") as f:
            while True:
                lines = [line for _, line in zip(range(1000), f)]
                if not lines:
                    break
                n_tok += sum(len(x) for x in tok([s.rstrip("\n") for s in lines])["input_ids"])
    else:
        from steps.pretrain import build_blocks

        blocks = build_blocks([corpus], tok, block_size, "text", work, num_proc=num_proc)
        n_tok = len(blocks) * block_size
    import resource

    # the tokenizer processes' own peak (the largest of them) beside this process's
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": time.perf_counter() - t0, "peak_rss": _hwm(), "worker_peak_rss": workers,
            "tokens": n_tok}


def _run_child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps([str(a) for a in args])],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="50,500", help="corpus sizes in MB")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--num-proc", type=int, default=None,
                   help="ours: worker processes (default: the stage's, every core it is given)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, corpus, tok_dir, work, block, nproc = json.loads(a.child)
        print(json.dumps(child(kind, Path(corpus), Path(tok_dir), Path(work), int(block),
                               None if nproc == "None" else int(nproc))))
        return 0
    if not CORPUS.is_file() or not SP_MODEL.is_file():
        print(f"needs {CORPUS} and {SP_MODEL} (../shared/data)", file=sys.stderr)
        return 2
    from steps.tokenizer import save_hf_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-prep-", dir=a.workdir))
    try:
        tok_dir = root / "tok"
        save_hf_tokenizer(SP_MODEL, tok_dir)
        sample = CORPUS.read_bytes()
        rows = []
        for mb in [int(s) for s in a.sizes.split(",")]:
            corpus = root / f"corpus-{mb}mb.txt"
            with open(corpus, "wb") as f:
                while f.tell() < mb * 1_000_000:
                    f.write(sample)
            size = corpus.stat().st_size
            plain = _run_child("plain", corpus, tok_dir, root / "w-plain", a.block_size, None)
            ours = _run_child("ours", corpus, tok_dir, root / f"w-{mb}", a.block_size, a.num_proc)
            shutil.rmtree(root / f"w-{mb}", ignore_errors=True)
            corpus.unlink()
            rows.append((mb, size, plain, ours))
        print(f"cores: {len(os.sched_getaffinity(0))}, block_size {a.block_size}")
        print("| corpus | plain MB/s | ours MB/s | ours/plain | plain peak RSS "
              "| ours peak RSS (largest worker) |")
        print("|---|---|---|---|---|---|")
        for mb, size, plain, ours in rows:
            pr, orr = size / 1e6 / plain["seconds"], size / 1e6 / ours["seconds"]
            print(f"| {mb} MB | {pr:.2f} | {orr:.2f} | {orr / pr:.2f} | "
                  f"{plain['peak_rss'] / 2**20:.0f} MiB | {ours['peak_rss'] / 2**20:.0f} MiB "
                  f"({ours['worker_peak_rss'] / 2**20:.0f} MiB) |")
        if len(rows) > 1:
            growth = rows[-1][3]["peak_rss"] / rows[0][3]["peak_rss"]
            print(f"ours peak RSS {rows[-1][0]} MB / {rows[0][0]} MB: {growth:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
