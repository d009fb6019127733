"""The settings shared by the training stages (pretrain and sft).

TrainConfig's defaults are Chinese-LLaMA-Alpaca's run_pt.sh; sft re-declares the few that
run_sft.sh changes (stage_default keeps the bounds and the description). Each field's
description is the comment conf/<stage>/default.yaml shows for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import ConfigDict, Field

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Settings that change neither the adapter nor its log: checkpointing (resume is bitwise exact)
# and the launcher timeout, so a longer timeout resumes the same run instead of starting anew.
# Left out of the stage cache key (the stages' CACHE_EXCLUDE) and of the resume fingerprint.
RESULT_NEUTRAL = ("save_every", "save_total_limit", "launcher.timeout_s",
                  "data_workers")   # pretrain's tokenizer processes: the same blocks
# Settings added after adapters were cached and fingerprinted: at these values (the old
# behaviour) they are left out of the cache key and the resume fingerprint, which stay as before.
OMIT_AT_DEFAULT = {"loss_chunk_size": 0}


class LoraSettings(pydantic.BaseModel):
    """peft LoRA settings; defaults = Chinese-LLaMA-Alpaca v1 run_pt.sh / run_sft.sh.
    Plus / LLaMA-2 preset: r=64, alpha=128 (conf/recipe/* override `lora.r`, `lora.alpha`)."""
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="LoRA rank (Plus / LLaMA-2: 64)")
    alpha: int = Field(32, ge=1, description="scaling = alpha / r = 4 (Plus / LLaMA-2: 128, "
                                             "scaling 2)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS),
                                      description="the linear layers that get a LoRA")
    modules_to_save: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head"],
                                       description="full copies: the new Chinese rows are trained")


class LauncherSettings(pydantic.BaseModel):
    """How a training stage is run; the defaults (conf/launcher/single.yaml, which the other
    conf/launcher/ options extend) are one process, the task's own: CPU or one GPU.
    nproc > 1 runs the stage under torchrun as a subprocess in its own process group.
    strategy ddp: every rank holds the whole model, gradients are all-reduced (DDP).
    strategy fsdp: torch FSDP2 (`fully_shard` per decoder layer, then the root): parameters,
    gradients and optimizer state are sharded over the ranks, so a model too big for one GPU
    trains; always run under torchrun, also with nproc 1."""
    model_config = ConfigDict(extra="forbid")
    nproc: int = Field(1, ge=1, description="processes (one per GPU); > 1 runs under torchrun")
    backend: Literal["gloo", "nccl"] = Field("gloo", description="gloo (CPU) | nccl (GPU)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every rank holds the whole model | fsdp: FSDP2 shards it")
    timeout_s: float | None = Field(
        None, description="seconds; on timeout the whole process group is killed")


# The knobs whose defaults differ per stage: one type each, so a stage's default keeps the bounds.
LearningRate = Annotated[float, Field(gt=0)]
WeightDecay = Annotated[float, Field(ge=0)]
WarmupRatio = Annotated[float, Field(ge=0, le=1)]
ValidationSplit = Annotated[float, Field(ge=0, lt=1)]


class TrainConfig(pydantic.BaseModel):
    """Fields shared by the pretrain and sft Configs, with run_pt.sh's defaults."""
    model_config = ConfigDict(extra="forbid")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="peft LoRA settings")
    learning_rate: LearningRate = Field(2e-4, description="peak learning rate (AdamW)")
    weight_decay: WeightDecay = Field(
        0.01, description="on matrices only (LoRA A/B, embeddings), not on 1-D params")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon")
    warmup_ratio: WarmupRatio = Field(
        0.05, description="warmup steps = ceil(ratio * total steps), then the schedule")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="cosine | linear | constant")
    per_device_batch_size: int = Field(1, ge=1, description="examples per process and micro-batch")
    gradient_accumulation_steps: int = Field(
        8, ge=1, description="global batch = per_device x nproc x accumulation")
    epochs: float = Field(1.0, gt=0, description="passes over the training data")
    max_steps: int = Field(-1, description="> 0: exactly this many optimizer steps (overrides "
                                           "epochs)")
    max_grad_norm: float = Field(1.0, description="gradient clipping; <= 0 disables it")
    log_every: int = Field(10, ge=1, description="loss, lr, grad_norm, tokens_per_s every N steps "
                                                 "(MLflow + trainer_log.jsonl)")
    eval_every: int = Field(100, ge=0, description="eval_loss / eval_ppl every N steps (0: only "
                                                   "at the end); best/ adapter kept")
    save_every: int = Field(200, ge=0, description="checkpoint period (into the resume dir "
                                                   "pipelines passes); 0: none")
    save_total_limit: int = Field(3, ge=1, description="checkpoints kept")
    validation_split: ValidationSplit = Field(
        0.001, description="fraction of the data held out for eval_loss / eval_ppl "
                           "(recipe: 0.001)")
    seed: int = Field(42, description="LoRA init, data order, split and dropout")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto (fp32 on CPU, bf16 on GPU, fp16 without bf16) | fp32 | bf16 | "
                            "fp16")
    gradient_checkpointing: bool = Field(
        False, description="recipe: on (saves memory, ~25% slower)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="sdpa | eager | flash_attention_2 (needs the flash-attn package)")
    torch_compile: bool = Field(
        False, description="torch.compile the model (GPU; first steps compile: on a 7B shape it "
                           "took over 120 s on an H100, so the gain is unmeasured)")
    loss_chunk_size: int = Field(
        0, ge=0, description="> 0: the loss over this many supervised tokens at a time, never the "
                             "full batch x seq x vocab logits (made again in the backward pass; "
                             "steps/train/chunked_loss.py); 0: transformers' loss on full logits")
    launcher: LauncherSettings = Field(
        default_factory=LauncherSettings, json_schema_extra={"conf_option": "/launcher/single"},
        description="how the stage is run: conf/launcher/ single | ddp_cpu | ddp_gpu | fsdp")

    @pydantic.model_validator(mode="after")
    def _fsdp_needs_bf16_or_fp32(self):
        check_fsdp_precision(self.launcher.strategy, self.precision)
        return self


def check_fsdp_precision(strategy: str, precision: str, chosen: str | None = None) -> None:
    """launcher.strategy=fsdp trains in bf16 or fp32. `precision` is the setting, `chosen` what
    it resolved to on this device (None: the setting itself). The Config validator refuses an
    explicit fp16 before any work; the Trainer refuses the fp16 that auto chose on a GPU
    without bf16, which only the device can tell."""
    if strategy != "fsdp" or (chosen or precision) != "fp16":
        return
    if precision == "auto":   # this device has no bf16: fp32 is what fsdp can do here
        how, fix = "auto chose fp16 (this GPU has no bf16)", "set precision fp32"
    else:
        how, fix = "is fp16", "set precision bf16 (or auto on a bf16 GPU) or fp32"
    raise ValueError(f"launcher.strategy=fsdp trains in bf16 or fp32, and precision {how}: "
                     f"{fix}, or use strategy ddp (launcher ddp_gpu) for fp16")


def stage_default(name: str, default, description: str | None = None):
    """A TrainConfig field re-declared by a stage with its recipe's default: the stage annotates
    it with the same bounded type (LearningRate, ...) and keeps the description unless it says
    more about it."""
    return Field(default, description=description or TrainConfig.model_fields[name].description)


def result_settings(cfg: TrainConfig) -> dict:
    """cfg.model_dump() without the RESULT_NEUTRAL settings (and OMIT_AT_DEFAULT ones at it)."""
    dump = cfg.model_dump()
    for leaf, default in OMIT_AT_DEFAULT.items():
        if dump.get(leaf, default) == default:
            dump.pop(leaf, None)
    for dotted in RESULT_NEUTRAL:
        *parents, leaf = dotted.split(".")
        node = dump
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return dump


def with_data(config_cls, cfg, data):
    """The plain entry points' config: `cfg` (a Config or a dict) validated as config_cls, with
    `data` (one path or several; None keeps cfg.data) in place of cfg.data."""
    cfg = config_cls.model_validate(cfg if isinstance(cfg, dict) else cfg.model_dump())
    if data is None:
        return cfg
    return cfg.model_copy(update={"data": [str(d) for d in (
        [data] if isinstance(data, (str, Path)) else data)]})
