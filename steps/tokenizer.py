"""SentencePiece <-> Hugging Face tokenizer files, shared by convert, vocab and merge.

Every model directory the pipeline writes carries the SentencePiece `tokenizer.model` (llama.cpp
and the vocab stage read it) next to the HF files (`tokenizer.json`, `tokenizer_config.json`)
built from it, so both runtimes see one vocabulary.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def save_hf_tokenizer(sp_model: Path, out_dir: Path, pad_token: str | None = None) -> int:
    """Write tokenizer.model plus HF tokenizer files for `sp_model` into `out_dir`.

    Returns len(tokenizer) (SentencePiece pieces plus added tokens such as a pad token).
    BOS is prepended and EOS is not, as LLaMA's tokenizer does (transformers 5 needs
    add_bos_token passed explicitly when building from a bare tokenizer.model)."""
    from transformers import LlamaTokenizer

    sp_model, out_dir = Path(sp_model), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(sp_model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
    if pad_token is not None and tok.pad_token is None:
        tok.add_special_tokens({"pad_token": pad_token})
    tok.save_pretrained(out_dir)
    if sp_model.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    return len(tok)
