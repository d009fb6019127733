"""Benchmark (not a test): our GGUF export + llama.cpp's quantizer vs gguf's numpy quantizers.

On one synthetic ~1.36B LLaMA in HF format (dim 2048, 24 layers, 16 heads, FFN 5632, vocab 32000,
bf16 safetensors in 4 shards, the real LLaMA tokenizer when ../shared/data is there):
  A. export_gguf(hf, f16) then quantize_gguf(f16, q8_0 | q4_0 | q4_k_m)   (llama.cpp path)
  B. export_gguf(hf, q8_0 | q4_0) straight from HF with gguf.quants          (numpy path)
Each job runs in its own child process; we report wall time, the child's peak RSS and the output
size, plus the ratios. Weights are random N(0, 0.02): speed and memory do not depend on them.

    .venv/bin/python bench/quantize.py [--workdir /tmp/llamaflow-bench-quantize] [--keep]

Needs ~7 GB of free disk (the HF model, the f16 GGUF and one output at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))

DIM, LAYERS, HEADS, FFN, VOCAB = 2048, 24, 16, 5632, 32000


def make_model(out: Path) -> Path:
    """Write the HF model directory tensor by tensor (shards of 6 layers) so that generating it
    never holds more than one shard in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, str(REPO))
    from steps.tokenizer import save_hf_tokenizer
    from tests.tiny import train_tiny_tokenizer

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sp = SHARED / "tokenizers" / "llama_tokenizer.model"
    if not sp.is_file():  # a small SentencePiece model; the exporter pads the token list to 32000
        sp = train_tiny_tokenizer(out / "sp" / "tokenizer.model")
    LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(out)
    save_hf_tokenizer(sp, out)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    groups = [range(i, min(i + 6, LAYERS)) for i in range(0, LAYERS, 6)]
    index = {}
    for n, layers in enumerate(groups):
        t = {}
        if n == 0:
            t["model.embed_tokens.weight"] = rnd(VOCAB, DIM)
        for i in layers:
            p = f"model.layers.{i}."
            t |= {p + "input_layernorm.weight": torch.ones(DIM, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(DIM, dtype=torch.bfloat16)}
            for k in ("q", "k", "v", "o"):
                t[p + f"self_attn.{k}_proj.weight"] = rnd(DIM, DIM)
            t |= {p + "mlp.gate_proj.weight": rnd(FFN, DIM), p + "mlp.up_proj.weight": rnd(FFN, DIM),
                  p + "mlp.down_proj.weight": rnd(DIM, FFN)}
        if n == len(groups) - 1:
            t |= {"model.norm.weight": torch.ones(DIM, dtype=torch.bfloat16),
                  "lm_head.weight": rnd(VOCAB, DIM)}
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(t, str(out / name), metadata={"format": "pt"})
        index |= dict.fromkeys(t, name)
        del t
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


# Peak RSS = the child's VmHWM: getrusage's ru_maxrss would also count the parent's memory at
# fork time (Linux keeps it across exec).
CHILD = """
import json, re, sys, time
sys.path.insert(0, {repo!r})
from steps import quantize as Q
t = time.perf_counter()
{call}
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_mb": int(hwm.group(1)) / 1024}}))
"""


def job(call: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), call=call)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}): {call}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llamaflow-bench-quantize"))
    ap.add_argument("--nthread", type=int, default=0, help="llama.cpp threads (0 = all cores)")
    ap.add_argument("--keep", action="store_true", help="keep the model and GGUF files")
    args = ap.parse_args()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)  # a folder that does not exist yet is made, not an error
    t = time.perf_counter()
    hf = make_model(w / "hf")
    print(f"model: {hf} ({sum(f.stat().st_size for f in hf.glob('*.safetensors')) / 1e9:.2f} GB bf16, "
          f"ready in {time.perf_counter() - t:.0f} s); {os.cpu_count()} cores (shared: timings are noisy)")
    rows = []

    def record(label, path, res, keep=False):
        res |= {"job": label, "size_gb": path.stat().st_size / 1e9}
        rows.append(res)
        print(f"  {label:34s} {res['seconds']:7.1f} s  peak RSS {res['peak_rss_mb']:7.0f} MB  "
              f"{res['size_gb']:.3f} GB", flush=True)
        if not keep and not args.keep:
            path.unlink()

    f16 = w / "m-f16.gguf"
    record("A export f16 (ours)", f16, job(f"Q.export_gguf({str(hf)!r}, {str(f16)!r}, 'f16')"), keep=True)
    for q in ("q8_0", "q4_0", "q4_k_m"):
        out = w / f"llama-{q}.gguf"
        record(f"A llama.cpp quantize f16 -> {q}", out,
               job(f"Q.quantize_gguf({str(f16)!r}, {str(out)!r}, {q!r}, {args.nthread})"))
    if not args.keep:
        f16.unlink()
    for q in ("q8_0", "q4_0"):
        out = w / f"numpy-{q}.gguf"
        record(f"B numpy export HF -> {q}", out, job(f"Q.export_gguf({str(hf)!r}, {str(out)!r}, {q!r})"))

    by = {r["job"]: r for r in rows}
    exp = by["A export f16 (ours)"]["seconds"]
    print("\nratios (numpy direct / llama.cpp path):")
    for q in ("q8_0", "q4_0"):
        a, b = by[f"A llama.cpp quantize f16 -> {q}"], by[f"B numpy export HF -> {q}"]
        print(f"  {q}: time {b['seconds'] / a['seconds']:.2f}x the quantize step alone, "
              f"{b['seconds'] / (a['seconds'] + exp):.2f}x export f16 + quantize; "
              f"peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x")
    (w / "bench_quantize.json").write_text(json.dumps(rows, indent=2))
    if not args.keep:
        shutil.rmtree(hf)


if __name__ == "__main__":
    main()
