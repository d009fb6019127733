"""The model side of training: a base with adapters applied, a fresh LoRA, its trainable tensors
and the adapter directory written from them.

Layout of an adapter dir (save_adapter):
    adapter_config.json, adapter_model.safetensors   the LoRA (PeftModel.from_pretrained)
    tokenizer files                                  the vocabulary it was trained with
    training_info.json                               the base and earlier adapters by digest
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable

from steps.tokenizer import tokenizer_source
from steps.train.config import LoraSettings
from steps.train.parallel import whole

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_base(model_dir: Path, adapters: Iterable[Path] = (), *, precision: str = "fp32",
              attn_implementation: str | None = "sdpa", device=None, merge_last: bool = True):
    """Load a HF causal LM (after the vocabulary checks), apply `adapters` to it in order
    (apply_adapters) and return (model, tokenizer); the tokenizer is tokenizer_source's.
    precision: fp32 | bf16 | fp16, or a torch dtype name (float32, ...); attn_implementation
    None: transformers' default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.checks import check_adapter, check_model

    model_dir = Path(model_dir)
    rows = check_model(model_dir).embed_rows
    adapters = [Path(a) for a in adapters]
    for a in adapters:      # cheap header checks before any weight is read
        rows = check_adapter(a, rows)
    # Weights are loaded in the compute dtype; trainable tensors are made fp32 later (AMP).
    dtype = getattr(torch, _DTYPES.get(precision, precision))
    # None passes nothing: from_pretrained(attn_implementation=None) would override the config's
    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **attn)
    if device is not None:
        model.to(device)
    model = apply_adapters(model, adapters, merge_last=merge_last)
    return model, AutoTokenizer.from_pretrained(tokenizer_source(model_dir, adapters))


def apply_adapters(model, adapters: Iterable[Path], *, merge_last: bool = True):
    """Apply peft adapters to `model` in order, as each was trained on the ones before it:
    PeftModel.from_pretrained + merge_and_unload, resizing the embeddings first when an adapter
    carries a larger vocabulary (as SFT's [PAD] does; the adapter holds every row, so the new
    rows' initial values never count). merge_last=False leaves the last one unmerged (peft's
    LoRA forward), so a LoRA is evaluated exactly as it was trained."""
    from peft import PeftModel

    from steps.checks import check_adapter

    adapters = [Path(a) for a in adapters]
    for i, a in enumerate(adapters):
        rows = model.get_input_embeddings().weight.shape[0]
        adapter_rows = check_adapter(a, rows)
        if adapter_rows > rows:
            model.resize_token_embeddings(adapter_rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, a)
        if merge_last or i < len(adapters) - 1:
            model = model.merge_and_unload()
            log.info("merged adapter %s into %s in memory", a, model.name_or_path)
    return model


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


def trainable_state(model) -> dict:
    """The trainable tensors (LoRA A/B, modules_to_save copies), whole and on the CPU. Under FSDP
    they are DTensor shards and are all-gathered: every rank must call this."""
    if hasattr(model, "reshard"):
        model.reshard()      # FSDP: the root stays unsharded after a forward without backward
    return {n: whole(p).detach().to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def gather_trainable(model, dist, fsdp: bool) -> dict | None:
    """trainable_state on rank 0 (None elsewhere); every rank must call it (FSDP gathers)."""
    if fsdp or dist.main:
        state = trainable_state(model)
        return state if dist.main else None
    return None


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
