"""merge: fold a base model and LoRA adapters, in order, into one model (HF safetensors or Meta).

The recipe's multi-LoRA merge (Chinese-LLaMA-Alpaca `merge_llama_with_chinese_lora_low_mem.py`):
for each base tensor and each adapter in the given order,
  - a full tensor the adapter saved (modules_to_save: embed_tokens, lm_head) replaces it outright,
    which is how 32000 rows become 49953 (pre-training) then 49954 (SFT, + [PAD]);
  - a LoRA pair adds W += T(B @ A) * scale, scale = alpha / r (alpha / sqrt(r) with rslora),
    T = transpose iff fan_in_fan_out, computed in fp32 and cast back once at the end.
Order matters: the last adapter's embeddings and tokenizer win, and an SFT adapter is only valid on
the base + pre-training weights it was trained on.

Streaming: the base is read one tensor at a time from its safetensors, in any number of shards
(the recipe's low-memory merge finds only pytorch_model-*.bin; docs/recipe.md, "Merge bases are
safetensors, in any number of shards"), and each merged tensor is written straight into its
output shard; only the adapters (small, apart from their embeddings) stay in memory. Everything
is validated from file headers BEFORE any weight is written: shapes against the base, vocabulary
order, files, adapter type, recorded base digest.

Other strategies ("linear", "cat", "ties", "dare_linear", "dare_ties") combine adapters that share
one base through peft's `add_weighted_adapter`; they load the whole model (peft needs it) and
refuse adapters with modules_to_save, as peft does.

Meta output (`output_format="meta"`) goes through steps.meta (inverse key map and rotary
permutation, consolidated.NN.pth per model-parallel rank); torch.save of a rank needs that rank's
tensors in memory, the same peak as the recipe's pth path.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import pydantic
from pydantic import ConfigDict, Field

from steps import MetricsCallback, Stage
from steps.checks import VocabMismatch, check_adapter, check_model, tokenizer_size
from steps.safetensors_io import ST_DTYPES, StreamingSafetensorsWriter, read_header
from steps.tokenizer import TOKENIZER_FILES, carries_tokenizer, tokenizer_source

VERSION = "2"
STAGE = Stage()

Strategy = Literal["sequential", "linear", "cat", "ties", "dare_linear", "dare_ties"]
OutputFormat = Literal["hf", "meta"]
DTypeName = Literal["float32", "float16", "bfloat16"]


class Config(pydantic.BaseModel):
    """merge stage: fold base + LoRA adapters, in the order given, into one model. The adapters
    and their order come from the flow (base-zh + [pt, sft]), not from here."""
    model_config = ConfigDict(extra="forbid")

    output_format: OutputFormat = Field("hf", description=(
        "\"hf\": sharded safetensors + index, config.json, tokenizer files. \"meta\": "
        "consolidated.NN.pth per model-parallel rank, params.json, checklist.chk, tokenizer.model"))
    strategy: Strategy = Field("sequential", description=(
        "\"sequential\": the recipe's merge, adapter by adapter (W += B·A·alpha/r; "
        "modules_to_save replace embed_tokens/lm_head; the last adapter's vocabulary and "
        "tokenizer win). Streams the base tensor by tensor. \"linear\" | \"cat\" | \"ties\" | "
        "\"dare_linear\" | \"dare_ties\": peft's add_weighted_adapter for adapters on one base "
        "without modules_to_save (loads the whole model)"))
    weights: list[float] | None = Field(None, description=(
        "weighted strategies only: one weight per adapter (null = 1.0 each)"))
    density: float | None = Field(None, description=(
        "ties / dare_*: fraction of each delta's entries kept, in (0, 1]"))
    dtype: DTypeName | None = Field(None, description=(
        "output dtype: null keeps each base tensor's dtype; float32 | float16 | bfloat16. Math is "
        "fp32"))
    max_shard_size: str = Field("2GB", description=(
        "HF output shard size (transformers syntax: \"2GB\", \"500MB\")"))
    meta_n_shards: int = Field(1, description=(
        "Meta output: model-parallel ranks (LLaMA 7B 1, 13B 2, 33B 4, 65B 8)"))
    seed: int = Field(0, description="dare_* drop delta entries at random; seeded so a rerun "
                                     "gives the same bytes")
    check_base_digest: bool = Field(True, description=(
        "refuse adapters whose training_info.json records another base (config + tokenizer "
        "digest) or other adapters merged in before them: a LoRA only merges onto the base it "
        "was trained on. false only when you know the weights are the same"))


DATA_FIELDS: tuple[str, ...] = ()

# safetensors dtype names <-> torch dtypes (the header format spells them this way)
_PEFT_PREFIX = "base_model.model."
# Rows of these tensors are the vocabulary: an adapter may grow them, never change their width.
_VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
_WEIGHTED = ("linear", "cat", "ties", "dare_linear", "dare_ties")


class MergeError(ValueError):
    """The adapters cannot be merged onto this base as given (raised before any weight is written)."""


# --------------------------------------------------------------------------------------------
# Adapters: read config + weights, understand peft's saved key names
# --------------------------------------------------------------------------------------------

@dataclass
class LoraPair:
    A: object            # torch.Tensor (r, in)
    B: object            # torch.Tensor (out, r)
    scale: float
    fan_in_fan_out: bool

    def delta(self):
        """T(B @ A) * scale in fp32 (peft's LoraLayer.get_delta_weight)."""
        d = self.B.float() @ self.A.float()
        return (d.T if self.fan_in_fan_out else d) * self.scale

    def add_to(self, acc) -> None:
        """acc += delta, in place and without materialising the delta (acc is fp32)."""
        A, B = self.A.float(), self.B.float()
        if self.fan_in_fan_out:
            acc.addmm_(A.T, B.T, alpha=self.scale)
        else:
            acc.addmm_(B, A, alpha=self.scale)


@dataclass
class Adapter:
    path: Path
    config: dict
    lora: dict[str, LoraPair] = field(default_factory=dict)   # base tensor name -> pair
    replace: dict[str, object] = field(default_factory=dict)  # base tensor name -> full tensor
    has_tokenizer: bool = False

    @property
    def targets(self) -> list[str]:
        return sorted({k.rsplit(".", 2)[-2] for k in self.lora})

    def summary(self) -> dict:
        ranks = sorted({p.A.shape[0] for p in self.lora.values()})
        return {"r": self.config.get("r"), "lora_alpha":
                self.config.get("lora_alpha"), "ranks": ranks, "use_rslora":
                bool(self.config.get("use_rslora")), "targets": self.targets,
                "lora_tensors": len(self.lora), "replaced": sorted(self.replace),
                "tokenizer": self.has_tokenizer}


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_lora_config(path: Path, cfg: dict) -> None:
    if cfg.get("peft_type") != "LORA":
        raise MergeError(
            f"{path}/adapter_config.json: peft_type={cfg.get('peft_type')!r} is not supported; "
            "the merge stage folds LoRA adapters (peft_type 'LORA') only")
    unsupported = {
        "use_dora": "DoRA (weight-decomposed LoRA) rescales the merged weight by a magnitude vector",
        "lora_bias": "LoRA bias terms",
        "layer_replication": "layer replication",
        "trainable_token_indices": "trainable token deltas",
        "target_parameters": "LoRA on nn.Parameter targets",
        "alora_invocation_tokens": "activated LoRA (cannot be merged)",
        "use_qalora": "QA-LoRA",
        "use_bdlora": "BD-LoRA",
    }
    bad = [f"{k} ({why})" for k, why in unsupported.items() if cfg.get(k)]
    if bad:
        raise MergeError(f"{path}/adapter_config.json: unsupported adapter features: "
                         f"{', '.join(bad)}; retrain without them or merge with peft directly")
    if cfg.get("use_rslora") and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        raise MergeError(f"{path}/adapter_config.json: use_rslora with rank_pattern/alpha_pattern "
                         "is ambiguous (peft refuses it too)")


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read a peft LoRA adapter directory: adapter_config.json + adapter_model.safetensors.

    peft 0.21 saves (get_peft_model_state_dict, adapter name removed):
      base_model.model.<module>.lora_A.weight / lora_B.weight       LoRA pairs
      base_model.model.<module>.weight                              modules_to_save (the trained
                                                                    copy) or a resized embedding
      base_model.model.<module>.modules_to_save.weight              the same trained copy again and
      base_model.model.<module>.original_module.weight              the base's, both saved when the
                                                                    vocabulary was resized
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not a peft adapter directory "
                                "(save it with PeftModel.save_pretrained)")
    if not weights_file.is_file():
        hint = " (a legacy adapter_model.bin is there: re-save it as safetensors)" if (
            path / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{weights_file} not found{hint}")
    cfg = json.loads(cfg_file.read_text())
    _check_lora_config(path, cfg)

    adapter = Adapter(path=path, config=cfg, has_tokenizer=carries_tokenizer(path))
    state = load_file(str(weights_file))
    for key in sorted(state):
        if not key.startswith(_PEFT_PREFIX):
            raise MergeError(f"{weights_file}: key {key!r} lacks peft's {_PEFT_PREFIX!r} prefix; "
                             "not an adapter saved by peft for a causal LM")
        name = key[len(_PEFT_PREFIX):]
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            if name.endswith(".lora_B.weight"):
                continue
            module = name[: -len(".lora_A.weight")]
            b_key = f"{_PEFT_PREFIX}{module}.lora_B.weight"
            if b_key not in state:
                raise MergeError(f"{weights_file}: {key} has no matching {b_key}")
            A, B = state[key], state[b_key]
            r = A.shape[0]
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            adapter.lora[f"{module}.weight"] = LoraPair(A, B, scale, bool(cfg.get("fan_in_fan_out")))
        elif name.endswith((".original_module.weight", ".modules_to_save.weight")):
            continue   # the base's copy and a duplicate of the trained copy (see docstring)
        elif re.search(r"\.(lora_\w+|magnitude\w*|trainable_tokens\w*)(\.|$)", name) or \
                name.endswith(".bias"):
            raise MergeError(f"{weights_file}: tensor {key!r} belongs to an adapter kind this "
                             "merge does not support (only LoRA on Linear layers and "
                             "modules_to_save are folded)")
        else:
            adapter.replace[name] = state[key]
    # unreferenced lora_B keys
    for key in state:
        if key.endswith(".lora_B.weight") and key.replace(".lora_B.", ".lora_A.") not in state:
            raise MergeError(f"{weights_file}: {key} has no matching lora_A")
    if not adapter.lora and not adapter.replace:
        raise MergeError(f"{weights_file}: no LoRA or modules_to_save tensors found")
    return adapter


# --------------------------------------------------------------------------------------------
# Base model: tensor names, shapes and dtypes from safetensors headers (no weights read)
# --------------------------------------------------------------------------------------------

@dataclass
class BaseTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str          # torch dtype name


def read_base_index(base_dir: Path) -> list[BaseTensor]:
    """Every tensor of a safetensors HF model, in file order (index order when sharded)."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}/config.json not found: the base must be a Hugging "
                                "Face model directory (run the convert/vocab stage)")
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        files = [base_dir / f for f in files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shards: {missing}")
    else:
        files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        legacy = sorted(base_dir.glob("pytorch_model*.bin"))
        raise FileNotFoundError(
            f"{base_dir}: no *.safetensors weights" + (
                f" (found {len(legacy)} legacy pytorch_model*.bin: re-save the base with "
                "save_pretrained, which writes safetensors)" if legacy else ""))
    tensors: list[BaseTensor] = []
    for f in files:
        for name, info in read_header(f).items():
            tensors.append(BaseTensor(name, f, info.shape, ST_DTYPES[info.dtype]))
    names = [t.name for t in tensors]
    if len(names) != len(set(names)):
        raise MergeError(f"{base_dir}: a tensor name appears in more than one shard")
    return tensors


# --------------------------------------------------------------------------------------------
# Plan + validation (headers and adapter tensors only)
# --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    base: list[BaseTensor]
    shapes: dict[str, tuple[int, ...]]          # final shape per tensor
    vocab_rows: int
    tokenizer_dir: Path                         # last adapter carrying a tokenizer, else the base
    lora_applied: int
    replaced: int


def _vocab_rows(shapes: dict[str, tuple[int, ...]]) -> int:
    rows = [s[0] for n, s in shapes.items() if n.endswith("embed_tokens.weight")]
    if not rows:
        raise MergeError("the base has no embed_tokens.weight tensor; not a LLaMA-family model")
    return rows[0]


def _check_provenance(base_dir: Path, adapters: list[Adapter], i: int) -> None:
    """An adapter is only valid on the base (and earlier adapters) it was trained on
    (docs/recipe.md, "An adapter merges only onto the base it was trained on").

    The training stages record, in training_info.json, `base_digest` (steps.digests.base_digest:
    config.json + tokenizer files of the model dir) and `adapters_applied` (the adapters folded
    into that base before training, in order, with steps.digests.adapter_digest). Adapters
    without the file (trained elsewhere) are not checked."""
    from steps.digests import adapter_digest, base_digest

    ad = adapters[i]
    info_file = ad.path / "training_info.json"
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text())
    recorded = info.get("base_digest") or info.get("base_model_digest")
    if recorded and recorded != base_digest(base_dir):
        raise MergeError(
            f"{ad.path}: trained on a base with digest {recorded[:12]}…,"
            f" but {base_dir} has digest {base_digest(base_dir)[:12]}… (config.json + tokenizer "
            "files); a LoRA is only valid on the base it was trained on. Pass that "
            "base, or set check_base_digest=false if the weights are known to be the same")
    applied = info.get("adapters_applied")
    if applied is not None:
        want = [a["digest"] for a in applied]
        have = [adapter_digest(a.path) for a in adapters[:i]]
        if want != have:
            raise MergeError(
                f"{ad.path}: was trained on the base with the adapters {[w[:12] for w in want]} "
                f"merged in first, but here it comes after {[str(a.path) for a in adapters[:i]]} "
                f"(adapters {[h[:12] for h in have]}). "
                "Give the adapters in training order (e.g. pre-training, then SFT), each after "
                "the ones it was trained on")


def plan_merge(base_dir: Path, adapters: list[Adapter], check_base_digest: bool = True) -> Plan:
    """Walk the adapters in order over the base's tensor shapes; raise before anything is written."""
    base_dir = Path(base_dir)
    base = read_base_index(base_dir)
    shapes = {t.name: t.shape for t in base}
    n_lora = n_replace = 0
    for i, ad in enumerate(adapters):
        rows = _vocab_rows(shapes)
        check_adapter(ad.path, rows)   # its own tokenizer vs its embeddings; never shrink the vocab
        if check_base_digest:
            _check_provenance(base_dir, adapters, i)
        for name, t in ad.replace.items():
            if name not in shapes:
                raise MergeError(f"{ad.path}: saved module {name!r} does not exist in the base "
                                 f"{base_dir} (trained on another architecture?)")
            new, cur = tuple(t.shape), shapes[name]
            grows_vocab = name.endswith(_VOCAB_TENSORS) and new[1:] == cur[1:]
            if new != cur and not grows_vocab:
                raise MergeError(f"{ad.path}: module {name!r} has shape {list(new)} in the adapter "
                                 f"but {list(cur)} in the base {base_dir}: the adapter was trained "
                                 "on a different base")
            shapes[name] = new
            n_replace += 1
        grown = _vocab_rows(shapes)
        if grown > rows and not ad.has_tokenizer:
            raise MergeError(f"{ad.path}: grows the vocabulary from {rows} to {grown} rows but "
                             "carries no tokenizer, so the merged model would ship one that does "
                             "not cover its embeddings: copy the tokenizer it was trained "
                             "with into the adapter directory")
        for name, pair in ad.lora.items():
            if name not in shapes:
                raise MergeError(f"{ad.path}: LoRA target {name!r} does not exist in the base "
                                 f"{base_dir} (trained on another architecture?)")
            out_f, in_f = pair.B.shape[0], pair.A.shape[1]
            want = (in_f, out_f) if pair.fan_in_fan_out else (out_f, in_f)
            if pair.A.shape[0] != pair.B.shape[1]:
                raise MergeError(f"{ad.path}: {name}: lora_A {list(pair.A.shape)} and lora_B "
                                 f"{list(pair.B.shape)} disagree in rank")
            if tuple(shapes[name]) != want:
                raise MergeError(f"{ad.path}: module {name!r}: the adapter's delta B@A has shape "
                                 f"{list(want)} but the base {base_dir} has {list(shapes[name])}: "
                                 "the adapter was trained on a different base")
            n_lora += 1
    rows = _vocab_rows(shapes)
    head = [s[0] for n, s in shapes.items() if n.endswith("lm_head.weight")]
    if head and head[0] != rows:
        raise MergeError(f"after merging, embed_tokens has {rows} rows but lm_head {head[0]}: an "
                         "adapter saved only one of them; save both with modules_to_save="
                         "['embed_tokens', 'lm_head']")
    tok_dir = tokenizer_source(base_dir, [ad.path for ad in adapters])
    tok_len, _ = tokenizer_size(tok_dir)
    if tok_len > rows:
        raise VocabMismatch(f"{tok_dir}: the tokenizer the merged model would ship has {tok_len} "
                            f"tokens but the merged embeddings only {rows} rows")
    return Plan(base, shapes, rows, tok_dir, n_lora, n_replace)


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------

def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def iter_merged(plan: Plan, adapters: list[Adapter], dtype: str | None = None) -> Iterator:
    """(name, merged tensor) for every base tensor, in base order, reading one tensor at a time.

    The safetensors file is opened per tensor so its memory map (which counts in RSS once its
    pages are touched) never spans more than the tensor being merged."""
    from safetensors import safe_open

    for bt in plan.base:
        out_dtype = _torch_dtype(dtype or bt.dtype)
        # The last adapter that replaces this tensor outright (modules_to_save) sets its start;
        # the base's copy is then never read (it is the largest tensor: the embedding).
        start = max((i for i, ad in enumerate(adapters) if bt.name in ad.replace), default=None)
        if start is None:
            with safe_open(str(bt.file), framework="pt") as st:
                w = st.get_tensor(bt.name)
            later = adapters
        else:
            w = adapters[start].replace[bt.name]
            later = adapters[start + 1:]
        pairs = [ad.lora[bt.name] for ad in later if bt.name in ad.lora]
        if pairs:
            # fp32 accumulation over every adapter, one rounding at the end
            acc = w.float() if start is None else w.float().clone()
            for pair in pairs:
                pair.add_to(acc)
            w = acc
        yield bt.name, w.to(out_dtype)


def _write_hf_metadata(base_dir: Path, out_dir: Path, vocab_rows: int, tokenizer_dir: Path,
                       dtype: str | None) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    # docs/recipe.md, "Vocabulary, embeddings and config must agree"
    config["vocab_size"] = vocab_rows
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out_dir / "generation_config.json")
    _copy_tokenizer(tokenizer_dir, out_dir)


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copyfile(tokenizer_dir / f, out_dir / f)


def _save_meta(state: dict, base_dir: Path, out_dir: Path, vocab_rows: int, tokenizer_dir: Path,
               n_shards: int) -> None:
    try:
        from steps.meta import hf_to_meta, params_from_hf_config, save_meta_checkpoint
    except ImportError as e:
        raise MergeError("output_format='meta' needs steps/meta.py (hf_to_meta, "
                         f"save_meta_checkpoint), which is not available: {e}") from e
    config = json.loads((base_dir / "config.json").read_text())
    # params_from_hf_config keeps multiple_of/ffn_dim_multiplier so the FFN width round-trips
    params = params_from_hf_config(config, vocab_rows)
    meta_state = hf_to_meta(state, params)
    tok = tokenizer_dir / "tokenizer.model"
    save_meta_checkpoint(meta_state, params, out_dir, n_shards,
                         tokenizer_model=tok if tok.is_file() else None)


def _digest(base_dir: Path) -> str:
    from steps.digests import base_digest

    return base_digest(base_dir)


def _check_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; the merge writes into an empty directory")
    return out_dir


def merge_adapters(base_dir: Path, adapter_dirs: list[Path], out_dir: Path,
                   output_format: OutputFormat = "hf", strategy: Strategy = "sequential",
                   dtype: DTypeName | None = None, max_shard_size: str | int = "2GB",
                   meta_n_shards: int = 1, weights: list[float] | None = None,
                   density: float | None = None, seed: int = 0,
                   check_base_digest: bool = True) -> Path:
    """Merge `adapter_dirs` (in this order) into `base_dir`; write the model into `out_dir`.

    Writes merge_info.json (order, each adapter's digest/r/alpha/targets, tensors merged)
    next to the weights. Returns out_dir."""
    base_dir = Path(base_dir)
    adapter_dirs = [Path(d) for d in adapter_dirs]
    if not adapter_dirs:
        raise MergeError("no adapters given: list at least one adapter directory")
    if output_format not in ("hf", "meta"):
        raise MergeError(f"output_format={output_format!r}: use 'hf' or 'meta'")
    if strategy != "sequential" and strategy not in _WEIGHTED:
        raise MergeError(f"strategy={strategy!r}: use 'sequential' or one of {_WEIGHTED}")
    from transformers.utils.hub import convert_file_size_to_int

    max_shard_bytes = convert_file_size_to_int(max_shard_size)
    adapters = [load_adapter(d) for d in adapter_dirs]
    plan = plan_merge(base_dir, adapters, check_base_digest=check_base_digest)

    if strategy == "sequential":
        out_dir = _check_out_dir(out_dir)
        merged = iter_merged(plan, adapters, dtype)
    else:
        _check_weighted(adapters, strategy, weights, density)
        out_dir = _check_out_dir(out_dir)
        merged = _weighted_merged(base_dir, adapters, plan, strategy,
                                  weights or [1.0] * len(adapters), density, seed, dtype)

    if output_format == "hf":
        specs = [(bt.name, plan.shapes[bt.name], dtype or bt.dtype) for bt in plan.base]
        writer = StreamingSafetensorsWriter(out_dir, specs, max_shard_bytes)
        for name, tensor in merged:
            writer.write(name, tensor)
        files = writer.close()
        _write_hf_metadata(base_dir, out_dir, plan.vocab_rows, plan.tokenizer_dir, dtype)
        check_model(out_dir)   # tokenizer <= config vocab_size == embed rows == lm_head rows
    else:
        _save_meta(dict(merged), base_dir, out_dir, plan.vocab_rows, plan.tokenizer_dir,
                   meta_n_shards)
        files = sorted(out_dir.glob("consolidated.*.pth"))

    # Base and adapters by content (steps.digests' base_digest / adapter_digest), never by
    # path: the same merge in another workspace (or temp dir) must give the same bytes.
    from steps.digests import adapter_digest

    digests = [adapter_digest(d) for d in adapter_dirs]
    info = {
        "order": digests,
        "strategy": strategy,
        "weights": weights if strategy != "sequential" else None,
        "density": density if strategy != "sequential" else None,
        "base_digest": _digest(base_dir),
        "adapters": [{"digest": d, **a.summary()} for d, a in zip(digests, adapters)],
        "tensors": len(plan.base),
        "lora_deltas_applied": plan.lora_applied,
        "tensors_replaced": plan.replaced,
        "vocab_size": plan.vocab_rows,
        "tokenizer_from": next((d for d, a in zip(digests, adapter_dirs)
                                if a == plan.tokenizer_dir), "base"),
        "output_format": output_format,
        "files": [f.name for f in files],
        "bytes": sum(f.stat().st_size for f in files),
    }  # no timings here: the same merge must give the same bytes (the artifact digest)
    (out_dir / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# Weighted strategies through peft
# --------------------------------------------------------------------------------------------

def _check_weighted(adapters: list[Adapter], strategy: str, weights, density) -> None:
    for ad in adapters:
        if ad.replace or ad.config.get("modules_to_save"):
            raise MergeError(
                f"{ad.path}: carries modules_to_save/full tensors ({sorted(ad.replace) or ad.config.get('modules_to_save')}); "
                f"peft's add_weighted_adapter cannot combine those ('{strategy}'): use "
                "strategy='sequential' (the recipe's order-dependent merge)")
    if weights is not None and len(weights) != len(adapters):
        raise MergeError(f"weights has {len(weights)} values for {len(adapters)} adapters")
    if strategy in ("ties", "dare_linear", "dare_ties") and not (density and 0 < density <= 1):
        raise MergeError(f"strategy='{strategy}' needs density in (0, 1], got {density!r}")
    if strategy == "linear" and len({ad.config.get("r") for ad in adapters}) > 1 or \
            strategy == "linear" and len({p.A.shape[0] for ad in adapters for p in ad.lora.values()}) > 1:
        raise MergeError("strategy='linear' needs adapters of equal rank (peft's rule); use 'cat'")
    targets = {tuple(sorted(ad.lora)) for ad in adapters}
    if len(targets) > 1:
        raise MergeError("weighted strategies need adapters on the same target modules: "
                         + "; ".join(f"{ad.path}: {ad.targets}" for ad in adapters))


def weighted_merge_model(base_dir: Path, adapter_dirs: list[Path], strategy: str,
                         weights: list[float], density: float | None, seed: int = 0):
    """peft's add_weighted_adapter(...) then merge_and_unload(), on an fp32 base: the model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], adapter_dirs[1:]):
        peft_model.load_adapter(d, adapter_name=name)
    torch.manual_seed(seed)   # dare_* prune at random
    kwargs = {"density": density} if density is not None else {}
    peft_model.add_weighted_adapter(names, list(weights), "merged", combination_type=strategy,
                                    **kwargs)
    peft_model.set_adapter("merged")
    return peft_model.merge_and_unload()


def _weighted_merged(base_dir, adapters, plan, strategy, weights, density, seed, dtype):
    model = weighted_merge_model(base_dir, [a.path for a in adapters], strategy, weights,
                                 density, seed)
    state = model.state_dict()
    for bt in plan.base:
        yield bt.name, state[bt.name].to(_torch_dtype(dtype or bt.dtype))


# --------------------------------------------------------------------------------------------
# Stage protocol
# --------------------------------------------------------------------------------------------

def run(config: Config, out_dir: Path, *, on_metrics: MetricsCallback | None = None,
        base: Path, adapters: list[Path]) -> dict:
    t0 = time.time()
    out = merge_adapters(base, list(adapters), out_dir, output_format=config.output_format,
                         strategy=config.strategy, dtype=config.dtype,
                         max_shard_size=config.max_shard_size, meta_n_shards=config.meta_n_shards,
                         weights=config.weights, density=config.density, seed=config.seed,
                         check_base_digest=config.check_base_digest)
    info = json.loads((Path(out) / "merge_info.json").read_text())
    # artifacts live at artifacts/<stage>/<key>: "pretrain/<key>,sft/<key>" says which is which
    result = {"order": ",".join(f"{Path(p).parent.name}/{Path(p).name}" for p in adapters),
              "n_adapters": len(info["order"]), "strategy": info["strategy"],
              "vocab_size": info["vocab_size"], "tensors": info["tensors"],
              "lora_deltas_applied": info["lora_deltas_applied"],
              "tensors_replaced": info["tensors_replaced"], "output_format": info["output_format"],
              "bytes": info["bytes"], "seconds": round(time.time() - t0, 3)}
    if on_metrics:
        on_metrics({"seconds": result["seconds"], "bytes": info["bytes"]}, 0)
    return result
