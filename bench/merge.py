"""Benchmark: our streaming merge vs peft's merge_and_unload + save_pretrained, on one ~1.3B model.

    .venv/bin/python bench/merge.py [--workdir DIR] [--keep]

Synthesizes (no download) a LLaMA-shaped HF model: dim 2048, 24 layers, 16 heads, FFN 5632,
vocab 32000, bf16 (~2.7 GB), and a LoRA adapter on all 7 projections (r=8, alpha=32) with
modules_to_save embed_tokens + lm_head in fp32 (what the training stages save, ~0.55 GB). Each
merge runs in its own child process, which reports its wall time and peak RSS (VmHWM);
the parent then compares the two outputs tensor by tensor and prints the ratios. Disk: ~9 GB
under --workdir, removed at the end unless --keep. Timings are noisy on shared cores.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM, LAYERS, HEADS, FFN, VOCAB = 2048, 24, 16, 5632, 32000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 32


def synthesize(root: Path) -> tuple[Path, Path]:
    """Base model (bf16 safetensors, 2GB shards) and a peft-format adapter, one tensor at a time."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from steps.merge import StreamingSafetensorsWriter
    from steps.tokenizer import save_hf_tokenizer
    from tests.tiny import train_tiny_tokenizer

    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(base)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (DIM,),
                       p + "self_attn.q_proj.weight": (DIM, DIM),
                       p + "self_attn.k_proj.weight": (DIM, DIM),
                       p + "self_attn.v_proj.weight": (DIM, DIM),
                       p + "self_attn.o_proj.weight": (DIM, DIM),
                       p + "post_attention_layernorm.weight": (DIM,),
                       p + "mlp.gate_proj.weight": (FFN, DIM),
                       p + "mlp.up_proj.weight": (FFN, DIM),
                       p + "mlp.down_proj.weight": (DIM, FFN)})
    shapes.update({"model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM)})
    g = torch.Generator().manual_seed(0)
    writer = StreamingSafetensorsWriter(base, [(n, s, "bfloat16") for n, s in shapes.items()],
                                        2 * 10**9)
    for n, s in shapes.items():
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
        writer.write(n, t.bfloat16())
    files = writer.close()
    sp = train_tiny_tokenizer(root / "sp" / "tokenizer.model")
    save_hf_tokenizer(sp, base)

    LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
               modules_to_save=["embed_tokens", "lm_head"],
               base_model_name_or_path=str(base)).save_pretrained(adapter)
    state = {}
    for n, s in shapes.items():
        module = n[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in TARGETS:
            state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(R, s[1], generator=g) / math.sqrt(s[1])
            state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(s[0], R, generator=g) * 0.01
        elif module in ("model.embed_tokens", "lm_head"):
            state[f"base_model.model.{n}"] = torch.randn(s, generator=g) * 0.02
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter


def child(which: str, base: Path, adapter: Path, out: Path) -> None:
    t0 = time.time()
    if which == "ours":
        from steps.merge import merge_adapters

        merge_adapters(base, [adapter], out)
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out, max_shard_size="2GB")
    print(json.dumps({"which": which, "wall_s": time.time() - t0, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak RSS. (ru_maxrss is no good here: Linux carries the parent's
    high-water mark across fork + exec, so every child would report at least the parent's.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Max |a-b| over all tensors and the share of elements that differ (bf16 rounding)."""
    from safetensors import safe_open

    def where(d):
        m = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                m.update({k: f for k in st.keys()})
        return m

    wa, wb = where(a_dir), where(b_dir)
    assert wa.keys() == wb.keys(), set(wa) ^ set(wb)
    max_diff, differ, total = 0.0, 0, 0
    for k in wa:
        with safe_open(str(wa[k]), "pt") as fa, safe_open(str(wb[k]), "pt") as fb:
            x, y = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        assert x.shape == y.shape, k
        max_diff = max(max_diff, (x - y).abs().max().item())
        differ += (x != y).sum().item()
        total += x.numel()
    return {"max_abs_diff": max_diff, "elements_differing": differ / total}


def main() -> None:
    global LAYERS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for the bench's own temp dir (made when missing; default: /tmp)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer for a quick smoke run")
    ap.add_argument("--child", nargs=4, metavar=("WHICH", "BASE", "ADAPTER", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, base, adapter, out = args.child
        child(which, Path(base), Path(adapter), Path(out))
        return

    LAYERS = args.layers
    # Our own temp dir inside --workdir: the cleanup below removes it, never the user's folder.
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="llamaflow-bench-merge-", dir=args.workdir))
    try:
        t0 = time.time()
        base, adapter = synthesize(root)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"synthesized base {size / 1e9:.2f} GB + adapter "
              f"{(adapter / 'adapter_model.safetensors').stat().st_size / 1e9:.2f} GB "
              f"in {time.time() - t0:.0f} s")
        results = {}
        for which in ("ours", "peft"):
            proc = subprocess.run([sys.executable, __file__, "--child", which, str(base),
                                   str(adapter), str(root / which)],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{which:5s} wall {results[which]['wall_s']:7.1f} s   "
                  f"peak RSS {results[which]['peak_rss_mb']:8.0f} MB")
        ours, peft = results["ours"], results["peft"]
        print(f"ratio ours/peft: wall {ours['wall_s'] / peft['wall_s']:.2f}x, "
              f"peak RSS {ours['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x")
        diff = compare(root / "ours", root / "peft")
        print(f"outputs: max |ours - peft| = {diff['max_abs_diff']:.3g}, "
              f"{100 * diff['elements_differing']:.4f}% of elements differ")
        print(json.dumps({"model_bytes": size, **{f"{k}_{m}": v[m] for k, v in results.items()
                                                  for m in ("wall_s", "peak_rss_mb")}, **diff}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
