"""Meta's LLaMA forward pass, written independently of transformers, for conversion parity tests.

Follows meta-llama/llama `llama/model.py`: RMSNorm, rotary embedding on interleaved (re, im) pairs
via torch.view_as_complex with freqs_cis = polar(1, t * theta^(-2i/head_dim)), kv heads repeated
for GQA, causal softmax attention, SwiGLU FFN (w2(silu(w1 x) * w3 x)), untied output. fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steps.meta import MetaParams


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].double() / head_dim))
    t = torch.arange(end, dtype=torch.float64)
    return torch.polar(torch.ones(end, head_dim // 2, dtype=torch.float64),
                       torch.outer(t, freqs)).to(torch.complex64)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim) with pairs (2i, 2i+1) as one complex number."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    return out.type_as(x)


def forward(state: dict, p: MetaParams, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) for token ids (batch, seq)."""
    sd = {k: v.float() for k, v in state.items()}
    bsz, seq = tokens.shape
    hd, nh, nkv = p.head_dim, p.n_heads, p.kv_heads
    h = F.embedding(tokens, sd["tok_embeddings.weight"])
    freqs = precompute_freqs_cis(hd, seq, p.rope_theta)
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(p.n_layers):
        L = lambda n: sd[f"layers.{i}.{n}"]  # noqa: E731
        x = rms_norm(h, L("attention_norm.weight"), p.norm_eps)
        q = (x @ L("attention.wq.weight").T).view(bsz, seq, nh, hd)
        k = (x @ L("attention.wk.weight").T).view(bsz, seq, nkv, hd)
        v = (x @ L("attention.wv.weight").T).view(bsz, seq, nkv, hd)
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        k = k.repeat_interleave(nh // nkv, dim=2)  # meta's repeat_kv: each kv head serves n_rep q heads
        v = v.repeat_interleave(nh // nkv, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / hd ** 0.5 + mask
        att = F.softmax(scores.float(), dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(bsz, seq, -1) @ L("attention.wo.weight").T
        x = rms_norm(h, L("ffn_norm.weight"), p.norm_eps)
        ffn = (F.silu(x @ L("feed_forward.w1.weight").T) * (x @ L("feed_forward.w3.weight").T))
        h = h + ffn @ L("feed_forward.w2.weight").T
    return rms_norm(h, sd["norm.weight"], p.norm_eps) @ sd["output.weight"].T


def load_meta(meta_dir) -> tuple[dict, MetaParams]:
    """The full (unsharded) state dict of a Meta checkpoint folder, concatenated independently of
    steps.convert (by hand from fairscale's layout), and its params."""
    from pathlib import Path

    meta_dir = Path(meta_dir)
    p = MetaParams.from_file(meta_dir / "params.json")
    shards = [torch.load(f, weights_only=True) for f in sorted(meta_dir.glob("consolidated.*.pth"))]
    row_parallel = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        if parts[0].dim() == 1:
            out[name] = parts[0]
        else:
            out[name] = torch.cat(parts, dim=1 if name.endswith(row_parallel) else 0)
    return out, p
