"""Import a llama2.c legacy (version 0) export into Meta's checkpoint layout.

llama2.c's `export.py --version 0` writes a 7 x int32 header (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, max_seq_len) and then float32 arrays, each group for all layers at once:
token_embedding_table, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, the RoPE cos and
sin tables (skipped: Meta computes them), and wcls only when vocab_size is negative (a positive
vocab_size means the classifier is tied to the embedding). The weights are already in Meta's
interleaved-pair rotary order, so the result is a consolidated.00.pth that convert treats like any
Meta release. The stories260K model's layout is in ../shared/data/README.md ("models/").
"""
from __future__ import annotations

import struct
from pathlib import Path

from steps.meta import MetaFormatError, MetaParams, save_meta_checkpoint

HEADER = struct.Struct("<7i")
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")


def read_header(bin_path: Path) -> dict:
    bin_path = Path(bin_path)
    with open(bin_path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise MetaFormatError(f"{bin_path}: {len(raw)} bytes, shorter than llama2.c's 28-byte header")
    h = dict(zip(FIELDS, HEADER.unpack(raw)))
    if h["dim"] == 0x616B3432 or raw[:4] == b"ak42":
        raise MetaFormatError(f"{bin_path}: a llama2.c version 1/2 export (magic 'ak42'); export it "
                              "with `export.py --version 0` (the legacy float32 format)")
    for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
        if h[k] <= 0:
            raise MetaFormatError(f"{bin_path}: header field {k} = {h[k]} is not positive; not a "
                                  "llama2.c legacy export")
    if h["vocab_size"] == 0 or h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
        raise MetaFormatError(f"{bin_path}: inconsistent header {h} (vocab 0, or heads do not "
                              "divide dim / each other)")
    return h


def _layout(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(group name, shape) in file order; a per-layer group has n_layers as its first dim."""
    d, f, L, V = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    hd = d // h["n_heads"]
    kv = h["n_kv_heads"] * hd
    out = [("tok_embeddings.weight", (V, d)), ("attention_norm.weight", (L, d)),
           ("attention.wq.weight", (L, d, d)), ("attention.wk.weight", (L, kv, d)),
           ("attention.wv.weight", (L, kv, d)), ("attention.wo.weight", (L, d, d)),
           ("ffn_norm.weight", (L, d)), ("feed_forward.w1.weight", (L, f, d)),
           ("feed_forward.w2.weight", (L, d, f)), ("feed_forward.w3.weight", (L, f, d)),
           ("norm.weight", (d,)), ("rope.cos", (h["max_seq_len"], hd // 2)),
           ("rope.sin", (h["max_seq_len"], hd // 2))]
    if h["vocab_size"] < 0:
        out.append(("output.weight", (V, d)))
    return out


def _params(h: dict, norm_eps: float, bin_path: Path) -> MetaParams:
    """params.json for the header. llama2.c's hidden_dim is Meta's FFN rule with multiple_of
    (default 32 in llama2.c's ModelArgs, 4 for stories260K); pick the largest power of two that
    reproduces it so params.json stays in Meta's vocabulary."""
    d, f = h["dim"], h["hidden_dim"]
    for mo in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        p = MetaParams(dim=d, n_layers=h["n_layers"], n_heads=h["n_heads"],
                       n_kv_heads=h["n_kv_heads"], vocab_size=abs(h["vocab_size"]),
                       multiple_of=mo, norm_eps=float(norm_eps))
        if p.ffn_dim == f:
            return p
    raise MetaFormatError(f"{bin_path}: hidden_dim {f} is not Meta's FFN size for dim {d} with any "
                          "multiple_of (ffn_dim_multiplier exports are not supported)")


def import_llama2c(bin_path: Path, tokenizer_model: Path, out_dir: Path,
                   norm_eps: float = 1e-5) -> Path:
    """Write out_dir/{consolidated.00.pth (fp32), params.json, checklist.chk, tokenizer.model,
    tokenizer_checklist.chk} from a llama2.c legacy export and its SentencePiece model."""
    import numpy as np
    import sentencepiece as spm
    import torch

    bin_path, tokenizer_model = Path(bin_path), Path(tokenizer_model)
    h = read_header(bin_path)
    layout = _layout(h)
    n_floats = sum(int(np.prod(s)) for _, s in layout)
    size = bin_path.stat().st_size
    if size != HEADER.size + 4 * n_floats:
        raise MetaFormatError(
            f"{bin_path}: {size} bytes, but the header {h} implies {HEADER.size + 4 * n_floats} "
            f"(28 + 4 x {n_floats} floats); truncated, or not a legacy (version 0) float32 export")
    params = _params(h, norm_eps, bin_path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    if sp.get_piece_size() != params.vocab_size:
        raise MetaFormatError(f"{tokenizer_model}: {sp.get_piece_size()} pieces, but {bin_path} "
                              f"has {params.vocab_size} embedding rows: not its tokenizer")

    flat = np.fromfile(bin_path, dtype="<f4", offset=HEADER.size)
    state, pos = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        t = torch.from_numpy(flat[pos:pos + n].reshape(shape).copy())
        pos += n
        if name.startswith("rope."):
            continue
        if name.split(".")[0] in ("attention", "feed_forward") or name.endswith("_norm.weight"):
            for i in range(h["n_layers"]):
                state[f"layers.{i}.{name}"] = t[i].clone()
        else:
            state[name] = t
    if "output.weight" not in state:  # tied classifier: Meta's layout has its own copy
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    return save_meta_checkpoint(state, params, out_dir, n_shards=1,
                                tokenizer_model=tokenizer_model)
