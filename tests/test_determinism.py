"""The same work gets the same fingerprint: a stage's output bytes (its artifact digest) depend on
its inputs and config only, not on the workspace directory, a temp dir, the process (Python's
per-process string hashing, PYTHONHASHSEED) or the machine's core count. Otherwise any upstream
recompute retrains everything after it, and two workspaces (or a shared bucket) never share a key.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "pipelines" / "demo_data"


def test_trained_tokenizer_records_no_path_and_not_the_core_count(tmp_path, monkeypatch):
    """vocab.train_tokenizer: SentencePiece writes its model_prefix (a temp dir inside the stage)
    into the model, and its pieces depend on the thread count, which was the core count."""
    from steps import vocab
    from steps.tokenizer import load_sp_proto

    made = []
    for cores, where in ((1, tmp_path / "a"), (8, tmp_path / "deeper" / ".tmp-x" / "extra")):
        monkeypatch.setattr(os, "cpu_count", lambda n=cores: n)
        made.append(vocab.train_tokenizer(DEMO_DATA / "corpus_zh.txt", where, 450))
    a, b = (m.read_bytes() for m in made)
    assert a == b
    spec = load_sp_proto(made[1]).trainer_spec
    assert str(tmp_path) not in spec.model_prefix and spec.num_threads == vocab.TRAIN_THREADS
    assert vocab.Config().num_threads == vocab.TRAIN_THREADS
