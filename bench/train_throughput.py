"""LoRA training throughput: a plain transformers + peft loop (the reference) vs llamaflow's
training path (steps.training: add_lora + Trainer), on one model, in one run.

GPU (the target): a LLaMA-7B-shaped model (hidden 4096, 32 layers, 32 heads, FFN 11008), random
weights, vocab 49953 (Chinese-LLaMA), bf16, batch 8 x 512, the recipe's LoRA (r 8, alpha 32,
dropout 0.05 on the 7 projections, embed_tokens + lm_head in modules_to_save). CPU fallback with
`--tiny`: a 4-layer 256-wide model, batch 4 x 256 (runs anywhere; numbers only compare the two
paths on the same machine).

Each variant runs in its own subprocess (clean peak memory: torch.cuda.max_memory_allocated on
GPU, VmHWM on CPU). Tokens/s are measured over the steps after `--warmup` steps.

    python bench/train_throughput.py                 # GPU, 7B shape
    python bench/train_throughput.py --gradient-checkpointing
    python bench/train_throughput.py --tiny          # CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_config(tiny: bool):
    from transformers import LlamaConfig
    if tiny:
        return LlamaConfig(vocab_size=49953, hidden_size=256, intermediate_size=688,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=512, rms_norm_eps=1e-6)
    return LlamaConfig(vocab_size=49953, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=2048, rms_norm_eps=1e-6)


def build_model(args, device):
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM._from_config(model_config(args.tiny), dtype=dtype,
                                              attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def peak_memory(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run_reference(args, device) -> dict:
    """What a user writes with transformers + peft: bf16 model, LoRA, AdamW, a loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    model = build_model(args, device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["embed_tokens", "lm_head"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(3, 49953, (args.warmup + args.steps, args.batch, args.seq), generator=g)
    model.train()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = data[i].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": args.steps * args.batch * args.seq / dt, "loss": float(loss)}


def run_ours(args, device) -> dict:
    """steps.training: fp32 trainable tensors under bf16 autocast, fused AdamW on CUDA, SDPA,
    packed blocks (no padding), optional torch.compile; the same loop the stages run."""
    import tempfile

    import torch
    from datasets import Dataset

    from steps import pretrain
    from steps.training import Dist, Trainer, add_lora
    model = build_model(args, device)
    cfg = pretrain.Config(per_device_batch_size=args.batch, gradient_accumulation_steps=1,
                          max_steps=args.warmup + args.steps, log_every=args.warmup,
                          eval_every=0, save_every=0, warmup_ratio=0.0, block_size=args.seq,
                          gradient_checkpointing=args.gradient_checkpointing,
                          torch_compile=args.compile,
                          precision="fp32" if device.type == "cpu" else "bf16")
    model = add_lora(model, cfg.lora, gradient_checkpointing=args.gradient_checkpointing)
    g = torch.Generator().manual_seed(0)
    n = (args.warmup + args.steps) * args.batch
    ds = Dataset.from_dict({"input_ids": torch.randint(3, 49953, (n, args.seq), generator=g).tolist()})
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, cfg, ds, None, pretrain.collate, dist=Dist(), out_dir=Path(out),
                          ckpt_dir=None, fingerprint="bench", precision=cfg.precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        summary = trainer.train()
        records = [r for r in trainer.records if "loss" in r]
    # record 0 covers the warmup steps; the others the measured steps
    measured = records[1:]
    tps = sum(r["tokens_per_s"] for r in measured) / len(measured)
    return {"tokens_per_s": tps, "loss": summary["train_loss"]}


def child(args) -> None:
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = (run_reference if args.variant == "reference" else run_ours)(args, device)
    result.update({"peak_memory_gib": peak_memory(device), "device": (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}")})
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile our path")
    p.add_argument("--variant", choices=["reference", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    defaults = dict(batch=4, seq=256, steps=6, warmup=2) if args.tiny else \
        dict(batch=8, seq=512, steps=20, warmup=5)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.variant:
        return child(args)
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (ours logs once per warmup-many steps)")
    results = {}
    for variant in ("reference", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--tiny"] * args.tiny + ["--gradient-checkpointing"] * args.gradient_checkpointing
        cmd += ["--compile"] * args.compile
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[0][len("RESULT "):])
    ref, ours = results["reference"], results["ours"]
    summary = {"shape": "tiny" if args.tiny else "llama-7b", "batch": args.batch, "seq": args.seq,
               "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing,
               "compile": args.compile, **{f"{k}_{m}": v[m] for k, v in results.items()
                                            for m in ("tokens_per_s", "peak_memory_gib", "loss")},
               "device": ours["device"],
               "speedup_ours_over_reference": ours["tokens_per_s"] / ref["tokens_per_s"]}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
