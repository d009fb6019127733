"""The LoRA training path shared by the pretrain and sft stages.

One small, explicit loop (nanoGPT style) instead of HF Trainer, because the recipe's pain point P6
is resume: Chinese-LLaMA-Alpaca's scripts override `state_dict`, so Trainer checkpoints hold only
the LoRA weights and `resume_from_checkpoint` fails with "Missing key(s)". Here a checkpoint holds
exactly what is needed to continue bit-for-bit: the trainable tensors (LoRA A/B and the
modules_to_save copies), optimizer, scheduler, grad scaler, every rank's RNG states and the data
position (the global step: the sample order is a pure function of seed, epoch and step).

Processes (`launcher`): one, in the caller's process; or `nproc` torchrun ranks with DDP, or with
FSDP2 (`strategy: fsdp`, shard_model), where checkpoints and adapters are gathered to rank 0 first.
Precision: trainable tensors are fp32 masters; on a GPU the frozen base is bf16 and the compute
bf16 (autocast, or FSDP's mixed-precision policy). bench/train_throughput.py compares this loop
with a plain transformers + peft loop (README: 1.18x its tokens/s on an H100).

Layout of a training stage's out_dir:
    adapter_config.json, adapter_model.safetensors   the last adapter (PeftModel.from_pretrained)
    tokenizer files, training_info.json              vocabulary and base-model provenance (P2, P3)
    best/                                            the adapter with the lowest eval loss
    trainer_log.jsonl                                one JSON record per logging/eval step
    training_summary.json                            what run() returns
Checkpoints go to `resume_dir` (a stable per-cache-key scratch dir the caller passes) and the
stage resumes from the newest complete one when it is rerun into the same resume_dir.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Annotated, Callable, Iterable, Literal

import pydantic
from pydantic import ConfigDict, Field

from steps.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- configuration

class LoraSettings(pydantic.BaseModel):
    """peft LoRA settings; defaults = Chinese-LLaMA-Alpaca v1 run_pt.sh / run_sft.sh.
    Plus / LLaMA-2 preset: r=64, alpha=128 (conf/recipe/* override `lora.r`, `lora.alpha`)."""
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    modules_to_save: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head"])


class LauncherSettings(pydantic.BaseModel):
    """nproc > 1 runs the stage under torchrun as a subprocess in its own process group.
    strategy ddp: every rank holds the whole model, gradients are all-reduced (DDP).
    strategy fsdp: torch FSDP2 (`fully_shard` per decoder layer, then the root): parameters,
    gradients and optimizer state are sharded over the ranks, so a model too big for one GPU
    trains; always run under torchrun, also with nproc 1."""
    model_config = ConfigDict(extra="forbid")
    nproc: int = Field(1, ge=1)
    backend: Literal["gloo", "nccl"] = "gloo"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    timeout_s: float | None = None          # kill the process group after this many seconds


# The optimizer knobs whose defaults differ per stage (pretrain and sft re-declare them with
# their recipe's values): one type each, so a stage's default never drops the bounds.
LearningRate = Annotated[float, Field(gt=0)]
WeightDecay = Annotated[float, Field(ge=0)]
WarmupRatio = Annotated[float, Field(ge=0, le=1)]


class TrainConfig(pydantic.BaseModel):
    """Fields shared by the pretrain and sft Configs (the stage files set the recipe defaults)."""
    model_config = ConfigDict(extra="forbid")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: LearningRate = 2e-4
    weight_decay: WeightDecay = 0.01
    warmup_ratio: WarmupRatio = 0.05
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1                      # > 0: train exactly this many optimizer steps
    max_grad_norm: float = 1.0               # <= 0: no clipping
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=0)       # 0: evaluate only at the end
    save_every: int = Field(200, ge=0)       # checkpoint period (needs resume_dir to survive)
    save_total_limit: int = Field(3, ge=1)
    validation_split: float = Field(0.001, ge=0, lt=1)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: fp32 on CPU, bf16 on GPU
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    torch_compile: bool = False
    launcher: LauncherSettings = Field(default_factory=LauncherSettings)

    @pydantic.model_validator(mode="after")
    def _fsdp_needs_bf16_or_fp32(self):
        if self.launcher.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("launcher.strategy=fsdp trains in bf16 or fp32, not fp16: set "
                             "precision=bf16 (or auto on a bf16 GPU), or launcher=ddp_gpu")
        return self


# ----------------------------------------------------------------------------- small helpers

def sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(model_dir: Path) -> str:
    return sha256_files(sorted(Path(model_dir) / f for f in TOKENIZER_FILES
                               if (Path(model_dir) / f).is_file()))


def base_digest(model_dir: Path) -> str:
    """Digest of a base model's config.json and tokenizer files: what an adapter must be merged
    onto (pain point P3, "LoRA can only be merged with its corresponding base"). Weights are not
    hashed (too large); the merge stage compares this with the base it is given."""
    model_dir = Path(model_dir)
    return sha256_files([model_dir / "config.json"] + sorted(
        model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()))


def adapter_digest(adapter_dir: Path) -> str:
    adapter_dir = Path(adapter_dir)
    return sha256_files(sorted(adapter_dir.glob("adapter_model.*")) + [adapter_dir / "adapter_config.json"])


def with_data(config_cls, cfg, data):
    """The plain entry points' config: `cfg` (a Config or a dict) validated as config_cls, with
    `data` (one path or several; None keeps cfg.data) in place of cfg.data."""
    cfg = config_cls.model_validate(cfg if isinstance(cfg, dict) else cfg.model_dump())
    if data is None:
        return cfg
    return cfg.model_copy(update={"data": [str(d) for d in (
        [data] if isinstance(data, (str, Path)) else data)]})


def data_files(paths: Iterable[str | Path], suffixes: tuple[str, ...], field: str) -> list[Path]:
    """Expand files and directories (sorted, recursive) into data files; clear error when none."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise FileNotFoundError(f"{field}: directory {p} has no {'/'.join(suffixes)} files")
            out += found
        elif p.is_file():
            if p.suffix not in suffixes:
                raise ValueError(f"{field}: {p} has suffix {p.suffix!r}; supported: {suffixes}")
            out.append(p)
        else:
            raise FileNotFoundError(f"{field}: {p} does not exist")
    if not out:
        raise ValueError(f"{field} is empty: give at least one data file or directory")
    return out


class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    def __init__(self, backend: str = "gloo", *, group_always: bool = False):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # FSDP needs a process group even for one rank (torchrun provides the rendezvous)
        if (self.world > 1 or group_always) and not dist.is_initialized():
            dist.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        import torch
        import torch.distributed as dist
        if self.world == 1:
            return [value]
        t = torch.zeros(self.world, dtype=torch.float64,
                        device=self.device if self.device.type == "cuda" else "cpu")
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve_precision(precision: str, device) -> str:
    if precision == "auto":
        import torch
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    return precision


# ----------------------------------------------------------------------------- model

def load_base(model_dir: Path, adapters: Iterable[Path] = (), *, precision: str = "fp32",
              attn_implementation: str = "sdpa", device=None):
    """Load a HF causal LM (after the vocabulary checks), fold `adapters` into it in order
    (PeftModel.from_pretrained + merge_and_unload, resizing the embeddings first when an adapter
    carries a larger vocabulary, as SFT's [PAD] does) and return (model, tokenizer).
    The tokenizer is the last adapter's when it carries one, else the model dir's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.checks import check_adapter, check_model

    model_dir = Path(model_dir)
    sizes = check_model(model_dir)
    adapters = [Path(a) for a in adapters]
    for a in adapters:      # cheap header checks before any weight is read
        check_adapter(a, sizes.embed_rows)
    # Weights are loaded in the compute dtype; trainable tensors are made fp32 later (AMP).
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    if device is not None:
        model.to(device)
    tok_dir = model_dir
    for a in adapters:
        rows = check_adapter(a, model.get_input_embeddings().weight.shape[0])
        if rows > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
        if any((a / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            tok_dir = a
        log.info("merged adapter %s into %s in memory", a, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return model, tokenizer


def add_lora(model, lora: LoraSettings, *, gradient_checkpointing: bool = False):
    """Wrap `model` with a fresh peft LoRA; trainable tensors are fp32 whatever the base dtype."""
    import torch
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no enable_input_require_grads hack and works with DDP.
        # transformers >= 5.2x renamed the method (the old name warns); older 5.x has only it.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                        modules_to_save=list(lora.modules_to_save) or None)
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _whole(t):
    """A tensor as a whole: an FSDP DTensor shard is all-gathered (collective), others as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state(model) -> dict:
    """The trainable tensors (LoRA A/B, modules_to_save copies), whole and on the CPU. Under FSDP
    they are DTensor shards and are all-gathered: every rank must call this."""
    if hasattr(model, "reshard"):
        model.reshard()      # FSDP: the root stays unsharded after a forward without backward
    return {n: _whole(p).detach().to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def shard_model(model, amp_dtype) -> None:
    """FSDP2 in place: each decoder layer is one unit (transformers names them in
    `_no_split_modules`), the root holds the rest (embed_tokens, lm_head and their
    modules_to_save copies). Parameters keep their storage dtype (bf16 frozen, fp32 trainable);
    the mixed-precision policy all-gathers them in the compute dtype and reduces gradients in fp32,
    so no autocast is involved and the residual stream runs in the compute dtype."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) \
        if amp_dtype is not None else MixedPrecisionPolicy()
    unit_names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in unit_names]
    if not units:
        raise ValueError(f"launcher.strategy=fsdp: {type(model.get_base_model()).__name__} names "
                         "no decoder-layer class (_no_split_modules) to shard by; use strategy ddp")
    for m in units:
        fully_shard(m, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def save_adapter(model, tokenizer, out: Path, info: dict, src_tokenizer_dir: Path | None,
                 state: dict | None = None) -> None:
    """A peft adapter dir: adapter files + the tokenizer it was trained with + training_info.json.
    `state`: the trainable tensors gathered beforehand (trainable_state), needed under FSDP."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from steps.tokenizer import save_tokenizer

    model.save_pretrained(out, state_dict=state)
    _stable_adapter_files(out)
    save_tokenizer(tokenizer, out)  # the files llama.cpp's converter and transformers 4.x read
    # transformers 5 writes tokenizer.json only; llama.cpp and the vocab stage read tokenizer.model
    if src_tokenizer_dir is not None and (Path(src_tokenizer_dir) / "tokenizer.model").is_file() \
            and not (out / "tokenizer.model").is_file():
        shutil.copyfile(Path(src_tokenizer_dir) / "tokenizer.model", out / "tokenizer.model")
    (out / "training_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def _stable_adapter_files(out: Path) -> None:
    """Make what peft's save_pretrained wrote the same bytes for the same training, wherever
    the base lies and in whatever process: an adapter's digest names its content, so SFT on an
    unchanged pre-training adapter, or a second workspace, hits the cache.
    - adapter_config.json: peft keeps target_modules as a set and writes it in set order, which
      changes from process to process (string hashing is seeded per process): sorted here.
      base_model_name_or_path is the absolute path of the base model dir: null (what peft
      writes for a base without a name). Every reader here passes the base explicitly
      (PeftModel.from_pretrained(base, adapter): merge, evaluate, SFT on a pre-training
      adapter); the base is recorded by content in training_info.json (base_digest).
    - README.md: peft's empty model card, whose only facts are that same path and the peft
      version: not kept."""
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = None
    # peft's own layout of the file (indent 2, sorted keys), so it reads as peft wrote it
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "README.md").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- checkpoints

def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "COMPLETE").is_file())


def _rng_state() -> dict:
    import torch
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- the loop

class Trainer:
    """Optimizer, schedule, sample order, logging, eval, checkpoints for one peft model.

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
        from transformers import (get_constant_schedule_with_warmup,
                                  get_cosine_schedule_with_warmup,
                                  get_linear_schedule_with_warmup)

        self.cfg, self.dist, self.collate = cfg, dist, collate
        self.train_ds, self.eval_ds = train_ds, eval_ds
        self.out_dir, self.ckpt_dir = Path(out_dir), (Path(ckpt_dir) if ckpt_dir else None)
        self.fingerprint, self.on_metrics, self.save_fn = fingerprint, on_metrics, save_fn
        self.precision = precision
        self.model = model                       # the peft model (saved, checkpointed)
        self.net = model                         # what forward() is called on (DDP/compiled)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.fsdp = cfg.launcher.strategy == "fsdp"
        if self.fsdp:
            # precision auto on a GPU without bf16 (the Config validator refuses an explicit fp16)
            if precision == "fp16":
                raise ValueError("launcher.strategy=fsdp trains in bf16 or fp32, and precision auto "
                                 "chose fp16 (this GPU has no bf16): set precision fp32, or use "
                                 "strategy ddp (launcher ddp_gpu) for fp16")
            if not torch.distributed.is_initialized():
                raise RuntimeError("launcher.strategy=fsdp runs under torchrun (steps.training."
                                   "execute starts it); no process group is initialised here")
            shard_model(model, self.amp_dtype)
        else:
            if self.amp_dtype is not None:
                # The modules_to_save embedding is an fp32 master copy; autocast would carry its
                # fp32 output through every residual add and RMSNorm. Cast it to the compute
                # dtype as the recipe's fp16 run and a plain bf16 loop do (bench/train_throughput).
                self._embed_cast = model.get_input_embeddings().register_forward_hook(
                    lambda module, args, output: output.to(self.amp_dtype))
        if not self.fsdp and dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
        if cfg.torch_compile:
            self.net = torch.compile(self.net)

        self.global_batch = cfg.per_device_batch_size * dist.world
        self.micro_per_epoch = len(train_ds) // self.global_batch
        steps_per_epoch = self.micro_per_epoch // cfg.gradient_accumulation_steps
        if steps_per_epoch < 1:
            raise ValueError(
                f"the training set has {len(train_ds)} examples, fewer than one optimizer step "
                f"needs (per_device_batch_size {cfg.per_device_batch_size} x {dist.world} "
                f"processes x gradient_accumulation_steps {cfg.gradient_accumulation_steps}); "
                "add data or lower those settings")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.epochs * steps_per_epoch))
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)

        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        fused = dist.device.type == "cuda"      # one kernel for all params: measurably faster
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                           betas=(0.9, 0.999), eps=1e-8, fused=fused)
        make = {"cosine": get_cosine_schedule_with_warmup,
                "linear": get_linear_schedule_with_warmup}.get(cfg.lr_scheduler)
        self.scheduler = (make(self.optimizer, warmup, self.total_steps) if make else
                          get_constant_schedule_with_warmup(self.optimizer, warmup))
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")

        self.step = 0
        self.best_eval = math.inf
        self.acc = {"loss": 0.0, "n": 0, "tokens": 0.0, "grad_norm": 0.0}
        self.records: list[dict] = []            # everything written to trainer_log.jsonl
        self.resumed_from = 0
        self.rank_tokens = 0.0

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
        self.records.append(record)
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

    # --- checkpoints
    def save_checkpoint(self) -> None:
        import torch
        from safetensors.torch import save_file

        if self.ckpt_dir is None:
            return
        name = f"step-{self.step:08d}"
        tmp = self.ckpt_dir / f".tmp-{name}"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        torch.save(_rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        self.dist.barrier()
        trainable, optimizer = self.gather_trainable(), self._optimizer_state()  # collective
        if self.dist.main:
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer,
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(),
                        "step": self.step, "best_eval": self.best_eval, "acc": dict(self.acc),
                        "fingerprint": self.fingerprint, "world": self.dist.world,
                        "strategy": self.cfg.launcher.strategy},
                       tmp / "state.pt")
            with open(tmp / "trainer_log.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            (tmp / "COMPLETE").write_text(name)
            final = self.ckpt_dir / name
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)        # atomic: a SIGKILL leaves either no checkpoint or a whole one
            for old in _checkpoints(self.ckpt_dir)[:-self.cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s saved", final)
        self.dist.barrier()

    def gather_trainable(self) -> dict | None:
        """trainable_state on rank 0 (None elsewhere); every rank must call it (FSDP gathers)."""
        if self.fsdp or self.dist.main:
            state = trainable_state(self.model)
            return state if self.dist.main else None
        return None

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

    def maybe_resume(self) -> None:
        import torch
        from safetensors.torch import load_file

        if self.ckpt_dir is None or not _checkpoints(self.ckpt_dir):
            return
        ckpt = _checkpoints(self.ckpt_dir)[-1]
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.fingerprint or state["world"] != self.dist.world or \
                state.get("strategy", "ddp") != self.cfg.launcher.strategy:
            raise ValueError(
                f"{ckpt} was written by a run with another config, base model, data, process "
                "count or launcher strategy; resume_dir must be specific to one stage cache key: "
                "delete it or pass another resume_dir")
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
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_eval, self.acc = state["step"], state["best_eval"], state["acc"]
        _set_rng_state(torch.load(ckpt / f"rng_rank{self.dist.rank}.pt", weights_only=False))
        if self.dist.main:
            lines = (ckpt / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
            self.records = [json.loads(line) for line in lines if line]
            with open(self.out_dir / "trainer_log.jsonl", "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines if line)
        self.resumed_from = self.step
        log.info("resumed from %s (step %d of %d)", ckpt, self.step, self.total_steps)

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

    # --- train
    def train(self) -> dict:
        import torch
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        self.maybe_resume()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        t_log = time.perf_counter()
        last_eval: dict = {}
        while self.step < self.total_steps:
            step_loss = torch.zeros((), device=self.dist.device)   # no GPU sync per micro-batch
            for a in range(accum):
                cpu = self.collate([self.train_ds[i] for i in
                                    self._micro_indices(self.step * accum + a)])
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
                self.acc["tokens"] += n_tok
                self.rank_tokens += n_tok
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.acc["n"] += 1
            self.acc["loss"] += float(step_loss)       # one sync per optimizer step
            self.acc["grad_norm"] += float(_whole(norm))
            last = self.step == self.total_steps

            if self.step % cfg.log_every == 0 or last:
                loss_sum, tokens = self.dist.sum([self.acc["loss"], self.acc["tokens"]])
                dt = time.perf_counter() - t_log
                self._emit({"loss": loss_sum / self.dist.world / self.acc["n"], "lr": lr,
                            "grad_norm": self.acc["grad_norm"] / self.acc["n"],
                            "tokens_per_s": tokens / max(dt, 1e-9), "epoch":
                                self.step * accum / self.micro_per_epoch}, self.step)
                self.acc = {"loss": 0.0, "n": 0, "tokens": 0.0, "grad_norm": 0.0}
                t_log = time.perf_counter()
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                last_eval = self.evaluate()
                if last_eval:
                    self._emit(dict(last_eval), self.step)
                    if last_eval["eval_loss"] < self.best_eval:
                        self.best_eval = last_eval["eval_loss"]
                        if self.save_fn is not None:
                            self.save_fn(self._best_dir(), self.gather_trainable())
                t_log = time.perf_counter()
            if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                self.save_checkpoint()
                t_log = time.perf_counter()
        tokens_per_rank = self.dist.gather(self.rank_tokens)
        train_losses = [r["loss"] for r in self.records if "loss" in r]
        summary = {"steps": self.total_steps, "resumed_from_step": self.resumed_from,
                   "world_size": self.dist.world,
                   "train_loss": train_losses[-1] if train_losses else float("nan"),
                   "first_train_loss": train_losses[0] if train_losses else float("nan"),
                   "trainable_params": sum(p.numel() for p in params),
                   "total_params": sum(p.numel() for p in self.model.parameters())}
        for r, t in enumerate(tokens_per_rank):
            summary[f"tokens_rank{r}"] = t
        if last_eval:
            summary.update(last_eval)
            summary["best_eval_loss"] = self.best_eval
        return summary

    def _best_dir(self) -> Path:
        # best/ lives in the resume dir while training (a resumed run still has it), copied at end
        return (self.ckpt_dir or self.out_dir / ".work") / "best"


# ----------------------------------------------------------------------------- a stage's run

def run_training(stage: str, cfg: TrainConfig, out_dir: Path, *, model_dir: Path,
                 adapters: list[Path], dataset_dir: Path, collate: Callable,
                 prepare_model: Callable | None = None, resume_dir: Path | None,
                 on_metrics: Callable | None, extra_info: dict) -> dict:
    """One process's share of a training stage (called in-process for nproc=1, per rank under
    torchrun otherwise): load base (+adapters), add LoRA, train, save the adapter (rank 0).

    `dataset_dir` holds `train/` and optionally `eval/` saved with datasets' save_to_disk (the
    parent process prepares it once, so ranks never tokenize). `prepare_model(model, tokenizer)`
    may change both before LoRA is added (SFT adds [PAD] and resizes) and returns them."""
    import torch
    from datasets import load_from_disk

    out_dir = Path(out_dir)
    dist = Dist(cfg.launcher.backend, group_always=cfg.launcher.strategy == "fsdp")
    try:
        torch.manual_seed(cfg.seed)          # same [PAD] row init (SFT resize) on every rank
        random.seed(cfg.seed + dist.rank)
        precision = resolve_precision(cfg.precision, dist.device)
        model, tokenizer = load_base(model_dir, adapters, precision=precision,
                                     attn_implementation=cfg.attn_implementation)
        if prepare_model is not None:
            model, tokenizer = prepare_model(model, tokenizer)
        torch.manual_seed(cfg.seed)          # identical LoRA init on every rank
        model = add_lora(model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
        if cfg.launcher.strategy == "ddp":
            model.to(dist.device)        # FSDP moves each rank's shards there as it shards
        torch.manual_seed(cfg.seed + dist.rank)   # per-rank dropout streams
        train_ds = load_from_disk(str(Path(dataset_dir) / "train"))
        eval_ds = load_from_disk(str(Path(dataset_dir) / "eval")) \
            if (Path(dataset_dir) / "eval").is_dir() else None
        log.info("rank %d/%d: %d train / %d eval examples on %s (%s)", dist.rank, dist.world,
                 len(train_ds), len(eval_ds) if eval_ds is not None else 0, dist.device, precision)

        src_tok = adapters[-1] if adapters and (Path(adapters[-1]) / "tokenizer.model").is_file() \
            else model_dir
        # The base and the adapters folded into it by content only: a path (a workspace, a
        # temp dir) would give the same training other bytes, another digest, and retrain SFT
        # after every pre-training recompute.
        info = {"stage": stage, "base_digest": base_digest(model_dir),
                "adapters_applied": [{"digest": adapter_digest(a)} for a in adapters],
                "vocab_size": len(tokenizer),
                "embed_rows": int(model.get_input_embeddings().weight.shape[0]),
                "lora": cfg.lora.model_dump(), **extra_info}
        fingerprint = hashlib.sha256(json.dumps(
            {"cfg": cfg.model_dump(exclude={"launcher", "log_every", "save_every", "save_total_limit"}),
             "info": info,
             "data": extra_info.get("data_digest")}, sort_keys=True, default=str).encode()).hexdigest()
        ckpt_dir = Path(resume_dir) if resume_dir else None
        if ckpt_dir is not None and dist.main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()

        def save_fn(dest: Path, state: dict) -> None:
            """Called on every rank (state is gathered collectively); rank 0 writes."""
            if dist.main:
                shutil.rmtree(dest, ignore_errors=True)
                save_adapter(model, tokenizer, dest, info, src_tok, state)

        trainer = Trainer(model, cfg, train_ds, eval_ds, collate, dist=dist, out_dir=out_dir,
                          ckpt_dir=ckpt_dir, fingerprint=fingerprint, on_metrics=on_metrics,
                          save_fn=save_fn, precision=precision)
        summary = trainer.train()
        state = trainer.gather_trainable()       # collective under FSDP
        if dist.main:
            info["steps"] = trainer.total_steps
            save_adapter(model, tokenizer, out_dir, info, src_tok, state)
            best = trainer._best_dir()
            if best.is_dir():
                shutil.copytree(best, out_dir / "best")
            shutil.rmtree(out_dir / ".work", ignore_errors=True)
            summary.update({"vocab_size": len(tokenizer), "precision": precision})
            (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        dist.barrier()
        return summary
    finally:
        dist.close()


# ----------------------------------------------------------------------------- process plumbing

def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextlib.contextmanager
def dataset_dir(data_cache_dir: Path | None, key: str):
    """(path, hit): `data_cache_dir/key` when caching, else a temp dir removed afterwards.
    The caller builds into path when not hit; writes are atomic (tmp dir + rename)."""
    import tempfile
    if data_cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="llamaflow-data-") as tmp:
            yield Path(tmp) / key, False
        return
    final = Path(data_cache_dir) / key
    yield final, (final / "COMPLETE").is_file()


def save_splits(splits: dict, dest: Path, meta: dict) -> None:
    """save_to_disk each split into dest/<name>/ atomically (a killed prep leaves no half cache).

    Two runs training on the same data (say pretrain with r 8 and r 16) share this cache key and
    may prepare it at once: the first complete copy stays, since the other run may be reading it
    already, and a later copy (the same data by construction of the key) is dropped. Temp dirs
    of processes that no longer exist are removed."""
    for old in dest.parent.glob(dest.name + ".tmp-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, ds in splits.items():
        if ds is not None and len(ds):
            ds.save_to_disk(str(tmp / name))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (tmp / "COMPLETE").write_text("ok")
    if (dest / "COMPLETE").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover of a killed prep
    try:
        tmp.rename(dest)
    except OSError:  # another run renamed its copy in between
        if not (dest / "COMPLETE").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def execute(module: str, worker: Callable, cfg: TrainConfig, out_dir: Path, *,
            on_metrics: Callable | None, **kwargs) -> dict:
    """Run worker(cfg, out_dir, on_metrics=..., **kwargs) in this process (nproc 1) or under
    torchrun as `python -m <module> --worker ...` (nproc > 1; kwargs must be JSON-able)."""
    from steps.launch import launch, torchrun_command

    out_dir = Path(out_dir)
    if cfg.launcher.nproc == 1 and cfg.launcher.strategy == "ddp":
        return worker(cfg, out_dir, on_metrics=on_metrics, **kwargs)
    args = ["--worker", "--out-dir", str(out_dir), "--config-json", cfg.model_dump_json(),
            "--kwargs-json", json.dumps(kwargs, default=str)]
    launch(torchrun_command(module, args, cfg.launcher.nproc),
           metrics_file=out_dir / "trainer_log.jsonl", on_metrics=on_metrics,
           timeout_s=cfg.launcher.timeout_s, logger=logging.getLogger(module),
           env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                "PYTHONUNBUFFERED": "1"})
    return json.loads((out_dir / "training_summary.json").read_text())


def worker_main(config_cls, worker: Callable, argv: list[str] | None = None) -> None:
    """Entry point of `python -m steps.<stage> --worker ...` (one torchrun rank)."""
    import argparse
    import sys

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--kwargs-json", default="{}")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(name)s: %(message)s")
    worker(config_cls.model_validate_json(a.config_json), Path(a.out_dir), on_metrics=None,
           **json.loads(a.kwargs_json))
