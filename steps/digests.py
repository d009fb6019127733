"""Content digests of model, tokenizer and adapter directories.

The training stages record them in training_info.json, the merge and vocab stages check an
adapter against them, and evaluate names what it evaluated by them: always by content, never by
path, so the same files give the same digest in any workspace.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from steps.tokenizer import TOKENIZER_FILES


def sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _tokenizer_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file())


def tokenizer_digest(model_dir: Path) -> str:
    return sha256_files(_tokenizer_files(Path(model_dir)))


def base_digest(model_dir: Path) -> str:
    """Digest of a base model's config.json and tokenizer files: what an adapter must be merged
    onto, since a LoRA is only valid on the base it was trained on. Weights are not hashed (too
    large); the merge stage compares this with the base it is given."""
    model_dir = Path(model_dir)
    return sha256_files([model_dir / "config.json"] + _tokenizer_files(model_dir))


def adapter_digest(adapter_dir: Path) -> str:
    adapter_dir = Path(adapter_dir)
    return sha256_files(sorted(adapter_dir.glob("adapter_model.*")) + [adapter_dir / "adapter_config.json"])
