"""Quantize stage: HF LLaMA → GGUF (our exporter, gguf's writer) → llama.cpp's own quantizer.

Two entry points, as in llama.cpp's own flow (`convert_hf_to_gguf.py` then `llama-quantize`):
- `export_gguf(model_dir, out_path, qtype)` streams the safetensors weights tensor by tensor into
  a GGUF file (f32/f16/bf16, or q8_0/q4_0 with gguf's numpy quantizers, which match ggml's
  reference quantizers), with the llama metadata, the vocabulary (SentencePiece for LLaMA-1/2 and
  Chinese-LLaMA; Llama 3's byte-level BPE with its merges, pre-tokenizer and chat template) and
  the rotary layout llama.cpp expects (Llama 3.1's scaled rope as a `rope_freqs` tensor);
- `quantize_gguf(src, out, qtype)` runs `llama_model_quantize` (llama-cpp-python) on an f16/f32
  GGUF for every llama.cpp type (K-quants can only come from there: gguf cannot make them).

Failure modes of the recipe handled here (sections of docs/recipe.md): "K-quants on a vocabulary
not divisible by 256" (only a row length, ne0 = hidden size, must be a multiple of the block
size; llama.cpp falls back per tensor and `quant_info.json` records what each tensor got); "The
tokenizer must be the one the model was trained with" (a tokenizer that does not match the
embedding rows is refused before anything is written); "Added tokens and padded vocabularies
reach llama.cpp" (added tokens such as [PAD], and the token list padded up to the embedding rows).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from steps import Stage
from steps.checks import check_model
from steps.safetensors_io import TensorInfo, read_header

VERSION = "2"   # 2: a SentencePiece model's chat template is exported


class FlowKeys(BaseModel):
    """The quantize key the flow reads: it runs the stage once per type, each cached on its own."""
    types: list[str] = Field(["f16", "q8_0", "q4_0", "q4_k_m"], description=(
        "Types the lifecycle makes, as llama-quantize names them (lower case). f16 is always "
        "made, exported from the merged HF model; every other type is quantized by llama.cpp "
        "from that f16 GGUF. <type>@imatrix (e.g. q4_k_m@imatrix), and the IQ types and q2_k_s "
        "always, use the importance matrix the imatrix stage makes"))


STAGE = Stage(flow=FlowKeys)
DATA_FIELDS = ()
CACHE_EXCLUDE = ("nthread",)  # threads change the speed, not the bytes

# Written by our exporter straight from the HF weights.
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# Made by llama.cpp's quantizer from an f16/bf16/f32 GGUF (names as `llama-quantize` takes them,
# lower case). Q4_K_M/Q5_K_M give Q6_K to attn_v/ffn_down of some layers and output.weight is Q6_K
# for every type but Q8_0 (llama.cpp's llama_tensor_get_type).
LLAMA_CPP_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0",
                   "q4_1", "q3_k_m", "q3_k_s", "q3_k_l", "q2_k", "q2_k_s", "iq4_xs", "iq4_nl",
                   "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs",
                   "iq1_m", "iq1_s")
ALL_TYPES = tuple(dict.fromkeys(EXPORT_TYPES + LLAMA_CPP_TYPES))
# `<type>@imatrix`: quantized with the run's importance matrix (the imatrix stage). The IQ types
# and Q2_K_S always are: llama.cpp refuses the smallest without one, and the others are made for
# it, so a user listing `iq3_m` gets the file llama.cpp users mean by it.
IMATRIX_SUFFIX = "@imatrix"
ALWAYS_IMATRIX = tuple(q for q in LLAMA_CPP_TYPES if q.startswith("iq") or q == "q2_k_s")

# Rows are quantized this many at a time so a 32000×4096 embedding never needs more than a few
# hundred MB of temporaries on top of its output.
_ROWS_PER_CHUNK = 2048
# A vocabulary padded to a multiple of 64/128/256 leaves fewer spare rows than this; more spare
# rows than tokens means the wrong (smaller) tokenizer was shipped with the model (the
# original 32000-piece LLaMA tokenizer next to a 49954-row Chinese model; docs/recipe.md, "The
# tokenizer must be the one the model was trained with").
_MAX_VOCAB_PADDING = 256


class Config(BaseModel):
    """quantize stage: HF model -> GGUF (our exporter) -> llama.cpp's quantizer. The flow makes
    one artifact per type, each cached on its own: f16 is exported from the merged HF model;
    every other type is quantized by llama.cpp from that f16 GGUF. Rows not a multiple of a
    type's block (256 for K-quants, 32 otherwise) fall back per tensor (e.g. Q4_K -> Q5_0);
    quant_info.json records the type every tensor got."""
    model_config = ConfigDict(extra="forbid")

    qtype: str = Field("f16", description=(
        "the type of one stage run (the flow sets it for each entry of `types`). Exported from "
        "HF: f32, f16, bf16 (q8_0 and q4_0 can also be exported directly with gguf's numpy "
        "quantizers: one type for every 2-D tensor); by llama.cpp's quantizer: q8_0, q6_k, "
        "q5_k_m, q5_k_s, q5_0, q5_1, q4_k_m, q4_k_s, q4_0, q4_1, q3_k_m, q3_k_s, q3_k_l, q2_k, "
        "and with the importance matrix (the imatrix stage's) q2_k_s and the IQ types (iq4_xs, "
        "iq4_nl, iq3_m, iq3_s, iq3_xs, iq3_xxs, iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s); "
        "<type>@imatrix: any llama.cpp type with it"))
    nthread: int = Field(0, description="llama.cpp quantizer threads; 0 = all cores")
    pure: bool = Field(False, description=(
        "llama-quantize --pure: one type for every 2-D tensor (no Q6_K output.weight, no K-quant "
        "mixtures). The default false gives the files llama.cpp users (and the "
        "Chinese-LLaMA-Alpaca table) use"))

    @field_validator("qtype")
    @classmethod
    def _known_type(cls, v: str) -> str:
        return normalize_qtype(v)


def normalize_qtype(qtype: str) -> str:
    q = str(qtype).strip().lower()
    base = q.removesuffix(IMATRIX_SUFFIX)
    if base not in ALL_TYPES:
        raise ValueError(f"unknown quantization type {qtype!r}; valid types: {', '.join(ALL_TYPES)}"
                         f" (a llama.cpp type with {IMATRIX_SUFFIX} uses the importance matrix)")
    if base != q and base not in LLAMA_CPP_TYPES:
        raise ValueError(f"{qtype!r}: {base} is exported from the HF weights, with no importance "
                         f"matrix; {IMATRIX_SUFFIX} goes with llama.cpp's types: "
                         f"{', '.join(LLAMA_CPP_TYPES)}")
    if base in ALWAYS_IMATRIX:
        return base   # the importance matrix is implied
    return q


def split_qtype(qtype: str) -> tuple[str, bool]:
    """("q4_k_m", True) for "q4_k_m@imatrix"; the IQ types use the importance matrix always."""
    q = normalize_qtype(qtype)
    base = q.removesuffix(IMATRIX_SUFFIX)
    return base, base != q or base in ALWAYS_IMATRIX


def uses_imatrix(qtype: str) -> bool:
    return split_qtype(qtype)[1]


# --------------------------------------------------------------------------------------------
# HF → GGUF export


def _read_config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch != "LlamaForCausalLM" and config.get("model_type") != "llama":
        raise ValueError(f"{model_dir}/config.json: architecture {arch!r} is not LlamaForCausalLM; "
                         "this exporter writes llama GGUF files only")
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    if head_dim * n_head != config["hidden_size"]:
        raise ValueError(f"{model_dir}/config.json: head_dim {head_dim} × {n_head} heads != "
                         f"hidden_size {config['hidden_size']}; llama.cpp's llama architecture "
                         "needs head_dim = hidden_size / num_attention_heads")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{model_dir}/config.json: attention_bias/mlp_bias are set; LLaMA has no "
                         "biases and this exporter does not write them")
    return config


def _rope(config: dict) -> tuple[float, dict | None]:
    """(freq base, scaling dict or None) from transformers 5 `rope_parameters` or older keys."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling {kind!r} in config.json is not supported by this exporter "
                             "(only 'linear', as in Chinese-LLaMA-Alpaca-2-16K, and Llama 3.1's "
                             "'llama3')")
    return float(theta), scaling


def _llama3_rope_factors(config: dict, theta: float, scaling: dict):
    """Llama 3.1's per-frequency rope divisors, which llama.cpp reads from a `rope_freqs` tensor
    (it has no llama3 scaling type): 1 for wavelengths shorter than the original context /
    high_freq_factor, `factor` for those longer than context / low_freq_factor, a smooth blend
    between. The arithmetic is llama.cpp's converter's (float32 frequencies) so the tensor is
    bit-identical to the one it writes."""
    import math

    import torch

    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _safetensors_index(model_dir: Path) -> dict[str, tuple[Path, TensorInfo]]:
    """{tensor name: (its file, its header entry)} over the model's *.safetensors files."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files; save the model with "
                                "save_pretrained(safe_serialization=True) (the convert and merge "
                                "stages do)")
    return {name: (f, info) for f in files for name, info in read_header(f).items()}


def _vocab(model_dir: Path, n_rows: int) -> dict:
    """The SentencePiece vocabulary as llama.cpp wants it (like convert_hf_to_gguf's
    _create_vocab_sentencepiece): piece types map 1:1 onto gguf.TokenType; HF added tokens beyond
    the pieces (e.g. Chinese-Alpaca's [PAD]) become USER_DEFINED (score -1000) so llama.cpp matches
    them in text as the HF tokenizer does; ids up to the embedding rows are padded with [PAD{i}]
    UNUSED entries (docs/recipe.md, "Added tokens and padded vocabularies reach llama.cpp")."""
    from steps.tokenizer import load_sp_proto

    sp_file = model_dir / "tokenizer.model"
    if not sp_file.is_file():
        raise FileNotFoundError(
            f"{sp_file} not found: llama.cpp needs the SentencePiece tokenizer.model the model was "
            "trained with; copy it (the vocab/merge stage output carries it) into the model dir")
    proto = load_sp_proto(sp_file)
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]

    added: dict[int, str] = {}
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        for t in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", []):
            added[int(t["id"])] = t["content"]
    atj = model_dir / "added_tokens.json"   # the Chinese-LLaMA-Alpaca (transformers 4.28) layout
    if atj.is_file():
        added.update({int(i): s for s, i in json.loads(atj.read_text(encoding="utf-8")).items()})
    for i in sorted(added):
        if i < len(proto.pieces):
            if added[i].encode("utf-8") != tokens[i]:
                raise ValueError(f"{model_dir}: HF added token {added[i]!r} has id {i}, which is "
                                 f"SentencePiece piece {tokens[i].decode()!r}; the HF tokenizer "
                                 "files and tokenizer.model disagree")
            continue
        if i >= n_rows:
            raise ValueError(f"{model_dir}: added token {added[i]!r} has id {i} but the embedding "
                             f"has {n_rows} rows; resize the embeddings (vocab stage) or drop "
                             "the token")
        while len(tokens) < i:   # a gap in the ids: keep positions aligned
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(5)
        tokens.append(added[i].encode("utf-8"))
        scores.append(-1000.0)
        types.append(4)   # USER_DEFINED

    n_tok = len(tokens)
    _check_token_count(model_dir, n_tok, n_rows, "tokenizer.model + added tokens")
    for i in range(n_tok, n_rows):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(5)   # UNUSED

    spec = proto.trainer_spec
    special = {k: v for k, v in (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id))
               if v >= 0}
    pad = None
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        pad = json.loads(tc.read_text(encoding="utf-8")).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad is None and spec.pad_id >= 0:
        special["pad"] = spec.pad_id
    elif pad is not None:
        ids = [i for i, t in enumerate(tokens) if t == pad.encode("utf-8")]
        if not ids:
            raise ValueError(f"{tc}: pad_token {pad!r} is not in the vocabulary")
        special["pad"] = ids[0]
    return {"tokens": tokens, "scores": scores, "types": types, "special": special,
            "n_tokenizer": n_tok, "add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
            "chat_template": _chat_template(model_dir, n_rows)}


def _chat_template(model_dir: Path, n_rows: int) -> str | None:
    """The model's chat template (the SFT stage saves its prompt template as one), read as
    llama.cpp's converter reads it (gguf's SpecialVocab: tokenizer_config.json's chat_template or
    chat_template.jinja), so a llama.cpp client builds the prompt the model was tuned on."""
    import gguf

    template = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_rows).chat_template
    return template if isinstance(template, str) and template else None


def _check_token_count(model_dir: Path, n_tok: int, n_rows: int, what: str) -> None:
    """Refuse a tokenizer with more tokens than embedding rows, or so many fewer that it cannot be
    the one the model was trained with (more spare rows than any padding leaves)."""
    if n_tok > n_rows:
        raise ValueError(f"{model_dir}: {what} = {n_tok} tokens but the "
                         f"embedding has {n_rows} rows: this is not the tokenizer the model was "
                         "trained with; ship the tokenizer produced by the vocab/merge stage")
    if n_rows - n_tok >= _MAX_VOCAB_PADDING:
        raise ValueError(f"{model_dir}: the tokenizer has {n_tok} tokens but the embedding {n_rows} "
                         f"rows (docs/recipe.md, P9): {n_rows - n_tok} ids would have no token. This is the wrong "
                         "tokenizer (e.g. LLaMA's 32000 pieces next to a Chinese-LLaMA model); "
                         "ship the tokenizer produced by the vocab/merge stage")


# Llama 3's pre-tokenizer split (its tiktoken pattern), which llama.cpp implements as "llama-bpe".
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_bpe(model_dir: Path) -> dict | None:
    """tokenizer.json when it is a byte-level BPE (Llama 3's), else None: SentencePiece models
    (LLaMA-1/2, Chinese-LLaMA) keep their tokenizer.model path even when a tokenizer.json is
    there too (theirs decodes with byte fallback, not ByteLevel)."""
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        return None
    data = json.loads(tj.read_text(encoding="utf-8"))
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    return data if data["model"].get("type") == "BPE" and byte_level else None


def _bpe_pre(model_dir: Path, data: dict) -> str:
    """llama.cpp's name for the pre-tokenizer: only Llama 3's split is written, as any other
    pattern would make llama.cpp cut text differently from the HF tokenizer."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    patterns = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    if patterns != [LLAMA3_PATTERN]:
        raise ValueError(f"{model_dir}/tokenizer.json: a byte-level BPE tokenizer whose pre-tokenizer "
                         f"split is {patterns}, not Llama 3's; this exporter writes Llama 3's "
                         "('llama-bpe') only")
    return "llama-bpe"


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL even when not marked special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _bpe_vocab(model_dir: Path, n_rows: int, data: dict) -> dict:
    """Llama 3's byte-level BPE vocabulary as llama.cpp's converter builds it: BPE pieces NORMAL;
    added tokens CONTROL when special or spelled like a control token (Llama 3's <|eot_id|> and
    reserved tokens), else USER_DEFINED (a token the vocab stage added: llama.cpp matches it
    whole in text); ids without a token up to the embedding rows [PAD{i}] UNUSED. Merges, the
    special ids, add_bos and the chat template come through gguf's SpecialVocab, the reader the
    converter uses."""
    import gguf

    T = gguf.TokenType
    pre = _bpe_pre(model_dir, data)
    by_id = {int(i): (t, T.NORMAL) for t, i in data["model"]["vocab"].items()}
    for t in data.get("added_tokens", []):
        text = t["content"]
        if t.get("special") or _looks_special(text):
            by_id[int(t["id"])] = (text, T.CONTROL)
        else:   # llama.cpp expects user-defined spaces as spaces
            by_id[int(t["id"])] = (text.replace("\u2581", " "), T.USER_DEFINED)
    n_tok = max(by_id) + 1
    _check_token_count(model_dir, n_tok, n_rows, "tokenizer.json's pieces + added tokens")
    entries = [by_id.get(i, (f"[PAD{i}]", T.UNUSED)) for i in range(n_rows)]
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_rows)
    if not special.merges:
        raise ValueError(f"{model_dir}/tokenizer.json: no BPE merges; llama.cpp cannot tokenize "
                         "without them")
    # Llama 3's template adds no EOS: said explicitly, as the converter does
    special.add_special_token.setdefault("eos", False)
    tc = model_dir / "tokenizer_config.json"
    prefix = json.loads(tc.read_text(encoding="utf-8")).get("add_prefix_space") if tc.is_file() else None
    return {"model": "gpt2", "pre": pre, "tokens": [e[0].encode("utf-8") for e in entries],
            "types": [int(e[1]) for e in entries], "special_vocab": special,
            "n_tokenizer": n_tok, "add_space_prefix": prefix}


def _load_vocab(model_dir: Path, n_rows: int) -> dict:
    """The vocabulary for llama.cpp: byte-level BPE (Llama 3) or SentencePiece (LLaMA-1/2)."""
    data = _byte_level_bpe(model_dir)
    return _bpe_vocab(model_dir, n_rows, data) if data else _vocab(model_dir, n_rows)


def _permute_rotary(w, n_head: int):
    """HF's q/k rows (halves rotated together) back to Meta's interleaved pairs, which llama.cpp's
    rope (mode 0) expects; inverse of transformers' convert_llama_weights_to_hf permute."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    F = gguf.LlamaFileType
    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}


def export_gguf(model_dir: Path, out_path: Path, qtype: str = "f16") -> Path:
    """Write the HF LLaMA in `model_dir` as a GGUF file at `out_path` (atomically: a temp name in
    the same folder, renamed at the end). 1-D tensors (norms) stay F32; 2-D tensors get `qtype`
    (f32/f16/bf16, or q8_0/q4_0 for every 2-D tensor, i.e. llama-quantize --pure); a row length
    not a multiple of the block size falls back to F16 (as llama.cpp does)."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    qtype = normalize_qtype(qtype)
    if qtype not in EXPORT_TYPES:
        raise ValueError(f"export_gguf writes {', '.join(EXPORT_TYPES)}; {qtype} needs llama.cpp: "
                         "export f16 first, then quantize_gguf(f16_gguf, out, qtype)")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json not found: expected a Hugging Face "
                                "model directory")
    # Everything below is checked before a byte is written.
    sizes = check_model(model_dir)
    config = _read_config(model_dir)
    vocab = _load_vocab(model_dir, sizes.embed_rows)
    rope = _rope(config)
    where = _safetensors_index(model_dir)
    target, file_type = _gguf_types()[qtype]
    plan = _tensor_plan(model_dir, where, config["num_hidden_layers"], target)
    extra = _extra_tensors(config, rope)
    plan = [(None, n, tuple(t.shape), _tensor_type(tuple(t.shape), target)) for n, t in extra.items()] + plan

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    _add_model_kv(w, model_dir.name, config, rope, sizes.embed_rows, file_type)
    (_add_bpe_vocab_kv if vocab.get("model") == "gpt2" else _add_vocab_kv)(w, vocab)
    _add_tensor_infos(w, plan)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_tensors(w, plan, where, config, extra)
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


# (hf name, gguf name, shape, ggml type) of one tensor to write, in the file's order; hf name None
# for a tensor computed from the config (rope_freqs)
PlannedTensor = tuple[str | None, str, tuple[int, ...], int]


def _extra_tensors(config: dict, rope: tuple[float, dict | None]) -> dict:
    """{gguf name: tensor} made from the config, written first as llama.cpp's converter does:
    Llama 3.1's rope factors."""
    theta, scaling = rope
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        return {"rope_freqs.weight": _llama3_rope_factors(config, theta, scaling)}
    return {}


def _tensor_plan(model_dir: Path, where: dict[str, tuple[Path, TensorInfo]], n_layer: int,
                 target) -> list[PlannedTensor]:
    """Every tensor's llama.cpp name and ggml type, in llama.cpp's order (embeddings, blocks by
    number, output norm, output); fails unless every tensor has a llama.cpp name and each of the
    n_layer blocks its 9 tensors."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    plan = []
    for hf_name, (file, info) in where.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{file}: tensor {hf_name!r} is not part of a LLaMA model "
                             "(no llama.cpp name for it)")
        plan.append((hf_name, name, info.shape, _tensor_type(info.shape, target)))
    block = lambda n: int(m.group(1)) if (m := re.match(r"blk\.(\d+)\.", n)) else -1  # noqa: E731
    order = {"token_embd.weight": -2, "output_norm.weight": 1 << 30, "output.weight": 1 << 31}
    plan.sort(key=lambda p: (order.get(p[1], block(p[1])), p[1]))
    missing = {"token_embd.weight", "output_norm.weight"} - {p[1] for p in plan}
    if missing or sum(p[1].startswith("blk.") for p in plan) != 9 * n_layer:
        raise ValueError(f"{model_dir}: expected 9 tensors per layer × {n_layer} layers plus "
                         f"embeddings and norm; missing {sorted(missing)} or layer tensors")
    return plan


def _tensor_type(shape: tuple[int, ...], target):
    """F32 for 1-D tensors (norms); `target` for 2-D ones whose rows divide into its blocks; F16
    for the others, as llama.cpp falls back."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[target][0] == 0:
        return target
    return gguf.GGMLQuantizationType.F16


def _add_model_kv(w, name: str, config: dict, rope: tuple[float, dict | None], n_vocab: int,
                  file_type) -> None:
    """The llama architecture's hyper-parameters, rope and file type."""
    import gguf

    theta, scaling = rope
    n_head = config["num_attention_heads"]
    w.add_name(name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(config["hidden_size"] // n_head)
    w.add_rope_freq_base(theta)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":   # llama3: rope_freqs
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab_kv(w, vocab: dict) -> None:
    """The SentencePiece vocabulary from _vocab, its special ids and LLaMA's BOS/EOS/space rules."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    for key, tid in vocab["special"].items():
        getattr(w, f"add_{key}_token_id")(tid)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab["add_space_prefix"])
    if vocab.get("chat_template"):
        w.add_chat_template(vocab["chat_template"])


def _add_bpe_vocab_kv(w, vocab: dict) -> None:
    """The byte-level BPE vocabulary from _bpe_vocab: tokens and types (no scores: BPE ranks are
    the merges' order), then merges, special ids, add_bos/add_eos and the chat template."""
    if vocab["add_space_prefix"] is not None:
        w.add_add_space_prefix(bool(vocab["add_space_prefix"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    vocab["special_vocab"].add_to_gguf(w, quiet=True)


def _add_tensor_infos(w, plan: list[PlannedTensor]) -> None:
    """Each tensor's name, shape and type, so the header is written before any data."""
    import gguf

    for _, name, shape, ttype in plan:
        if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if ttype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, ttype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ttype)


def _write_tensors(w, plan: list[PlannedTensor], where: dict[str, tuple[Path, TensorInfo]],
                   config: dict, extra: dict | None = None) -> None:
    """Stream the tensors in plan order, one in memory at a time, q/k rows in Meta's rotary order;
    `extra` holds the tensors computed from the config."""
    from safetensors import safe_open

    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    for hf_name, name, shape, ttype in plan:
        if hf_name is None:
            w.write_tensor_data(_convert(extra[name], ttype))
            continue
        with safe_open(str(where[hf_name][0]), framework="pt") as st:
            t = st.get_tensor(hf_name)
        if name.endswith("attn_q.weight"):
            t = _permute_rotary(t, n_head)
        elif name.endswith("attn_k.weight"):
            t = _permute_rotary(t, n_kv)
        w.write_tensor_data(_convert(t, ttype))
        del t


def _convert(t, ttype):
    """A torch tensor as the bytes of ggml type `ttype`, a chunk of rows at a time."""
    import gguf
    import torch

    Q = gguf.GGMLQuantizationType
    if ttype == Q.F32:
        return t.to(torch.float32).numpy()
    if ttype == Q.F16:
        return t.to(torch.float16).numpy()
    if ttype == Q.BF16:   # round-to-nearest-even, as gguf's and ggml's fp32 -> bf16
        return t.to(torch.bfloat16).view(torch.uint16).numpy().view(np.uint8)
    parts = [gguf.quants.quantize(t[i:i + _ROWS_PER_CHUNK].to(torch.float32).numpy(), ttype)
             for i in range(0, t.shape[0], _ROWS_PER_CHUNK)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------------------------
# llama.cpp quantization and read-back


def gguf_info(path: Path) -> dict:
    """What a GGUF holds, read back with gguf's GGUFReader: size, parameters, bits per weight,
    tensor types (a histogram and per tensor), file type and vocabulary size."""
    import gguf

    path = Path(path)
    r = gguf.GGUFReader(path)
    by_name = {t.name: t.tensor_type.name for t in r.tensors}
    n_params = int(sum(int(t.n_elements) for t in r.tensors))
    data_bytes = int(sum(int(t.n_bytes) for t in r.tensors))
    size = path.stat().st_size
    field = lambda k: r.fields[k].contents() if k in r.fields else None  # noqa: E731
    ft = field("general.file_type")
    return {"file_size": size, "n_params": n_params, "bpw": size * 8 / n_params,
            "tensor_bpw": data_bytes * 8 / n_params,
            "tensor_types": dict(sorted(Counter(by_name.values()).items())),
            "tensor_type_by_name": by_name,
            "file_type": gguf.LlamaFileType(ft).name if ft is not None else None,
            "n_vocab": len(r.fields["tokenizer.ggml.tokens"].data),
            # what llama-quantize --imatrix records: matrix file, its dataset, entries, chunks
            **({"imatrix_meta": {k.removeprefix("quantize.imatrix."): field(k) for k in keys}}
               if (keys := sorted(k for k in r.fields if k.startswith("quantize.imatrix.")))
               else {})}


def _llama_ftype(qtype: str) -> int:
    import llama_cpp

    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")


def quantize_gguf(src_gguf: Path, out_path: Path, qtype: str, nthread: int = 0, *,
                  pure: bool = False, imatrix: Path | None = None) -> Path:
    """llama.cpp's quantizer (`llama_model_quantize`, = `llama-quantize src out QTYPE nthread`)
    from an f32/f16/bf16 GGUF to `qtype`; written to a temp name then renamed. With `imatrix`
    (an imatrix.gguf) it runs llama.cpp's `llama-quantize --imatrix`: the importance matrix
    reaches the quantizer only through that tool (the library call takes it as a C++ map)."""
    import gguf

    src_gguf, out_path = Path(src_gguf), Path(out_path)
    q = str(qtype).strip().lower()
    if q not in LLAMA_CPP_TYPES:
        raise ValueError(f"unknown llama.cpp quantization type {qtype!r}; valid types: "
                         f"{', '.join(LLAMA_CPP_TYPES)}")
    if q in ALWAYS_IMATRIX and imatrix is None:
        raise ValueError(f"{q} is quantized with an importance matrix: pass imatrix= (the "
                         "imatrix stage's imatrix.gguf)")
    if not src_gguf.is_file():
        raise FileNotFoundError(f"{src_gguf}: source GGUF not found (export one with "
                                "export_gguf(model_dir, out, 'f16'))")
    try:
        r = gguf.GGUFReader(src_gguf)
    except Exception as e:
        raise ValueError(f"{src_gguf} is not a readable GGUF file: {e}") from None
    float_types = {"F32", "F16", "BF16"}
    quantized = {t.name for t in r.tensors if t.tensor_type.name not in float_types}
    if quantized:
        raise ValueError(f"{src_gguf} already holds quantized tensors ({sorted(quantized)[:3]}...); "
                         "quantize from the f16 (or f32/bf16) export, never requantize")
    del r
    import llama_cpp

    from steps.llamacpp_log import route_llama_cpp_log

    route_llama_cpp_log()  # its per-tensor lines only when asked for
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _llama_ftype(q)
    params.nthread = int(nthread)
    params.pure = bool(pure)
    try:
        if imatrix is not None:
            quantize_with_tool(src_gguf, tmp, q, nthread, pure, Path(imatrix))
        else:
            rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({src_gguf} -> {q}) failed with code "
                                   f"{rc}; see llama.cpp's log above")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def quantize_with_tool(src: Path, out: Path, q: str, nthread: int = 0, pure: bool = False,
                       imatrix: Path | None = None) -> None:
    """llama.cpp's `llama-quantize` on the installed wheel's library (the same quantizer as
    llama_model_quantize, byte for byte). With `imatrix` it runs beside the matrix and names it
    relatively, so the name it records (quantize.imatrix.file) is the same in every workspace."""
    import subprocess

    from steps import llamacpp_tools
    from steps.speed import usable_cores

    if imatrix is not None and not imatrix.is_file():
        raise FileNotFoundError(f"{imatrix}: importance matrix not found (the imatrix stage "
                                "makes it)")
    cmd = [str(llamacpp_tools.tool("llama-quantize")), *(["--pure"] if pure else []),
           *(["--imatrix", imatrix.name] if imatrix is not None else []),
           str(Path(src).resolve()), str(Path(out).resolve()), q.upper(),
           str(nthread or usable_cores())]
    proc = subprocess.run(cmd, cwd=imatrix.parent if imatrix is not None else None,
                          env=llamacpp_tools.env(), capture_output=True, text=True)
    if proc.returncode != 0 or not Path(out).is_file():
        raise RuntimeError(f"llama-quantize ({Path(src).name} -> {q}) failed with exit "
                           f"{proc.returncode}: {(proc.stdout + proc.stderr).strip()[-2000:]}")


# --------------------------------------------------------------------------------------------
# stage protocol


def find_gguf(src: Path) -> Path:
    """The .gguf `src` names: the file itself, or the one .gguf in a stage's artifact dir."""
    src = Path(src)
    if src.is_file():
        return src
    found = sorted(src.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"{src}: expected exactly one .gguf file (the f16 export), found "
                                f"{[f.name for f in found]}")
    return found[0]


def run(config: Config, out_dir: Path, *, on_metrics=None, model: Path | None = None,
        gguf: Path | None = None, imatrix: Path | None = None) -> dict:
    """Make out_dir/model-<qtype>.gguf and out_dir/quant_info.json.

    `model` (an HF dir) → our exporter, for f32/f16/bf16 and direct q8_0/q4_0;
    `gguf` (an artifact dir or file holding an f16/bf16/f32 GGUF) → llama.cpp's quantizer, with
    `imatrix` (the imatrix stage's artifact dir) for the types that use one."""
    out_dir = Path(out_dir)
    q, with_imatrix = config.qtype, uses_imatrix(config.qtype)
    if (model is None) == (gguf is None):
        raise ValueError("quantize: give exactly one input, `model` (HF dir, for "
                         f"{', '.join(EXPORT_TYPES)}) or `gguf` (the f16 GGUF, for llama.cpp types)")
    if with_imatrix != (imatrix is not None):
        raise ValueError(f"quantize: {q} " + ("uses an importance matrix: pass imatrix=<the "
                         "imatrix stage's artifact>" if with_imatrix else
                         f"takes no importance matrix (write {q}{IMATRIX_SUFFIX} for one)"))
    out = out_dir / f"model-{q.replace('@', '-')}.gguf"
    t0 = time.time()
    if model is not None:
        if q not in EXPORT_TYPES:
            raise ValueError(f"quantize: {q} is made by llama.cpp from the f16 GGUF; pass gguf=<f16 "
                             "artifact> (the lifecycle does), not the HF model")
        # The exporter's q8_0/q4_0 are always "pure" (gguf cannot make output.weight's Q6_K).
        export_gguf(Path(model), out, q)
        method = "export (gguf numpy)" if q in ("q8_0", "q4_0") else "export"
        source = Path(model)
    else:
        base = split_qtype(q)[0]
        if base not in LLAMA_CPP_TYPES:
            raise ValueError(f"quantize: {q} is exported from the HF model; pass model=<HF dir>")
        source = find_gguf(Path(gguf))
        matrix = Path(imatrix) / "imatrix.gguf" if imatrix is not None else None
        quantize_gguf(source, out, base, config.nthread, pure=config.pure, imatrix=matrix)
        method = "llama.cpp --imatrix" if matrix else "llama.cpp"
    seconds = time.time() - t0
    info = gguf_info(out)
    # no timings in the file: the same input must give the same bytes (the artifact digest)
    record = {"qtype": q, "file": out.name, "method": method, "source": source.name,
              **({"imatrix": True} if with_imatrix else {}), **info}
    (out_dir / "quant_info.json").write_text(json.dumps(record, indent=2) + "\n")
    metrics = {"qtype": q, "file_size": info["file_size"], "n_params": info["n_params"],
               "bpw": info["bpw"], "tensor_bpw": info["tensor_bpw"], "n_vocab": info["n_vocab"],
               "seconds": seconds}
    metrics |= {f"tensors_{k}": v for k, v in info["tensor_types"].items()}
    if on_metrics:
        on_metrics({k: v for k, v in metrics.items() if k != "qtype"}, 0)
    return metrics
