"""Benchmark: Meta → HF conversion (steps.convert) against the physical floor, on a ~1.3B model.

    .venv/bin/python bench/convert.py [--workdir DIR] [--keep] [--meta DIR] [--warm] [--repeat N]

Synthesizes (no download) a Meta checkpoint in the real layout: dim 2048, 24 layers, 16 heads,
FFN 5632, vocab 32000, bf16, one consolidated.00.pth (~2.7 GB), tokenizer = Meta's LLaMA
tokenizer from ../shared/data when present (else the 320-piece test tokenizer: vocab_size 32000
stays in params.json, so the weights are the same size). Then, each in its own child process:
- convert: `convert_meta_to_hf(meta, out, dtype="bfloat16")`; the child reports wall time (after
  its imports), peak RSS (VmHWM), the RSS right after its imports (baseline), and the peaks of
  RssAnon (private memory) and RssFile (mapped file pages, i.e. page cache counted because the
  checkpoint is mmapped) sampled every 20 ms;
- floor: read every tensor of the checkpoint (mmap) and write its bytes, uncopied, to one file, no
  fsync (the converter does not fsync either): the least any converter must do.
Before each run the input's pages are evicted (fsync + posix_fadvise DONTNEED on the checkpoint
files only), so both read cold from disk; `--warm` skips that. Targets (issue 2): time ≤ 1.3x
the floor, peak RSS ≤ 0.3x the checkpoint bytes. Disk: ~5.5 GB under --workdir (removed unless
--keep). Timings are noisy on shared cores.
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

PARAMS = {"dim": 2048, "multiple_of": 256, "n_heads": 16, "n_layers": 24, "norm_eps": 1e-5,
          "vocab_size": 32000}
TIME_TARGET, RSS_TARGET = 1.3, 0.3


def _status() -> dict[str, int]:
    """Selected /proc/self/status fields in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class _Sampler:
    """Peak RssAnon / RssFile, sampled in a thread (VmHWM only gives the peak of their sum)."""

    def __init__(self, every_s: float = 0.02):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s):
        while not self._stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child_convert(meta: Path, out: Path) -> dict:
    # everything the converter imports, so that the baseline is the interpreter + libraries
    import safetensors  # noqa: F401
    import sentencepiece  # noqa: F401
    import torch  # noqa: F401
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast  # noqa: F401

    from steps.convert import convert_meta_to_hf

    base = _status()
    with _Sampler() as s:
        t0 = time.perf_counter()
        convert_meta_to_hf(meta, out, dtype="bfloat16", max_shard_size="2GB")
        seconds = time.perf_counter() - t0
    end = _status()
    return {"seconds": seconds, "baseline_rss": base["VmRSS"], "peak_rss": end["VmHWM"],
            "peak_anon": s.peak["RssAnon"], "peak_file": s.peak["RssFile"],
            "out_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def child_floor(meta: Path, out: Path) -> dict:
    import torch

    base = _status()
    t0 = time.perf_counter()
    n = 0
    with open(out, "wb") as fh:
        for f in sorted(meta.glob("consolidated.*.pth")):
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            for t in sd.values():
                # the mapped bytes straight to disk: every page is read once, nothing is copied
                fh.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
                n += t.numel() * t.element_size()
            del sd
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": n, "baseline_rss": base["VmRSS"],
            "peak_rss": _status()["VmHWM"]}


def _evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_child(kind: str, meta: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", kind, str(meta), str(out)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{kind} child failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - t0
    return res


def synthesize(meta: Path) -> Path:
    import torch

    from steps.meta import synthesize_checkpoint

    shared = Path(os.environ.get("LLAMAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
    tok = shared / "tokenizers" / "llama_tokenizer.model"
    if not tok.is_file():
        from tests.tiny import train_tiny_tokenizer

        tok = train_tiny_tokenizer(meta.parent / "tok" / "tokenizer.model")
    return synthesize_checkpoint(meta, PARAMS, tok, n_shards=1, seed=0, dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where the ~5.5 GB go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--warm", action="store_true", help="do not evict the input from page cache")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (the best is reported)")
    ap.add_argument("--meta", type=Path, help="reuse a checkpoint folder (from --keep) instead "
                    "of synthesizing one")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "META", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, meta, out = args.child
        fn = child_convert if kind == "convert" else child_floor
        print(json.dumps(fn(Path(meta), Path(out))))
        return

    if args.workdir is not None:  # a folder that does not exist yet is made, not an error
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        meta = args.meta or root / "meta"
        t0 = time.perf_counter()
        if not args.meta:
            synthesize(meta)
        # the synthesizing process is not measured; it only prepares the input
        ckpt = sorted(meta.glob("consolidated.*.pth"))
        ckpt_bytes = sum(f.stat().st_size for f in ckpt)
        print(f"{'reused' if args.meta else 'synthesized'} {ckpt_bytes / 1e9:.3f} GB Meta checkpoint in "
              f"{time.perf_counter() - t0:.1f} s ({meta})", flush=True)

        runs = {"convert": [], "floor": []}
        for i in range(args.repeat):
            for kind in ("floor", "convert"):
                out = root / f"{kind}{i}"
                if kind == "convert":
                    out.mkdir()
                else:
                    out = out.with_suffix(".bin")
                if not args.warm:
                    _evict(ckpt)
                r = _run_child(kind, meta, out)
                runs[kind].append(r)
                print(f"  {kind:7s} run {i}: {r['seconds']:.2f} s, peak RSS "
                      f"{r['peak_rss'] / 1e6:.0f} MB (after imports {r['baseline_rss'] / 1e6:.0f} MB)",
                      flush=True)
                shutil.rmtree(out) if out.is_dir() else out.unlink()
        conv = min(runs["convert"], key=lambda r: r["seconds"])
        floor = min(runs["floor"], key=lambda r: r["seconds"])
        delta = conv["peak_rss"] - conv["baseline_rss"]
        print(json.dumps({"checkpoint_bytes": ckpt_bytes, "convert": conv, "floor": floor}, indent=1))
        print(f"\ncheckpoint          {ckpt_bytes / 1e9:.3f} GB ({'warm' if args.warm else 'cold'} "
              "page cache for the input)")
        print(f"convert             {conv['seconds']:.2f} s  (child total incl. imports "
              f"{conv['process_seconds']:.1f} s)")
        print(f"floor (read+write)  {floor['seconds']:.2f} s")
        ratio = conv["seconds"] / floor["seconds"]
        print(f"time ratio          {ratio:.2f}x floor   (target <= {TIME_TARGET}x: "
              f"{'OK' if ratio <= TIME_TARGET else 'MISSED'})")
        for label, v in (("peak RSS (VmHWM)", conv["peak_rss"]),
                         ("peak RSS - imports", delta),
                         ("peak RssAnon", conv["peak_anon"]),
                         ("peak RssFile", conv["peak_file"])):
            r = v / ckpt_bytes
            print(f"{label:19s} {v / 1e6:7.0f} MB = {r:.3f}x checkpoint   (target <= {RSS_TARGET}x: "
                  f"{'OK' if r <= RSS_TARGET else 'MISSED'})")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
