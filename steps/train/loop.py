"""The training loop: one small, explicit loop (nanoGPT style) instead of HF Trainer, so that
resume is exact (steps/train/checkpoint.py says why HF Trainer's is not for this recipe).

bench/train_throughput.py compares this loop with a plain transformers + peft loop (README:
1.18x its tokens/s on an H100).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

from steps.train.checkpoint import Checkpointer, TrainState, fresh_acc
from steps.train.config import TrainConfig, check_fsdp_precision
from steps.train.model import gather_trainable
from steps.train.parallel import Dist, amp_dtype, parallelize, whole

log = logging.getLogger(__name__)


def count_steps(cfg: TrainConfig, n_train: int, world: int) -> tuple[int, int]:
    """(optimizer steps of the run, micro-batches per epoch), or a clear error when the data
    is too small for one optimizer step."""
    micro_per_epoch = n_train // (cfg.per_device_batch_size * world)
    steps_per_epoch = micro_per_epoch // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training set has {n_train} examples, fewer than one optimizer step "
            f"needs (per_device_batch_size {cfg.per_device_batch_size} x {world} "
            f"processes x gradient_accumulation_steps {cfg.gradient_accumulation_steps}); "
            "add data or lower those settings")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return total, micro_per_epoch


def build_optimizer(model, cfg: TrainConfig, device, total: int):
    """AdamW over the trainable tensors (no weight decay on 1-D ones), the warmup schedule, and
    the grad scaler (active for fp16 only)."""
    import torch
    from transformers import (get_constant_schedule_with_warmup,
                              get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda"      # one kernel for all params: measurably faster
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  fused=fused)
    warmup = math.ceil(cfg.warmup_ratio * total)
    make = {"cosine": get_cosine_schedule_with_warmup,
            "linear": get_linear_schedule_with_warmup}.get(cfg.lr_scheduler)
    scheduler = (make(optimizer, warmup, total) if make else
                 get_constant_schedule_with_warmup(optimizer, warmup))
    return optimizer, scheduler


class Trainer:
    """The loop for one peft model: sample order, train_step, logging, evaluate, and train(),
    which sequences them with the Checkpointer's resume and saves.

    `train_ds` / `eval_ds` are map-style datasets (datasets.Dataset) of token lists; `collate`
    turns a list of rows into a dict of tensors with input_ids, labels (and attention_mask).
    Sample order: epoch e is a permutation seeded by (seed, e); global micro-batch g takes the
    next per_device_batch_size*world samples and rank r its r-th slice, so the data position is
    just the step and a run on 2 ranks x batch 1 sees the same samples as 1 rank x batch 2."""

    def __init__(self, model, cfg: TrainConfig, train_ds, eval_ds, collate: Callable, *,
                 dist: Dist, out_dir: Path, ckpt_dir: Path | None, fingerprint: str,
                 on_metrics: Callable | None = None, save_fn: Callable | None = None,
                 precision: str = "fp32"):
        import torch

        self.fsdp = cfg.launcher.strategy == "fsdp"
        check_fsdp_precision(cfg.launcher.strategy, cfg.precision, precision)
        self.cfg, self.dist, self.collate = cfg, dist, collate
        self.train_ds, self.eval_ds = train_ds, eval_ds
        self.out_dir, self.ckpt_dir = Path(out_dir), (Path(ckpt_dir) if ckpt_dir else None)
        self.on_metrics, self.save_fn = on_metrics, save_fn
        self.model = model                       # the peft model (saved, checkpointed)
        self.amp_dtype = amp_dtype(precision)
        # what forward() is called on (DDP/compiled)
        self.net, embed_cast = parallelize(model, dist, fsdp=self.fsdp,
                                           compute_dtype=self.amp_dtype, compile=cfg.torch_compile)
        if embed_cast is not None:    # bench/train_throughput removes it to show why it is there
            self._embed_cast = embed_cast
        self.global_batch = cfg.per_device_batch_size * dist.world
        self.total_steps, self.micro_per_epoch = count_steps(cfg, len(train_ds), dist.world)
        self.optimizer, self.scheduler = build_optimizer(model, cfg, dist.device, self.total_steps)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")
        self.state = TrainState()
        self.checkpointer = Checkpointer(
            self.ckpt_dir, dist, model=model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, strategy=cfg.launcher.strategy, fingerprint=fingerprint,
            keep=cfg.save_total_limit, log_file=self.out_dir / "trainer_log.jsonl")
        self.rank_tokens = 0.0
        self.last_eval: dict = {}

    @property
    def records(self) -> list[dict]:
        """Everything written to trainer_log.jsonl (rank 0)."""
        return self.state.records

    # --- data order
    def _micro_indices(self, g: int) -> list[int]:
        import torch
        epoch, m = divmod(g, self.micro_per_epoch)
        perm = torch.randperm(len(self.train_ds),
                              generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        start = m * self.global_batch + self.dist.rank * self.cfg.per_device_batch_size
        return perm[start:start + self.cfg.per_device_batch_size].tolist()

    def _batch(self, rows: list[dict]) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in self.collate(rows).items()}

    def _autocast(self):
        import torch
        if self.amp_dtype is None or self.fsdp:     # FSDP casts through its policy
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    # --- logging
    def _emit(self, record: dict, step: int) -> None:
        if not self.dist.main:
            return
        record = {"step": step, **record}
        self.state.records.append(record)
        with open(self.out_dir / "trainer_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        # one console line per logging step: where training is and whether it learns
        shown = [f"{k} {record[k]:.4g}" for k in ("loss", "eval_loss", "lr", "grad_norm")
                 if isinstance(record.get(k), float)]
        if "tokens_per_s" in record:
            shown.append(f"{record['tokens_per_s']:,.0f} tokens/s")
        log.info("step %d/%d  %s", step, self.total_steps, "  ".join(shown))
        if self.on_metrics is not None:
            self.on_metrics({k: v for k, v in record.items() if k != "step"}, step)

    def gather_trainable(self) -> dict | None:
        """trainable_state on rank 0 (None elsewhere); every rank must call it (FSDP gathers)."""
        return gather_trainable(self.model, self.dist, self.fsdp)

    def resume(self) -> None:
        ckpt = self.checkpointer.restore(self.state)
        if ckpt is not None:
            log.info("resumed from %s (step %d of %d)", ckpt, self.state.step, self.total_steps)

    # --- one optimizer step
    def train_step(self, params: list) -> float:
        """Forward/backward over gradient_accumulation_steps micro-batches, clip, step; the
        learning rate the step used."""
        import torch
        accum, acc = self.cfg.gradient_accumulation_steps, self.state.acc
        step_loss = torch.zeros((), device=self.dist.device)   # no GPU sync per micro-batch
        for a in range(accum):
            cpu = self.collate([self.train_ds[i] for i in
                                self._micro_indices(self.state.step * accum + a)])
            n_tok = float(cpu["attention_mask"].sum()) if "attention_mask" in cpu \
                else float(cpu["input_ids"].numel())
            batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in cpu.items()}
            # DDP: all-reduce once per optimizer step. FSDP reduce-scatters every micro-batch
            # (what keeps its gradient memory sharded).
            sync = contextlib.nullcontext() if (self.dist.world == 1 or self.fsdp or
                                                a == accum - 1) else self.net.no_sync()
            with sync, self._autocast():
                loss = self.net(**batch).loss
            self.scaler.scale(loss / accum).backward()
            step_loss += loss.detach() / accum
            acc["tokens"] += n_tok
            self.rank_tokens += n_tok
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        acc["n"] += 1
        acc["loss"] += float(step_loss)       # one sync per optimizer step
        acc["grad_norm"] += float(whole(norm))
        return lr

    def log_step(self, lr: float, since: float) -> None:
        """The training record of the steps since the last one (loss averaged over ranks)."""
        acc = self.state.acc
        loss_sum, tokens = self.dist.sum([acc["loss"], acc["tokens"]])
        dt = time.perf_counter() - since
        self._emit({"loss": loss_sum / self.dist.world / acc["n"], "lr": lr,
                    "grad_norm": acc["grad_norm"] / acc["n"],
                    "tokens_per_s": tokens / max(dt, 1e-9), "epoch": self.state.step *
                        self.cfg.gradient_accumulation_steps / self.micro_per_epoch},
                   self.state.step)
        self.state.acc = fresh_acc()

    # --- eval
    def evaluate(self) -> dict:
        import torch
        if self.eval_ds is None or len(self.eval_ds) == 0:
            return {}
        self.model.eval()
        loss_sum, n_tok = 0.0, 0.0
        b = self.cfg.per_device_batch_size
        mine = list(range(self.dist.rank, len(self.eval_ds), self.dist.world))
        batches = [mine[i:i + b] for i in range(0, len(mine), b)]
        if self.fsdp:
            # every rank must run as many forwards as the others (each one all-gathers): a rank
            # with fewer examples runs the first example again and does not count it
            most = math.ceil(math.ceil(len(self.eval_ds) / self.dist.world) / b)
            batches += [None] * (most - len(batches))
        with torch.no_grad(), self._autocast():
            for rows in batches:
                batch = self._batch([self.eval_ds[j] for j in (rows or [0])])
                n = float((batch["labels"][:, 1:] != -100).sum()) if rows else 0.0
                if n == 0 and not self.fsdp:
                    continue
                loss = float(self.model(**batch).loss)
                if n:
                    loss_sum += loss * n
                    n_tok += n
        loss_sum, n_tok = self.dist.sum([loss_sum, n_tok])
        self.model.train()
        loss = loss_sum / max(n_tok, 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def evaluate_and_keep_best(self) -> None:
        """Evaluate, log it, and save the adapter to best/ when the eval loss is the lowest yet."""
        self.last_eval = self.evaluate()
        if self.last_eval:
            self._emit(dict(self.last_eval), self.state.step)
            if self.last_eval["eval_loss"] < self.state.best_eval:
                self.state.best_eval = self.last_eval["eval_loss"]
                if self.save_fn is not None:
                    self.save_fn(self.best_dir, self.gather_trainable())

    # --- the run
    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        self.resume()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        since = time.perf_counter()
        while state.step < self.total_steps:
            lr = self.train_step(params)
            last = state.step == self.total_steps
            if state.step % cfg.log_every == 0 or last:
                self.log_step(lr, since)
                since = time.perf_counter()
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
                self.evaluate_and_keep_best()
                since = time.perf_counter()
            if cfg.save_every and state.step % cfg.save_every == 0 and not last:
                self.checkpointer.save(state)
                since = time.perf_counter()
        return self.summary(params)

    def summary(self, params: list) -> dict:
        """What the run returns: steps, losses, parameter counts, each rank's tokens, last eval."""
        tokens_per_rank = self.dist.gather(self.rank_tokens)
        train_losses = [r["loss"] for r in self.state.records if "loss" in r]
        summary = {"steps": self.total_steps, "resumed_from_step": self.state.resumed_from,
                   "world_size": self.dist.world,
                   "train_loss": train_losses[-1] if train_losses else float("nan"),
                   "first_train_loss": train_losses[0] if train_losses else float("nan"),
                   "trainable_params": sum(p.numel() for p in params),
                   "total_params": sum(p.numel() for p in self.model.parameters())}
        for r, t in enumerate(tokens_per_rank):
            summary[f"tokens_rank{r}"] = t
        if self.last_eval:
            summary.update(self.last_eval)
            summary["best_eval_loss"] = self.state.best_eval
        return summary

    @property
    def best_dir(self) -> Path:
        """Where the lowest-eval-loss adapter is kept while training: in the resume dir, so a
        resumed run still has it; the stage copies it to out_dir/best at the end."""
        return (self.ckpt_dir or self.out_dir / ".work") / "best"
