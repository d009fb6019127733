"""LoRA training throughput: a plain transformers + peft loop (the reference) vs llamaflow's
training path (steps.train: add_lora + Trainer), on one model, in one run.

GPU (the target): a LLaMA-7B-shaped model (hidden 4096, 32 layers, 32 heads, FFN 11008), random
weights, vocab 49953 (Chinese-LLaMA), bf16, batch 8 x 512, the recipe's LoRA (r 8, alpha 32,
dropout 0.05 on the 7 projections, embed_tokens + lm_head in modules_to_save). CPU fallback with
`--tiny`: a 4-layer 256-wide model, batch 4 x 256 (runs anywhere; numbers only compare the two
paths on the same machine).

Variants (`--variants`, default reference,ours):
    reference           the plain loop below: bf16 everywhere (trainable copies too), AdamW
    ours                steps.train.loop.Trainer as the stages run it (single process)
    ours-fp32-residual  ours without the cast of the embedding output to the compute dtype
                        (autocast then carries an fp32 residual stream): why that cast exists
    ours-compile        ours with torch_compile=true
    ours-fsdp           ours under torchrun (1 process) with launcher.strategy=fsdp (FSDP2)
    ours-chunked-ce     ours with loss_chunk_size=4096 (no batch x seq x vocab logits)

Each variant runs in its own subprocess (clean peak memory: torch.cuda.max_memory_allocated on
GPU, VmHWM on CPU), under a time limit; a failed or timed-out variant is reported, not fatal.
Tokens/s are measured over the steps after `--warmup` steps. Ratios are against `reference`,
measured in the same run on the same machine.

    python bench/train_throughput.py                 # GPU, 7B shape
    python bench/train_throughput.py --gradient-checkpointing
    python bench/train_throughput.py --variants reference,ours,ours-fsdp --json out.json
    python bench/train_throughput.py --tiny          # CPU
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


VARIANTS = ("reference", "ours", "ours-fp32-residual", "ours-compile", "ours-fsdp",
            "ours-chunked-ce")


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
    """steps.train: fp32 trainable tensors under bf16 autocast (the embedding output cast to
    bf16), fused AdamW on CUDA, SDPA, packed blocks (no padding), optionally torch.compile or
    FSDP2; the same loop the stages run."""
    import tempfile

    import torch

    from steps import pretrain
    from steps.train.loop import Trainer
    from steps.train.model import add_lora
    from steps.train.parallel import Dist
    fsdp = args.variant == "ours-fsdp"
    dist = Dist("nccl" if device.type == "cuda" else "gloo", group_always=fsdp)
    model = build_model(args, device)
    cfg = pretrain.Config(per_device_batch_size=args.batch, gradient_accumulation_steps=1,
                          max_steps=args.warmup + args.steps, log_every=args.warmup,
                          eval_every=0, save_every=0, warmup_ratio=0.0, block_size=args.seq,
                          gradient_checkpointing=args.gradient_checkpointing,
                          torch_compile=args.variant == "ours-compile",
                          launcher={"strategy": "fsdp" if fsdp else "ddp"},
                          precision="fp32" if device.type == "cpu" else "bf16")
    model = add_lora(model, cfg.lora, gradient_checkpointing=args.gradient_checkpointing)
    if args.variant == "ours-chunked-ce":
        from steps.train.chunked_loss import use_chunked_loss

        use_chunked_loss(model, 4096)
    g = torch.Generator().manual_seed(0)
    n = (args.warmup + args.steps) * args.batch
    # a map-style dataset is all the Trainer needs (the stages pass datasets.Dataset)
    ds = [{"input_ids": row} for row in
          torch.randint(3, 49953, (n, args.seq), generator=g).tolist()]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, cfg, ds, None, pretrain.collate, dist=dist, out_dir=Path(out),
                          ckpt_dir=None, fingerprint="bench", precision=cfg.precision)
        if args.variant == "ours-fp32-residual" and hasattr(trainer, "_embed_cast"):
            trainer._embed_cast.remove()
        if device.type == "cuda":
            torch.cuda.synchronize()
        summary = trainer.train()
        records = [r for r in trainer.records if "loss" in r]
    dist.close()
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
    import peft
    import transformers
    result["versions"] = f"torch {torch.__version__}, transformers {transformers.__version__}, " \
                         f"peft {peft.__version__}"
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
    p.add_argument("--variants", default="reference,ours",
                   help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--timeout", type=float, default=600, help="seconds per variant")
    p.add_argument("--total-timeout", type=float, default=float("inf"),
                   help="seconds for all variants; later ones get what is left")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
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
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "reference" not in variants:
        p.error(f"--variants: unknown {unknown}" if unknown else "--variants must include reference")
    results: dict[str, dict] = {}
    summary = {"shape": "tiny" if args.tiny else "llama-7b", "batch": args.batch, "seq": args.seq,
               "steps": args.steps, "warmup": args.warmup,
               "gradient_checkpointing": args.gradient_checkpointing, "variants": results}
    started = time.perf_counter()
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if variant == "ours-fsdp":      # FSDP needs a process group: one torchrun rank
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
        cmd += ["--tiny"] * args.tiny + ["--gradient-checkpointing"] * args.gradient_checkpointing
        t0 = time.perf_counter()
        limit = min(args.timeout, args.total_timeout - (t0 - started))
        if limit < 20:
            results[variant] = {"error": "skipped: --total-timeout spent"}
            print(f"{variant}: skipped (--total-timeout spent)", flush=True)
            continue
        # own session: on a timeout the whole group goes (torchrun's rank too), freeing the GPU
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=limit)
            line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                results[variant] = {"error": (stdout + stderr)[-2500:]}
            else:
                results[variant] = json.loads(line[0][len("RESULT "):])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            results[variant] = {"error": f"timed out after {limit:.0f} s"}
        results[variant]["wall_s"] = round(time.perf_counter() - t0, 1)
        ref = results.get("reference", {}).get("tokens_per_s")
        if ref and "tokens_per_s" in results[variant]:
            results[variant]["ratio_to_reference"] = results[variant]["tokens_per_s"] / ref
        summary["device"] = results[variant].get("device", summary.get("device"))
        print(f"{variant}: " + json.dumps(results[variant])[:3000], flush=True)
        if args.json:       # after every variant: a later crash keeps what was measured
            args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: ({m: v.get(m) for m in ("tokens_per_s", "ratio_to_reference",
                                                 "peak_memory_gib", "loss")}
                          if "error" not in v else "failed") for k, v in results.items()},
                     indent=2))
    if any("error" in v for v in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
