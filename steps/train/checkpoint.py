"""Checkpoints that continue a training run bit-for-bit.

Chinese-LLaMA-Alpaca's scripts override `state_dict`, so HF Trainer checkpoints hold only the
LoRA weights and `resume_from_checkpoint` fails with "Missing key(s)". A checkpoint here holds
exactly what is needed to continue: the trainable tensors (LoRA A/B and the modules_to_save
copies), optimizer, scheduler, grad scaler, every rank's RNG states, the TrainState and the
training log so far. Under FSDP the tensors and optimizer state are gathered to rank 0 first.

    <ckpt_dir>/step-00000012/
        trainable.safetensors   state.pt   rng_rank<r>.pt   trainer_log.jsonl   COMPLETE
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from steps.train.model import gather_trainable

log = logging.getLogger(__name__)


def fresh_acc() -> dict:
    """Running sums since the last log record (loss, optimizer steps, tokens, grad norm)."""
    return {"loss": 0.0, "n": 0, "tokens": 0.0, "grad_norm": 0.0}


@dataclass
class TrainState:
    """Where a run stands, besides the tensors, optimizer and RNG that the Checkpointer keeps.
    `step` is also the data position: the sample order is a pure function of seed, epoch and
    step."""
    step: int = 0
    best_eval: float = math.inf
    acc: dict = field(default_factory=fresh_acc)
    records: list[dict] = field(default_factory=list)   # everything in trainer_log.jsonl (rank 0)
    resumed_from: int = 0


def rng_state() -> dict:
    import torch
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """save / restore / latest of one run's checkpoints in `ckpt_dir` (None: no checkpoints).

    `fingerprint` names the run (config, base, adapters, data); a checkpoint of another run, or
    of another process count or strategy, is refused rather than resumed. Every rank calls save
    and restore (they gather and scatter collectively); rank 0 writes."""

    def __init__(self, ckpt_dir: Path | None, dist, *, model, optimizer, scheduler, scaler,
                 strategy: str, fingerprint: str, keep: int, log_file: Path):
        self.dir = Path(ckpt_dir) if ckpt_dir else None
        self.dist, self.model, self.optimizer = dist, model, optimizer
        self.scheduler, self.scaler = scheduler, scaler
        self.strategy, self.fsdp = strategy, strategy == "fsdp"
        self.fingerprint, self.keep, self.log_file = fingerprint, keep, Path(log_file)

    def complete_checkpoints(self) -> list[Path]:
        """The checkpoints with their COMPLETE marker, oldest first ([] when the run keeps none)."""
        if self.dir is None:
            return []
        return sorted(p for p in self.dir.glob("step-*") if (p / "COMPLETE").is_file())

    def latest(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState) -> None:
        import torch

        if self.dir is None:
            return
        name = f"step-{state.step:08d}"
        tmp = self.dir / f".tmp-{name}"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        self.dist.barrier()
        trainable = gather_trainable(self.model, self.dist, self.fsdp)   # collective
        optimizer = self._optimizer_state()                              # collective
        if self.dist.main:
            self._write(tmp, name, state, trainable, optimizer)
        self.dist.barrier()

    def _write(self, tmp: Path, name: str, state: TrainState, trainable: dict,
               optimizer: dict) -> None:
        import torch
        from safetensors.torch import save_file

        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "step": state.step, "best_eval": state.best_eval, "acc": dict(state.acc),
                    "fingerprint": self.fingerprint, "world": self.dist.world,
                    "strategy": self.strategy},
                   tmp / "state.pt")
        with open(tmp / "trainer_log.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in state.records)
        (tmp / "COMPLETE").write_text(name)
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)        # atomic: a SIGKILL leaves either no checkpoint or a whole one
        for old in self.complete_checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s saved", final)

    def restore(self, state: TrainState) -> Path | None:
        """Load the newest complete checkpoint into the model, optimizer, scheduler, scaler,
        RNG and `state`, and put its training log back in place; the checkpoint, or None."""
        import torch

        ckpt = self.latest()
        if ckpt is None:
            return None
        saved = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        if saved["fingerprint"] != self.fingerprint or saved["world"] != self.dist.world or \
                saved.get("strategy", "ddp") != self.strategy:
            raise ValueError(
                f"{ckpt} was written by a run with another config, base model, data, process "
                "count or launcher strategy; resume_dir must be specific to one stage cache key: "
                "delete it or pass another resume_dir")
        self._load_trainable(ckpt)
        self._load_optimizer_state(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        state.step, state.best_eval, state.acc = saved["step"], saved["best_eval"], saved["acc"]
        set_rng_state(torch.load(ckpt / f"rng_rank{self.dist.rank}.pt", weights_only=False))
        if self.dist.main:
            lines = (ckpt / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
            state.records = [json.loads(line) for line in lines if line]
            with open(self.log_file, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines if line)
        state.resumed_from = state.step
        return ckpt

    def _load_trainable(self, ckpt: Path) -> None:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
        if missing:
            raise ValueError(f"{ckpt}: checkpoint lacks trainable tensors {missing[:3]}...")
        with torch.no_grad():
            for n, t in tensors.items():
                p = params[n]
                if hasattr(p, "device_mesh"):       # an FSDP shard: keep this rank's part
                    from torch.distributed.tensor import distribute_tensor
                    t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
                p.copy_(t)

    def _optimizer_state(self) -> dict:
        """The optimizer state, whole (FSDP: gathered to rank 0 by parameter name; collective)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)
        return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, state: dict) -> None:
        if not self.fsdp:
            return self.optimizer.load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
