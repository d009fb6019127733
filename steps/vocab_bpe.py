"""The vocab stage on a byte-level BPE base (Llama 3's tokenizer.json, no SentencePiece model).

A BPE merge list cannot take SentencePiece pieces appended at the end (its merges are ranked and
its alphabet is bytes), so the SentencePiece merge of steps/vocab.py applies to SentencePiece bases
only. On a BPE base the stage does one of:
- mode "none": passes the tokenizer (and the model) through and measures tokens per character on
  the eval texts, which tells whether an extension would pay (Llama 3's 128K vocabulary already
  covers common Chinese: 0.89 tokens per character on the demo's Chinese eval text);
- mode "add_tokens": adds whole tokens as HF added tokens (matched in the text before the BPE
  runs, so a token is always one id), and extend_model grows the rows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# The vocab modes for a SentencePiece base (merging pieces, or a finished tokenizer), and the
# ones for a BPE base.
SP_MODES = ("all", "cjk", "given")
BPE_MODES = ("none", "add_tokens")


def is_sentencepiece_base(model_dir: Path) -> bool:
    """Whether the model's tokenizer is SentencePiece (tokenizer.model beside it); a Llama 3
    conversion carries tokenizer.json only, as its tiktoken file is no SentencePiece model."""
    return (Path(model_dir) / "tokenizer.model").is_file()


def check_mode(mode: str, sentencepiece_base: bool, where: str) -> None:
    """Refuse a mode that does not fit the base tokenizer, naming vocab.mode and the fix."""
    if mode in SP_MODES and not sentencepiece_base:
        raise ValueError(
            f"vocab.mode={mode}: extends a SentencePiece tokenizer, but {where} has a byte-level BPE "
            "tokenizer (tokenizer.json, no SentencePiece tokenizer.model; Llama 3's). Set "
            "vocab.mode=none (no extension; Llama 3's vocabulary already covers Chinese) or "
            "vocab.mode=add_tokens with vocab.add_tokens (whole tokens to add)")
    if mode == "add_tokens" and sentencepiece_base:
        raise ValueError(
            f"vocab.mode=add_tokens: adds tokens to a byte-level BPE tokenizer, but {where} has a "
            "SentencePiece tokenizer.model: extend it with vocab.mode=all or vocab.mode=cjk "
            "(merging a SentencePiece model), or vocab.mode=none to keep it")


def load_tokenizer(tokenizer_dir: Path):
    """The `tokenizers` Tokenizer of tokenizer_dir/tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model without a SentencePiece "
                                "tokenizer.model must carry tokenizer.json")
    return Tokenizer.from_file(str(path))


def count_tokens(tokenizer_dir: Path, lines: list[str]) -> int:
    """Tokens the HF tokenizer of tokenizer_dir gives `lines` (no BOS), each line on its own."""
    tok = load_tokenizer(tokenizer_dir)
    return sum(len(e.ids) for e in tok.encode_batch(lines, add_special_tokens=False))


def read_token_list(tokens: list[str], tokens_file: Path | None) -> list[str]:
    """The tokens to add: the list, then tokens_file's non-empty lines (one token a line, kept
    exactly as written but for the line end), duplicates dropped in order."""
    out = list(tokens)
    if tokens_file is not None:
        out += [l for l in Path(tokens_file).read_text(encoding="utf-8").splitlines() if l.strip()]
    return list(dict.fromkeys(out))


def add_tokens(model_dir: Path, tokens: list[str], out_dir: Path) -> dict:
    """Write model_dir's tokenizer files with `tokens` added (those the base does not already
    encode as one id) into out_dir; returns the vocab report. Each added token is checked to
    encode to its own id in the written tokenizer."""
    from tokenizers import AddedToken

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tok = load_tokenizer(model_dir)
    base_size = tok.get_vocab_size(with_added_tokens=True)
    already = [t for t in tokens if len(tok.encode(t, add_special_tokens=False).ids) == 1]
    new = [t for t in tokens if t not in already]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer_files(model_dir, out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in new}
    _record_added_tokens(out_dir / "tokenizer_config.json", ids)
    written = load_tokenizer(out_dir)
    wrong = [t for t in new if written.encode(t, add_special_tokens=False).ids != [ids[t]]]
    if wrong:
        raise ValueError(f"vocab.add_tokens: {wrong[:5]} do not encode to their own id in the "
                         "extended tokenizer")
    return dict(mode="add_tokens", base_pieces=base_size, pieces_added=len(new),
                already_single_tokens=len(already), merged_pieces=base_size + len(new),
                tokenizer_size=written.get_vocab_size(with_added_tokens=True), added=new)


def _copy_tokenizer_files(model_dir: Path, out_dir: Path) -> None:
    from steps.tokenizer import TOKENIZER_FILES

    for f in TOKENIZER_FILES:
        if (model_dir / f).is_file():
            shutil.copyfile(model_dir / f, out_dir / f)


def _record_added_tokens(config_file: Path, ids: dict[str, int]) -> None:
    """List the new tokens in tokenizer_config.json's added_tokens_decoder, as transformers
    writes every added token there (it would otherwise see them as unknown to the config)."""
    if not config_file.is_file():
        return
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in cfg:
        for t, i in ids.items():
            cfg["added_tokens_decoder"][str(i)] = dict(
                content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                special=False)
    config_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def subwords(model_dir: Path, tokens: list[str], old_vocab: int) -> list[list[int]]:
    """The base-tokenizer ids each new token splits into (subword_mean's rows to average)."""
    tok = load_tokenizer(model_dir)
    return [[i for i in tok.encode(t, add_special_tokens=False).ids if i < old_vocab]
            for t in tokens]


def pass_through(model_dir: Path, out_dir: Path) -> None:
    """out_dir as a copy of the model: the artifact is the stage's own, so nothing done to the
    convert stage's files (a cache repair, a cleanup) reaches it."""
    from steps.tokenizer import TOKENIZER_FILES

    model_dir = Path(model_dir)
    names = ("config.json", "generation_config.json", "model.safetensors.index.json",
             *TOKENIZER_FILES, *(f.name for f in sorted(model_dir.glob("*.safetensors"))))
    for name in names:   # the model's own files; the pipeline's (manifest.json) stay behind
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, Path(out_dir) / name)
