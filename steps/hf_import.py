"""An HF-format LLaMA as the lifecycle's start: the convert stage's verifying import.

A Hugging Face checkpoint (a hub repo via `source=hf_model`, a folder via `source=local_hf`)
needs no conversion, but every later stage assumes what a Meta conversion guarantees: a LLaMA
architecture, every tensor present with the shape config.json implies, a tokenizer that fits the
embedding, safetensors weights in the requested dtype. `inspect` checks all of that from
config.json, the shard index and the safetensors headers (no weights read), so download, the
flow-start check (pipelines/validate.py) and convert all refuse a bad folder before anything is
copied; `import_hf` then writes the same layout `convert_meta_to_hf` writes (safetensors
shards + index, config.json, generation_config.json, tokenizer files), so every later stage is
unchanged.

Pickled `.bin` weights can execute code when loaded: they are refused unless the user says
`convert.allow_pickle=true`, and then read with `torch.load(weights_only=True)` and written as
safetensors.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from steps.meta import MetaFormatError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# What an HF checkpoint carries besides its weights, copied as they are: the tokenizer is the
# model's own (an extended vocabulary's added tokens such as [PAD] live in tokenizer.json).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
LLAMA_ARCH = "LlamaForCausalLM"
# Buffers old transformers versions saved with the weights; recomputed from config.json on load.
DROPPED = ("rotary_emb.inv_freq",)
LAYER_TENSORS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
PICKLE_FIX = ("pickled weights can execute code when loaded: convert them to safetensors, or "
              "pass convert.allow_pickle=true to load them with torch.load(weights_only=True) "
              "and write safetensors")


class HfFormatError(MetaFormatError):
    """An HF-format folder that is not a complete LLaMA checkpoint. Names the file and key."""


@dataclass
class HfCheckpoint:
    root: Path
    config: dict
    files: list[Path]                       # weight files, in index order
    shapes: dict[str, tuple[int, ...]]      # tensor name -> shape (empty: pickles not opened)
    where: dict[str, Path]                  # tensor name -> the file holding it
    dtypes: dict[str, str]                  # tensor name -> torch dtype name
    pickled: bool
    embed_rows: int | None
    tokenizer_size: int | None


def is_hf_folder(path: Path) -> bool:
    """An HF-format checkpoint (config.json, no Meta consolidated.NN.pth) rather than Meta's."""
    path = Path(path)
    return (path / "config.json").is_file() and not any(path.glob("consolidated.*.pth"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HfFormatError(f"{path} not found: an HF-format checkpoint has config.json, its "
                            "weights and tokenizer files side by side") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HfFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HfFormatError(f"{path}: a JSON {type(data).__name__}, expected an object")
    return data


def check_architecture(root: Path) -> dict:
    """config.json of a LLaMA-architecture model (every later stage builds LlamaForCausalLM)."""
    cfg = _read_json(root / "config.json")
    archs, model_type = cfg.get("architectures") or [], cfg.get("model_type")
    if model_type != "llama" or (archs and LLAMA_ARCH not in archs):
        raise HfFormatError(
            f"{root / 'config.json'}: model_type {model_type!r}, architectures {archs}: not a "
            f"LLaMA-architecture model (model_type \"llama\", {LLAMA_ARCH}); llamaflow's later "
            "stages build LlamaForCausalLM: start from a LLaMA-family checkpoint")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size"):
        if not (isinstance(cfg.get(key), int) and cfg[key] > 0):
            raise HfFormatError(f"{root / 'config.json'}: {key} is {cfg.get(key)!r}, a positive "
                                "integer in every LLaMA config.json")
    return cfg


def weight_files(root: Path, allow_pickle: bool | None) -> tuple[list[Path], dict | None, bool]:
    """(weight files, the index's weight_map or None, pickled?). Every shard the index names must
    be there. Safetensors win where both are present; pickles alone are refused unless
    `allow_pickle` (None: listed but their use left to the caller, as download does)."""
    for index, suffix, pickled in ((INDEX, ".safetensors", False), (BIN_INDEX, ".bin", True)):
        if (root / index).is_file():
            weight_map = _read_json(root / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HfFormatError(f"{root / index}: no weight_map (tensor name -> shard file)")
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise HfFormatError(f"{root / index}: shard(s) {missing} named in its weight_map "
                                    f"are missing from {root}; download them again")
        else:
            weight_map, names = None, sorted(p.name for p in root.glob(f"*{suffix}"))
        if names:
            if pickled and allow_pickle is False:
                raise HfFormatError(f"{root}: weights only as pickled {', '.join(names)}; "
                                    + PICKLE_FIX)
            return [root / n for n in names], weight_map, pickled
    raise HfFormatError(f"{root}: no weights (*.safetensors, {INDEX}, or pytorch_model*.bin)")


def _tensor_tables(files: list[Path], pickled: bool) -> dict[Path, dict[str, tuple]]:
    """{file: {name: (shape, torch dtype name)}} from safetensors headers, or from pickles
    mapped with torch.load(mmap=True, weights_only=True)."""
    from steps.safetensors_io import ST_DTYPES, read_header

    tables = {}
    for f in files:
        if pickled:
            tables[f] = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                         for n, t in _load_pickle(f).items()}
            continue
        try:
            header = read_header(f)
        except ValueError as e:
            raise HfFormatError(str(e)) from None
        tables[f] = {n: (i.shape, ST_DTYPES.get(i.dtype, i.dtype)) for n, i in header.items()}
    return tables


def _load_pickle(f: Path) -> dict:
    import pickle

    import torch

    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        # weights_only refuses any pickle that would run code: such a file is not weights
        raise HfFormatError(f"{f}: not a readable PyTorch weights file ({str(e)[:200]})") from None


def expected_shapes(cfg: dict, rows: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of LlamaForCausalLM with the shape config.json implies."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, head_dim = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    per = dict(zip(LAYER_TENSORS, [(heads * head_dim, hidden), (kv * head_dim, hidden),
                                   (kv * head_dim, hidden), (hidden, heads * head_dim),
                                   (inter, hidden), (inter, hidden), (hidden, inter),
                                   (hidden,), (hidden,)]))
    shapes = {"model.embed_tokens.weight": (rows, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in per.items()}
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (rows, hidden)}


def _check_tensors(root: Path, cfg: dict, shapes: dict, where: dict) -> int:
    """Every tensor present with its implied shape, no stranger ones; returns embedding rows."""
    embed = shapes.get("model.embed_tokens.weight")
    if embed is None:
        raise HfFormatError(f"{root}: no model.embed_tokens.weight in {sorted(set(map(str, where.values())))}")
    rows = embed[0]
    if cfg["vocab_size"] != rows:
        raise HfFormatError(
            f"{root / 'config.json'}: vocab_size {cfg['vocab_size']} but model.embed_tokens.weight "
            f"({where['model.embed_tokens.weight'].name}) has {rows} rows: config.json belongs to "
            f"another checkpoint (a vocabulary extension saved without its config?); set "
            f"vocab_size to {rows} only if these weights are the ones you mean")
    expected = expected_shapes(cfg, rows)
    if "lm_head.weight" not in shapes and cfg.get("tie_word_embeddings"):
        expected.pop("lm_head.weight")   # tied: written from embed_tokens on import
    for name, shape in expected.items():
        if name not in shapes:
            raise HfFormatError(f"{root}: tensor {name} missing (config.json says "
                                f"{cfg['num_hidden_layers']} layers)")
        if tuple(shapes[name]) != shape:
            raise HfFormatError(
                f"{where[name]}: {name} has shape {tuple(shapes[name])}, config.json implies "
                f"{shape}; the shard is corrupt or config.json belongs to another model size")
    extra = sorted(n for n in shapes if n not in expected and not n.endswith(DROPPED))
    if extra:
        raise HfFormatError(f"{where[extra[0]]}: tensors a LlamaForCausalLM does not have: "
                            f"{extra[:5]}")
    return rows


def _check_tokenizer(root: Path, rows: int | None) -> int:
    from steps.checks import VocabMismatch, tokenizer_size

    try:
        size, _ = tokenizer_size(root)
    except VocabMismatch as e:
        raise HfFormatError(f"{e}") from None
    if rows is not None and size > rows:
        name = "tokenizer.json" if (root / "tokenizer.json").is_file() else "tokenizer.model"
        raise HfFormatError(f"{root / name}: {size} tokens but model.embed_tokens.weight has only "
                            f"{rows} rows: this is not the tokenizer of this checkpoint; copy the "
                            "tokenizer files it was trained with")
    return size


def inspect(root: Path, allow_pickle: bool | None = False) -> HfCheckpoint:
    """Check an HF-format folder without reading weights: LLaMA architecture, every shard the
    index names present and every tensor of the index in its shard, every tensor's shape,
    config.json's vocab_size vs the embedding rows, the tokenizer vs the embedding. Raises
    HfFormatError naming the file and key. allow_pickle=None lists pickled weights without
    opening them (their tensors are then checked on import)."""
    root = Path(root)
    cfg = check_architecture(root)
    files, weight_map, pickled = weight_files(root, allow_pickle)
    shapes, where, dtypes = {}, {}, {}
    if not (pickled and allow_pickle is None):
        for f, table in _tensor_tables(files, pickled).items():
            for name, (shape, dtype) in table.items():
                shapes[name], where[name], dtypes[name] = shape, f, dtype
        for name, file in (weight_map or {}).items():
            if where.get(name) != root / file:
                index = BIN_INDEX if pickled else INDEX
                raise HfFormatError(f"{root / file}: tensor {name} missing (the weight_map of "
                                    f"{index} puts it there); the shard is incomplete: download "
                                    "it again")
    rows = _check_tensors(root, cfg, shapes, where) if shapes else None
    return HfCheckpoint(root, cfg, files, shapes, where, dtypes, pickled, rows,
                        _check_tokenizer(root, rows))


def hf_order(n_layers: int) -> list[str]:
    """HF tensor names in the order a Meta conversion writes them (steps/convert.py)."""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        names += [f"model.layers.{i}.{k}" for k in LAYER_TENSORS]
    return names + ["model.norm.weight", "lm_head.weight"]


def _out_config(cfg: dict, dtype: str) -> dict:
    """The source's config.json as a Meta conversion writes one (LlamaConfig's full dict, sorted
    keys), in the configured dtype; a tied lm_head is written out, as a Meta checkpoint has its
    own and the later stages train it apart from embed_tokens."""
    from transformers import LlamaConfig

    d = LlamaConfig.from_dict({k: v for k, v in cfg.items()
                               if k not in ("transformers_version", "torch_dtype", "dtype")}
                              ).to_dict()
    d.update(dtype=dtype, tie_word_embeddings=False, architectures=[LLAMA_ARCH])
    # Llama 3's scaled rope: the Meta conversion (steps/llama3.py) writes rope_scaling and
    # rope_theta beside rope_parameters, for readers older than transformers 5; to_dict keeps only
    # rope_parameters, so they are written back and the import equals a Meta conversion
    scaling = d.get("rope_parameters") or {}
    if scaling.get("rope_type") == "llama3":
        d["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
        d["rope_theta"] = scaling["rope_theta"]
    return d


def _tensor_reader(ckpt: HfCheckpoint):
    """get(name) -> tensor, one file open at a time (mapped, not read whole)."""
    from safetensors import safe_open

    state = {"file": None, "handle": None}

    def get(name: str):
        f = ckpt.where[name]
        if state["file"] != f:
            state["handle"] = None
            state["handle"] = _load_pickle(f) if ckpt.pickled else safe_open(f, framework="pt")
            state["file"] = f
        h = state["handle"]
        return h[name] if ckpt.pickled else h.get_tensor(name)
    return get


def _write_weights(ckpt: HfCheckpoint, out_dir: Path, dtype: str, max_bytes: int) -> None:
    import torch

    from steps.safetensors_io import StreamingSafetensorsWriter

    n_layers = ckpt.config["num_hidden_layers"]
    order = hf_order(n_layers)
    shapes = expected_shapes(ckpt.config, ckpt.embed_rows)
    writer = StreamingSafetensorsWriter(out_dir, [(n, shapes[n], dtype) for n in order], max_bytes)
    target, get = getattr(torch, dtype), _tensor_reader(ckpt)
    for name in order:
        src = name if name in ckpt.where else "model.embed_tokens.weight"  # a tied lm_head
        t = get(src)
        cast = t.to(target)
        if target == torch.float16 and t.dtype != torch.float16 and not torch.isfinite(cast).all() \
                and torch.isfinite(t).all():
            # bf16/fp32 weights beyond fp16's range become inf: a model that outputs NaN
            raise HfFormatError(f"{ckpt.where[src]}: {src} overflows float16 (max |w| "
                                f"{t.abs().max().item():.4g}); use convert.dtype=bfloat16")
        writer.write(name, cast)
        del t, cast
    writer.close()


def import_hf(src_dir: Path, out_dir: Path, dtype: str = "bfloat16",
              max_shard_size: str | int = "2GB", allow_pickle: bool = False) -> HfCheckpoint:
    """Verify the HF-format folder `src_dir` (inspect) and write it into the empty `out_dir`
    in the layout convert_meta_to_hf writes, weights cast to `dtype`."""
    from transformers import GenerationConfig
    from transformers.utils.hub import convert_file_size_to_int

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    ckpt = inspect(src_dir, allow_pickle=allow_pickle)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; convert writes into an empty directory")
    others = sorted({d for d in ckpt.dtypes.values() if d != dtype})
    if others:
        log.info("import: %s weights cast to %s (convert.dtype)", "/".join(others), dtype)
    _write_weights(ckpt, out_dir, dtype, convert_file_size_to_int(max_shard_size))
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
    (out_dir / "config.json").write_text(json.dumps(_out_config(ckpt.config, dtype), indent=2,
                                                    sort_keys=True))
    if (src_dir / "generation_config.json").is_file():
        shutil.copyfile(src_dir / "generation_config.json", out_dir / "generation_config.json")
    else:
        GenerationConfig(bos_token_id=ckpt.config.get("bos_token_id"),
                         eos_token_id=ckpt.config.get("eos_token_id")).save_pretrained(out_dir)
    return ckpt


def run(config, out_dir: Path, src_dir: Path) -> dict:
    """The convert stage on an HF-format input (steps/convert.py dispatches here)."""
    from steps.checks import check_model
    from steps.safetensors_io import read_header

    t0 = time.time()
    ckpt = import_hf(src_dir, out_dir, dtype=config.dtype, max_shard_size=config.max_shard_size,
                     allow_pickle=config.allow_pickle)
    seconds = time.time() - t0
    if config.context_length not in (None, ckpt.config.get("max_position_embeddings")):
        # an HF config.json states its own context; conf/model/'s is for Meta's params.json
        log.warning("convert.context_length %s ignored: %s says max_position_embeddings %s",
                    config.context_length, Path(src_dir) / "config.json",
                    ckpt.config.get("max_position_embeddings"))
    v = check_model(out_dir)
    infos = [i for f in Path(out_dir).glob("*.safetensors") for i in read_header(f).values()]
    size = sum(i.nbytes for i in infos)
    return {"seconds": seconds, "bytes": size, "MB_per_s": size / 1e6 / max(seconds, 1e-9),
            "file_bytes": sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors")),
            "params": sum(math.prod(i.shape) for i in infos), "tensors": len(infos),
            "vocab_size": v.embed_rows, "n_layers": ckpt.config["num_hidden_layers"],
            "hidden_size": ckpt.config["hidden_size"], "n_shards_in": len(ckpt.files),
            "source_format": "hf-pickle" if ckpt.pickled else "hf-safetensors",
            "source_dtype": "/".join(sorted(set(ckpt.dtypes.values())))}
