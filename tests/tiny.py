"""Tiny real-format models for tests: trained in about a second, no ../shared needed."""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.demo import DEMO_DATA  # noqa: F401  (the tests' own small real texts)


def train_tiny_tokenizer(out_path: Path, vocab_size: int = 320) -> Path:
    """The demo's LLaMA-like SentencePiece model (BPE, byte fallback, digits split, unk/bos/eos =
    0/1/2), trained on the English half of the demo corpus at a smaller vocabulary."""
    from pipelines.demo import train_base_tokenizer

    return train_base_tokenizer(out_path, vocab_size=vocab_size)


def make_tiny_hf_model(out_dir: Path, sp_model: Path, *, hidden: int = 64, layers: int = 2,
                       heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                       seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM saved as safetensors with tokenizer files."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steps.tokenizer import save_hf_tokenizer

    out_dir = Path(out_dir)
    vocab = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    save_hf_tokenizer(sp_model, out_dir)
    (out_dir / "README.txt").write_text(json.dumps({"made_by": "tests/tiny.py", "seed": seed}))
    return out_dir


def upstream_layout_tokenizer(base: Path, extra: Path, out: Path,
                              multiple_of: int | None = None) -> Path:
    """A finished tokenizer laid out as Chinese-LLaMA-2's own (the file the vocab stage's mode
    given takes): the base's pieces, <pad>, the extra model's new pieces, every appended one
    with score 0, then unused pieces up to a multiple of `multiple_of`."""
    from steps.tokenizer import NORMAL, UNUSED, load_sp_proto

    proto = load_sp_proto(base)
    seen = {p.piece for p in proto.pieces}
    new = ["<pad>"] + [p.piece for p in load_sp_proto(extra).pieces if p.type == NORMAL]
    for piece in new:
        if piece not in seen:
            added = proto.pieces.add()
            added.piece, added.type, added.score = piece, NORMAL, 0.0
            seen.add(piece)
    i = 0
    while multiple_of and len(proto.pieces) % multiple_of:
        added = proto.pieces.add()
        added.piece, added.type, added.score = f"<unused{i}>", UNUSED, 0.0
        i += 1
    Path(out).write_bytes(proto.SerializeToString())
    return Path(out)
