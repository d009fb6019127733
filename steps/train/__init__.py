"""The LoRA training path shared by the pretrain and sft stages, as components:

    config      TrainConfig (+ LoRA and launcher settings), the settings that change no result
    data        the train/eval split, the tokenized-data cache (input files: steps/files.py)
    model       base + adapters, a fresh LoRA, the trainable tensors, the adapter dir
    parallel    Dist (this rank), precision, the model wrapped for one process, DDP or FSDP2
    checkpoint  TrainState and the Checkpointer (exact resume)
    loop        the Trainer: train_step, evaluate, train
    launch      in this process, or under torchrun (execute, worker_main)

run_training composes them for one process (called in-process for nproc 1, per rank under
torchrun otherwise). Layout of a training stage's out_dir:
    adapter_config.json, adapter_model.safetensors   the last adapter (PeftModel.from_pretrained)
    tokenizer files, training_info.json              its vocabulary and the base it belongs to
    best/                                            the adapter with the lowest eval loss
    trainer_log.jsonl                                one JSON record per logging/eval step
    training_summary.json                            what run() returns
Checkpoints go to `resume_dir` (a stable per-cache-key scratch dir the caller passes) and the
stage resumes from the newest complete one when it is rerun into the same resume_dir.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Callable

from steps.digests import adapter_digest, base_digest
from steps.tokenizer import tokenizer_source
from steps.train.chunked_loss import use_chunked_loss
from steps.train.config import TrainConfig, result_settings
from steps.train.data import load_splits
from steps.train.loop import Trainer
from steps.train.model import add_lora, load_base, save_adapter
from steps.train.parallel import Dist, resolve_precision

log = logging.getLogger(__name__)


def run_training(stage: str, cfg: TrainConfig, out_dir: Path, *, model_dir: Path,
                 adapters: list[Path], dataset_dir: Path, collate: Callable,
                 prepare_model: Callable | None = None, resume_dir: Path | None,
                 on_metrics: Callable | None, extra_info: dict) -> dict:
    """One process's share of a training stage: load base (+adapters), add LoRA, train, save
    the adapter (rank 0).

    `dataset_dir` holds `train/` and optionally `eval/` saved with datasets' save_to_disk (the
    parent process prepares it once, so ranks never tokenize). `prepare_model(model, tokenizer)`
    may change both before LoRA is added (SFT adds [PAD] and resizes) and returns them."""
    out_dir = Path(out_dir)
    dist = Dist(cfg.launcher.backend, group_always=cfg.launcher.strategy == "fsdp")
    try:
        precision = resolve_precision(cfg.precision, dist.device)
        model, tokenizer = _model(cfg, dist, precision, model_dir, adapters, prepare_model)
        train_ds, eval_ds = load_splits(dataset_dir)
        log.info("rank %d/%d: %d train / %d eval examples on %s (%s)", dist.rank, dist.world,
                 len(train_ds), len(eval_ds) if eval_ds is not None else 0, dist.device, precision)
        info = _provenance(stage, cfg, model_dir, adapters, model, tokenizer, extra_info)
        ckpt_dir = Path(resume_dir) if resume_dir else None
        if ckpt_dir is not None and dist.main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        src_tok = tokenizer_source(model_dir, adapters)

        def save_fn(dest: Path, state: dict) -> None:
            """Called on every rank (state is gathered collectively); rank 0 writes."""
            if dist.main:
                shutil.rmtree(dest, ignore_errors=True)
                save_adapter(model, tokenizer, dest, info, src_tok, state)

        trainer = Trainer(model, cfg, train_ds, eval_ds, collate, dist=dist, out_dir=out_dir,
                          ckpt_dir=ckpt_dir, fingerprint=_fingerprint(cfg, info, extra_info),
                          on_metrics=on_metrics, save_fn=save_fn, precision=precision)
        summary = trainer.train()
        state = trainer.gather_trainable()       # collective under FSDP
        if dist.main:
            info["steps"] = trainer.total_steps
            save_adapter(model, tokenizer, out_dir, info, src_tok, state)
            _finish(trainer, out_dir, summary, {"vocab_size": len(tokenizer),
                                                "precision": precision})
        dist.barrier()
        return summary
    finally:
        dist.close()


def _model(cfg: TrainConfig, dist: Dist, precision: str, model_dir: Path, adapters: list[Path],
           prepare_model: Callable | None):
    """(peft model, tokenizer): the base with the adapters merged in, prepared, with a fresh LoRA.
    The seeds make the same [PAD] row (SFT's resize) and LoRA init on every rank, then give each
    rank its own dropout stream."""
    import torch

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed + dist.rank)
    model, tokenizer = load_base(model_dir, adapters, precision=precision,
                                 attn_implementation=cfg.attn_implementation)
    if prepare_model is not None:
        model, tokenizer = prepare_model(model, tokenizer)
    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.loss_chunk_size:
        use_chunked_loss(model, cfg.loss_chunk_size)
    if cfg.launcher.strategy == "ddp":
        model.to(dist.device)        # FSDP moves each rank's shards there as it shards
    torch.manual_seed(cfg.seed + dist.rank)
    return model, tokenizer


def _provenance(stage: str, cfg: TrainConfig, model_dir: Path, adapters: list[Path], model,
                tokenizer, extra_info: dict) -> dict:
    """training_info.json: the base and the adapters folded into it by content only: a path (a
    workspace, a temp dir) would give the same training other bytes, another digest, and
    retrain SFT after every pre-training recompute."""
    return {"stage": stage, "base_digest": base_digest(model_dir),
            "adapters_applied": [{"digest": adapter_digest(a)} for a in adapters],
            "vocab_size": len(tokenizer),
            "embed_rows": int(model.get_input_embeddings().weight.shape[0]),
            "lora": cfg.lora.model_dump(), **extra_info}


def _fingerprint(cfg: TrainConfig, info: dict, extra_info: dict) -> str:
    """What a checkpoint must have been written by to be resumed: every setting that changes the
    result, the provenance and the data."""
    return hashlib.sha256(json.dumps(
        {"cfg": result_settings(cfg), "info": info, "data": extra_info.get("data_digest")},
        sort_keys=True, default=str).encode()).hexdigest()


def _finish(trainer: Trainer, out_dir: Path, summary: dict, extra: dict) -> None:
    """Rank 0, after the adapter is saved: best/ into place, the work dir gone, the summary."""
    best = trainer.best_dir
    if best.is_dir():
        shutil.copytree(best, out_dir / "best")
    shutil.rmtree(out_dir / ".work", ignore_errors=True)
    summary.update(extra)
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
