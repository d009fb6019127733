"""convert: Meta `consolidated.NN.pth` → Hugging Face LlamaForCausalLM, numerically exact.

transformers 5 no longer ships convert_llama_weights_to_hf.py; the old script also loaded every
shard fully, wrote the model twice and needed ~2x the model in RAM (docs/recipe.md, "Conversion
must not hold the checkpoint in memory"). This one maps the shards (torch.load(mmap=True,
weights_only=True): they are untrusted pickles) and streams:
for each output tensor it concatenates the model-parallel pieces along the right dim, permutes
q/k into HF's rotary order, casts, and appends the bytes to a pre-planned safetensors shard.
Each tensor's mapped pages are dropped (madvise DONTNEED) once written, or, where madvise is
unavailable, the shards are re-mapped per layer, so peak memory is about one layer, not the
checkpoint (bench/convert.py measures it).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Literal

import pydantic

from steps import Stage
from steps.meta import (MetaFormatError, MetaParams, meta_to_hf_name, permute, read_checklist,
                        shard_dim)
from steps.safetensors_io import StreamingSafetensorsWriter, read_header

log = logging.getLogger(__name__)

VERSION = "2"
STAGE = Stage()
DATA_FIELDS: tuple[str, ...] = ()
DTYPES = ("bfloat16", "float16", "float32")


class Config(pydantic.BaseModel):
    """convert stage: Meta consolidated.NN.pth → Hugging Face safetensors."""
    model_config = pydantic.ConfigDict(extra="forbid")
    dtype: Literal["bfloat16", "float16", "float32"] = pydantic.Field(
        "bfloat16", description="output weight dtype: bfloat16 | float16 | float32 (Meta's "
                                "LLaMA-1 release is fp16)")
    max_shard_size: str = pydantic.Field("2GB", description="HF output shard size")
    context_length: int | None = pydantic.Field(
        None, description="max_position_embeddings (not in params.json); null: 2048. The "
                          "lifecycle gives the model's own (conf/model/)",
        json_schema_extra={"conf": "${model.context_length}"})
    allow_pickle: bool = pydantic.Field(
        False, description="an HF-format source with only pickled .bin weights: load them with "
                           "torch.load(weights_only=True) and write safetensors (pickles can "
                           "execute code, so they are refused unless this is true)")
    rope_scaling_factor: float | None = pydantic.Field(
        None, gt=1, description="Llama 3.1/3.2 (use_scaled_rope): the rope scaling factor, which "
                                "params.json does not hold; null: 8, as Meta's code has it. "
                                "conf/model/ gives 3.2 1B/3B's 32",
        json_schema_extra={"conf": "${oc.select:model.rope_scaling_factor,null}"})
    instruct: bool = pydantic.Field(
        False, description="a Llama 3.x instruct checkpoint: generation also stops at <|eom_id|> "
                           "and <|eot_id|>, the tokenizer's EOS is <|eot_id|>")


def _shard_files(meta_dir: Path) -> list[Path]:
    files = sorted(meta_dir.glob("consolidated.*.pth"))
    if not files:
        raise MetaFormatError(f"{meta_dir}: no consolidated.NN.pth files (is this the model "
                              "folder, e.g. llama/7B, that holds params.json?)")
    idx = [int(re.search(r"consolidated\.(\d+)\.pth$", f.name).group(1)) for f in files]
    expected = set(range(max(idx) + 1))
    # Meta's checklist.chk lists every shard: it catches a missing last shard too.
    if (meta_dir / "checklist.chk").is_file():
        listed = read_checklist(meta_dir / "checklist.chk")
        expected |= {int(m.group(1)) for n in listed
                     if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", n))}
    missing = sorted(expected - set(idx))
    if missing:
        raise MetaFormatError(f"{meta_dir}: model-parallel shard(s) "
                              f"{[f'consolidated.{i:02d}.pth' for i in missing]} missing (have "
                              f"{[f.name for f in files]}); download them again")
    return files


def _load(files: list[Path]) -> list[dict]:
    import pickle

    import torch

    out = []
    for f in files:
        try:
            out.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
            # truncated download, an HTML error page, or a pickle that wants to run code
            raise MetaFormatError(f"{f}: not a readable PyTorch weights file ({str(e)[:200]}); "
                                  "download it again (checklist.chk has its md5)") from None
    return out


def _page_releaser():
    """On Linux, a function dropping a mapped tensor's pages from this process right after they
    are written (madvise MADV_DONTNEED on torch's private file mapping: clean pages are discarded,
    a later touch would re-read the file). Re-mapping the checkpoint per layer does the same but
    re-unpickles it every time (~0.1 s per layer for a 1.3B model, 2.6 s of its ~7 s); None where
    madvise is unavailable, and convert falls back to that."""
    import ctypes
    import ctypes.util
    import mmap
    import sys

    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE

    def release(t) -> None:
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        end = start + t.numel() * t.element_size()
        lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if hi > lo:
            libc.madvise(lo, hi - lo, mmap.MADV_DONTNEED)
    return release


def _full_shape(name: str, parts: list) -> tuple[int, ...]:
    dim = shard_dim(name)
    shape = list(parts[0].shape)
    if dim is not None:
        shape[dim] = sum(p.shape[dim] for p in parts)
    return tuple(shape)


def _hf_order(p: MetaParams) -> list[str]:
    """Meta names in the order HF's state dict lists them."""
    per = ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
           "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
           "feed_forward.w2.weight", "attention_norm.weight", "ffn_norm.weight"]
    names = ["tok_embeddings.weight"]
    for i in range(p.n_layers):
        names += [f"layers.{i}.{k}" for k in per]
    return names + ["norm.weight", "output.weight"]


def plan(meta_dir: Path) -> tuple[MetaParams, list[Path], int, dict[str, tuple[int, ...]]]:
    """Validate the checkpoint (params, files, every tensor's presence and shape) without reading
    any weights; returns params, shard files, vocab rows and the full shapes."""
    import sentencepiece as spm

    meta_dir = Path(meta_dir)
    params = MetaParams.from_file(meta_dir / "params.json")
    files = _shard_files(meta_dir)
    tok = meta_dir / "tokenizer.model"
    if not tok.is_file():
        raise MetaFormatError(f"{tok} not found: Meta ships tokenizer.model beside the model "
                              "folder; the download stage puts it into the same folder")
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (0, 1, 2):
        # Early third-party conversions with bos/eos 0 never stopped generating (docs/recipe.md,
        # "Special token ids must be LLaMA's").
        raise MetaFormatError(f"{tok}: unk/bos/eos ids are {sp.unk_id()}/{sp.bos_id()}/"
                              f"{sp.eos_id()}, LLaMA's are 0/1/2")
    shards = _load(files)
    try:
        names = set(shards[0])
        for f, sd in zip(files, shards):
            if set(sd) - {k for k in sd if k.endswith("rope.freqs")} != names - {
                    k for k in names if k.endswith("rope.freqs")}:
                raise MetaFormatError(f"{f}: holds other tensors than {files[0].name}")
        embed = _full_shape("tok_embeddings.weight", [sd["tok_embeddings.weight"] for sd in shards]) \
            if "tok_embeddings.weight" in names else None
        if embed is None:
            raise MetaFormatError(f"{files[0]}: no tok_embeddings.weight; not a LLaMA checkpoint")
        vocab = embed[0]
        if params.vocab_size > 0 and params.vocab_size != vocab:
            raise MetaFormatError(f"{meta_dir / 'params.json'}: vocab_size {params.vocab_size} but "
                                  f"tok_embeddings has {vocab} rows")
        if sp.get_piece_size() > vocab:
            raise MetaFormatError(f"{tok} has {sp.get_piece_size()} pieces but the embedding only "
                                  f"{vocab} rows: this is not the tokenizer of this checkpoint")
        expected = params.shapes(vocab)
        for name, shape in expected.items():
            if name not in names:
                raise MetaFormatError(f"{files[0]}: tensor {name} missing (params.json says "
                                      f"{params.n_layers} layers)")
            got = _full_shape(name, [sd[name] for sd in shards])
            if got != shape:
                where = ", ".join(f"{f.name}: {tuple(sd[name].shape)}" for f, sd in zip(files, shards))
                raise MetaFormatError(
                    f"{meta_dir}: {name} has shape {got} across {len(files)} shard(s) ({where}), "
                    f"params.json implies {shape} (dim {params.dim}, heads {params.n_heads}/"
                    f"{params.kv_heads}, ffn {params.ffn_dim}); a shard is corrupt or missing, or "
                    "params.json belongs to another model size")
        extra = names - set(expected) - {k for k in names if k.endswith("rope.freqs")}
        if extra:
            raise MetaFormatError(f"{files[0]}: unexpected tensors {sorted(extra)[:5]}")
    finally:
        del shards
    return params, files, vocab, expected


def _hf_config(params: MetaParams, vocab: int, dtype: str, context_length: int | None) -> dict:
    from transformers import LlamaConfig

    # params.json does not store the context (LLaMA-1 2048, Llama-2 4096); conf/model/ does and
    # conf/convert passes it. Without it, 2048 as transformers' own converter defaults to.
    context_length = context_length or 2048
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=params.dim, intermediate_size=params.ffn_dim,
                      num_hidden_layers=params.n_layers, num_attention_heads=params.n_heads,
                      num_key_value_heads=params.kv_heads, rms_norm_eps=params.norm_eps,
                      max_position_embeddings=context_length, rope_theta=params.rope_theta,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
                      hidden_act="silu", architectures=["LlamaForCausalLM"])
    d = cfg.to_dict()
    d["dtype"] = dtype
    return d


def convert_meta_to_hf(meta_dir: Path, out_dir: Path, dtype: str = "bfloat16",
                       max_shard_size: str | int = "2GB", context_length: int | None = None,
                       rope_scaling_factor: float | None = None, instruct: bool = False) -> Path:
    """Convert a Meta checkpoint folder (params.json, consolidated.NN.pth, tokenizer.model) into
    an HF model folder: safetensors shards (+ index), config.json, generation_config.json,
    tokenizer.model and HF tokenizer files. A tiktoken tokenizer.model makes it a Llama 3.x
    checkpoint (steps/llama3.py; rope_scaling_factor and instruct apply to those only)."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils.hub import convert_file_size_to_int

    from steps import llama3
    from steps.tokenizer import save_hf_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {DTYPES}")
    max_bytes = convert_file_size_to_int(max_shard_size)
    meta_dir, out_dir = Path(meta_dir), Path(out_dir)
    l3 = llama3.conversion(meta_dir, context_length=context_length,
                           rope_scaling_factor=rope_scaling_factor, instruct=instruct)
    params, files, vocab, shapes = l3.plan() if l3 else plan(meta_dir)
    split = l3.shard_dim if l3 else shard_dim
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; convert writes into an empty directory")
    # The tokenizer first: it is cheap and the last check that can fail (e.g. a non-BPE model).
    n_tokens = l3.save_tokenizer(out_dir) if l3 else \
        save_hf_tokenizer(meta_dir / "tokenizer.model", out_dir)
    if n_tokens > vocab:
        raise MetaFormatError(f"{meta_dir / 'tokenizer.model'}: {n_tokens} tokens but the "
                              f"embedding has only {vocab} rows")
    order = _hf_order(params)
    writer = StreamingSafetensorsWriter(
        out_dir, [(meta_to_hf_name(n), shapes[n], dtype) for n in order], max_bytes)
    target = getattr(torch, dtype)
    groups: list[list[str]] = [[order[0]]] + [order[1 + 9 * i: 1 + 9 * (i + 1)]
                                             for i in range(params.n_layers)] + [order[-2:]]
    release = _page_releaser()
    shards = _load(files) if release else None
    for group in groups:
        if not release:
            shards = _load(files)  # re-mapped per layer: pages read for the last layer are released
        for name in group:
            parts = [sd[name] for sd in shards]
            dim = split(name)
            t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            if name.endswith("attention.wq.weight"):
                t = permute(t, params.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = permute(t, params.kv_heads)
            writer.write(meta_to_hf_name(name), t.to(target))
            if release:
                for part in parts:
                    release(part)
            del t, parts
    del shards
    writer.close()
    if l3:
        l3.write_configs(out_dir, params, vocab, dtype)
        return out_dir
    (out_dir / "config.json").write_text(json.dumps(
        _hf_config(params, vocab, dtype, context_length), indent=2, sort_keys=True))
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out_dir)
    return out_dir


def run(config: Config, out_dir: Path, *, on_metrics=None, meta: Path) -> dict:
    from steps import hf_import, llama3
    from steps.checks import check_model

    if hf_import.is_hf_folder(meta):  # source=hf_model / local_hf: a verifying import instead
        return hf_import.run(config, out_dir, meta)
    t0 = time.time()
    convert_meta_to_hf(meta, out_dir, dtype=config.dtype, max_shard_size=config.max_shard_size,
                       context_length=config.context_length,
                       rope_scaling_factor=config.rope_scaling_factor, instruct=config.instruct)
    seconds = time.time() - t0
    v = check_model(out_dir)
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    special = llama3.check_special_ids(Path(out_dir), config.instruct) \
        if llama3.is_tiktoken(Path(meta) / "tokenizer.model") else _special_ids(Path(out_dir))
    files = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    n_params, n_tensors, size = _count(out_dir)
    return {"seconds": seconds, "bytes": size, "file_bytes": files,
            "MB_per_s": size / 1e6 / max(seconds, 1e-9), "params": n_params, "tensors": n_tensors, "vocab_size": v.embed_rows,
            "n_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
            "n_shards_in": len(list(Path(meta).glob("consolidated.*.pth"))),
            "unk_id": special["unk"], "bos_id": special["bos"], "eos_id": special["eos"]}


def _special_ids(model_dir: Path) -> dict[str, int]:
    """unk/bos/eos as the converted tokenizer and config.json see them; LLaMA's are 0/1/2 (a
    conversion with bos/eos 0 gives a model that never stops generating: docs/recipe.md, "Special
    token ids must be LLaMA's")."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((model_dir / "config.json").read_text())
    ids = {"unk": tok.unk_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    if ids != {"unk": 0, "bos": 1, "eos": 2} or (cfg["bos_token_id"], cfg["eos_token_id"]) != (1, 2):
        raise MetaFormatError(f"{model_dir}: special ids {ids}, config bos/eos "
                              f"{cfg['bos_token_id']}/{cfg['eos_token_id']}; LLaMA's are unk 0, "
                              "bos 1, eos 2")
    return ids


def _count(model_dir: Path) -> tuple[int, int, int]:
    """(parameters, tensors, weight bytes) from the safetensors headers."""
    infos = [i for f in Path(model_dir).glob("*.safetensors") for i in read_header(f).values()]
    return sum(math.prod(i.shape) for i in infos), len(infos), sum(i.nbytes for i in infos)
