"""Vocabulary consistency checks every stage runs before it starts.

The recipe's most reported failure (Chinese-LLaMA-Alpaca #87, #85, #431, #331) is a size mismatch
between the tokenizer, the embedding matrix and an adapter's saved embed_tokens/lm_head
(49953 vs 49954 vs 32000). These checks read only file headers (no weights are loaded) and name
the artifact that disagrees and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from steps.tokenizer import carries_tokenizer


class VocabMismatch(ValueError):
    """Tokenizer size, embedding rows and adapter shapes disagree."""


@dataclass(frozen=True)
class VocabSizes:
    tokenizer: int          # len(HF tokenizer): SentencePiece pieces + added tokens (e.g. [PAD])
    sp_pieces: int | None   # pieces in tokenizer.model, when present
    config: int             # config.json vocab_size
    embed_rows: int         # model.embed_tokens.weight rows
    lm_head_rows: int       # lm_head.weight rows (== embed rows when tied)


def _tensor_shapes(model_dir: Path, suffixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of tensors whose names end with one of `suffixes`, read from safetensors headers."""
    from steps.safetensors_io import read_header

    return {name: info.shape for f in sorted(model_dir.glob("*.safetensors"))
            for name, info in read_header(f).items() if name.endswith(suffixes)}


def tokenizer_size(tokenizer_dir: Path) -> tuple[int, int | None]:
    """(len(HF tokenizer), SentencePiece piece count or None) without building the tokenizer."""
    tokenizer_dir = Path(tokenizer_dir)
    sp_pieces = None
    if (tokenizer_dir / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp_pieces = spm.SentencePieceProcessor(
            model_file=str(tokenizer_dir / "tokenizer.model")).get_piece_size()
    tj = tokenizer_dir / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        ids = set(data["model"]["vocab"].values()) if isinstance(data["model"]["vocab"], dict) else \
            set(range(len(data["model"]["vocab"])))
        ids |= {t["id"] for t in data.get("added_tokens", [])}
        return max(ids) + 1, sp_pieces
    if sp_pieces is None:
        raise VocabMismatch(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model; every model "
                            "and adapter directory must carry the tokenizer it was trained with")
    return sp_pieces, sp_pieces


def model_vocab(model_dir: Path) -> VocabSizes:
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    shapes = _tensor_shapes(model_dir, ("embed_tokens.weight", "lm_head.weight"))
    embed = [s for n, s in shapes.items() if n.endswith("embed_tokens.weight")]
    head = [s for n, s in shapes.items() if n.endswith("lm_head.weight")]
    if not embed:
        raise VocabMismatch(f"{model_dir}: no embed_tokens.weight in its *.safetensors files")
    tok_len, sp_pieces = tokenizer_size(model_dir)
    return VocabSizes(tokenizer=tok_len, sp_pieces=sp_pieces, config=int(config["vocab_size"]),
                      embed_rows=embed[0][0], lm_head_rows=head[0][0] if head else embed[0][0])


def check_model(model_dir: Path) -> VocabSizes:
    """Raise VocabMismatch unless tokenizer size == config vocab_size == embedding rows == lm_head
    rows (a vocabulary padded to a multiple of N may have more rows than tokens, never fewer)."""
    v = model_vocab(model_dir)
    problems = []
    if v.config != v.embed_rows:
        problems.append(f"config.json vocab_size={v.config} but embed_tokens has {v.embed_rows} rows")
    if v.lm_head_rows != v.embed_rows:
        problems.append(f"lm_head has {v.lm_head_rows} rows but embed_tokens has {v.embed_rows}")
    if v.tokenizer > v.embed_rows:
        problems.append(f"the tokenizer has {v.tokenizer} tokens but the embedding only "
                        f"{v.embed_rows} rows")
    if problems:
        raise VocabMismatch(
            f"{model_dir}: " + "; ".join(problems) + ". The tokenizer saved with a model must be "
            "the one its embeddings were resized for: rerun the vocab stage (extend_model) or "
            "copy the matching tokenizer files into this directory.")
    return v


def check_adapter(adapter_dir: Path, base_rows: int) -> int:
    """Check a peft adapter's saved embed_tokens/lm_head against its own tokenizer and the base
    model it will be applied to; returns the adapter's vocabulary rows (base_rows if it carries
    no embeddings)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}/adapter_config.json not found: not a peft adapter "
                                "directory")
    shapes = _tensor_shapes(adapter_dir, ("embed_tokens.weight", "lm_head.weight"))
    rows = {s[0] for n, s in shapes.items() if "lora_" not in n}
    if len(rows) > 1:
        raise VocabMismatch(f"{adapter_dir}: embed_tokens and lm_head disagree in rows: {shapes}")
    adapter_rows = rows.pop() if rows else base_rows
    tok_len, _ = tokenizer_size(adapter_dir) if carries_tokenizer(adapter_dir) else (adapter_rows, None)
    if tok_len > adapter_rows:
        raise VocabMismatch(
            f"{adapter_dir}: its tokenizer has {tok_len} tokens but its saved embeddings have "
            f"{adapter_rows} rows; this adapter was saved with the wrong tokenizer (e.g. the "
            "LLaMA tokenizer in an Alpaca adapter): copy the tokenizer it was trained with")
    if adapter_rows < base_rows:
        raise VocabMismatch(
            f"{adapter_dir}: the adapter's embeddings have {adapter_rows} rows but the base model "
            f"already has {base_rows}; applying it would shrink the vocabulary. Apply adapters in "
            "training order (pre-training before SFT) onto the base they were trained on.")
    return adapter_rows
