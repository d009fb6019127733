"""Meta's original LLaMA checkpoint layout: params.json, model-parallel shards, rotary order.

Used by convert (Meta → HF), merge (HF → Meta output), download (shard lists), the demo and the
benchmarks. Facts from meta-llama/llama model.py and fairscale's parallel layers:
wq, wk, wv, w1, w3 and output are column-parallel (sharded on dim 0), wo and w2 row-parallel
(dim 1), tok_embeddings is sharded on the embedding dim (1), norms are replicated.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

# Meta tensor name (without layers.N.) → model-parallel concat dim; None = replicated.
SHARD_DIM = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
             "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
             "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
             "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None}

# Meta name → HF LlamaForCausalLM name.
_LAYER_MAP = {"attention.wq.weight": "self_attn.q_proj.weight",
              "attention.wk.weight": "self_attn.k_proj.weight",
              "attention.wv.weight": "self_attn.v_proj.weight",
              "attention.wo.weight": "self_attn.o_proj.weight",
              "feed_forward.w1.weight": "mlp.gate_proj.weight",
              "feed_forward.w2.weight": "mlp.down_proj.weight",
              "feed_forward.w3.weight": "mlp.up_proj.weight",
              "attention_norm.weight": "input_layernorm.weight",
              "ffn_norm.weight": "post_attention_layernorm.weight"}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_INV_LAYER_MAP = {v: k for k, v in _LAYER_MAP.items()}
_INV_TOP_MAP = {v: k for k, v in _TOP_MAP.items()}


class MetaFormatError(ValueError):
    """A Meta checkpoint that is not what params.json / the layout says."""


def ffn_hidden_dim(dim: "int | MetaParams", multiple_of: int | None = None,
                   ffn_dim_multiplier: float | None = None) -> int:
    """meta-llama FeedForward: int(2·4·dim/3), times the multiplier, rounded up to multiple_of.
    Takes either the three numbers or a MetaParams."""
    if isinstance(dim, MetaParams):
        dim, multiple_of, ffn_dim_multiplier = dim.dim, dim.multiple_of, dim.ffn_dim_multiplier
    if multiple_of is None:
        raise TypeError("ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None) needs multiple_of")
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class MetaParams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    # Every Meta release's params.json has these six; a silent default for norm_eps (1e-6 in
    # LLaMA-1, 1e-5 in Llama-2) or multiple_of would give a model that loads but is subtly wrong.
    REQUIRED = ("dim", "n_layers", "n_heads", "norm_eps", "multiple_of", "vocab_size")
    _INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")
    _FLOATS = ("norm_eps", "ffn_dim_multiplier", "rope_theta")

    @classmethod
    def from_dict(cls, d: dict, source: str = "params.json") -> "MetaParams":
        if not isinstance(d, dict):
            raise MetaFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise MetaFormatError(f"{source}: missing field(s) {missing}; a Meta params.json has "
                                  f"{list(cls.REQUIRED)} (vocab_size -1 = from the tokenizer). "
                                  "Download it again or copy it from conf/model/")
        cls._check_family(d, source)
        for k in cls._INTS:
            v = d.get(k)
            if v is None and k == "n_kv_heads":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and not (k == "vocab_size" and v == -1)):
                raise MetaFormatError(f"{source}: field {k} = {v!r} must be a positive integer"
                                      + (" (or -1: from the tokenizer)" if k == "vocab_size" else ""))
        for k in cls._FLOATS:
            v = d.get(k)
            if v is None and k != "norm_eps":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise MetaFormatError(f"{source}: field {k} = {v!r} must be a positive number")
        known = {f for f in cls.__dataclass_fields__}
        p = cls(**{k: (float(v) if k in cls._FLOATS and v is not None else v)
                   for k, v in d.items() if k in known})
        if p.dim % p.n_heads or p.head_dim % 2:
            raise MetaFormatError(f"{source}: dim {p.dim} must split into n_heads {p.n_heads} "
                                  "heads of an even size (rotary pairs)")
        if p.n_heads % p.kv_heads:
            raise MetaFormatError(f"{source}: n_heads {p.n_heads} not divisible by n_kv_heads "
                                  f"{p.kv_heads}")
        return p

    @classmethod
    def _check_family(cls, d: dict, source: str) -> None:
        """Refuse a params.json of another model family (steps/llama3.py reads Llama 3.x's)."""
        if d.get("use_scaled_rope"):
            raise MetaFormatError(f"{source}: use_scaled_rope is Llama 3.1's rope scaling (and its "
                                  "tiktoken vocabulary); read it as a Llama 3 checkpoint "
                                  "(steps.llama3; convert does when tokenizer.model is tiktoken's)")

    @classmethod
    def from_file(cls, path: Path) -> "MetaParams":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise MetaFormatError(f"{path} not found: a Meta checkpoint folder has params.json") from None
        except json.JSONDecodeError as e:
            raise MetaFormatError(f"{path} is not JSON ({e}); was an error page saved in its "
                                  "place? Download it again") from None
        return cls.from_dict(d, str(path))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Rows of wk / wv: n_kv_heads x head_dim (= dim without GQA)."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def to_json(self) -> dict:
        """params.json as Meta writes it (optional keys only when set)."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if d.get("rope_theta") == 10000.0:
            d.pop("rope_theta")
        return d

    def shapes(self, vocab: int) -> dict[str, tuple[int, ...]]:
        """Full (unsharded) shape of every tensor, Meta names."""
        kv, f = self.kv_dim, self.ffn_dim
        out = {"tok_embeddings.weight": (vocab, self.dim), "norm.weight": (self.dim,),
               "output.weight": (vocab, self.dim)}
        per = {"attention.wq.weight": (self.dim, self.dim), "attention.wk.weight": (kv, self.dim),
               "attention.wv.weight": (kv, self.dim), "attention.wo.weight": (self.dim, self.dim),
               "feed_forward.w1.weight": (f, self.dim), "feed_forward.w2.weight": (self.dim, f),
               "feed_forward.w3.weight": (f, self.dim), "attention_norm.weight": (self.dim,),
               "ffn_norm.weight": (self.dim,)}
        for i in range(self.n_layers):
            out |= {f"layers.{i}.{k}": v for k, v in per.items()}
        return out


def params_from_hf_config(config: dict, vocab_size: int | None = None) -> MetaParams:
    """Meta params.json for an HF LLaMA config.json. Meta derives the FFN width from dim,
    multiple_of and ffn_dim_multiplier, so those are chosen to reproduce intermediate_size:
    Meta's own values when they fit (multiple_of 256, or 4096 with x1.3 for Llama-2 70B), else
    multiple_of = intermediate_size with the multiplier that rounds up to exactly it."""
    dim, ffn = config["hidden_size"], config["intermediate_size"]
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    multiple_of, multiplier = ffn, None
    for mo, mult in ((256, None), (4096, 1.3), (1024, 1.3), (ffn, None)):
        if ffn_hidden_dim(dim, mo, mult) == ffn:
            multiple_of, multiplier = mo, mult
            break
    else:
        multiplier = ffn / int(2 * (4 * dim) / 3)
        if ffn_hidden_dim(dim, multiple_of, multiplier) != ffn:
            multiplier = (ffn - 0.5) / int(2 * (4 * dim) / 3)
    p = MetaParams(dim=dim, n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
                   n_kv_heads=kv if kv != config["num_attention_heads"] else None,
                   vocab_size=vocab_size if vocab_size is not None else config["vocab_size"],
                   multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                   norm_eps=config["rms_norm_eps"], rope_theta=float(theta or 10000.0))
    assert p.ffn_dim == ffn, (p, ffn)
    return p


def shard_dim(meta_name: str) -> int | None:
    m = _LAYER_RE.match(meta_name)
    key = m.group(2) if m else meta_name
    if key not in SHARD_DIM:
        raise MetaFormatError(f"unknown Meta tensor {meta_name!r}")
    return SHARD_DIM[key]


def permute(w, n_heads: int):
    """Meta's interleaved rotary pairs → HF's half-split order (rows of q or k)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def unpermute(w, n_heads: int):
    """HF's half-split rotary order → Meta's interleaved pairs (inverse of `permute`)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def meta_to_hf_name(name: str) -> str:
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    raise MetaFormatError(f"unknown Meta tensor {name!r}")


def hf_to_meta_name(name: str) -> str:
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _INV_LAYER_MAP:
        return f"layers.{m.group(1)}.{_INV_LAYER_MAP[m.group(2)]}"
    if name in _INV_TOP_MAP:
        return _INV_TOP_MAP[name]
    raise MetaFormatError(f"no Meta equivalent for HF tensor {name!r}")


def hf_to_meta(state_dict: dict, params: dict | MetaParams) -> dict:
    """HF LlamaForCausalLM tensors → Meta names, q/k rows back in interleaved rotary order
    (rotary_emb.inv_freq and other non-weights dropped)."""
    p = params if isinstance(params, MetaParams) else MetaParams.from_dict(params)
    out = {}
    for name, t in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        meta = hf_to_meta_name(name)
        if meta.endswith("attention.wq.weight"):
            t = unpermute(t, p.n_heads)
        elif meta.endswith("attention.wk.weight"):
            t = unpermute(t, p.kv_heads)
        out[meta] = t
    return out


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checklist(folder: Path, names: list[str], out_name: str = "checklist.chk") -> Path:
    """md5sum text format: `<md5>  <name>` per line (what download.sh checks with md5sum -c)."""
    lines = [f"{md5_file(folder / n)}  {n}" for n in names]
    (folder / out_name).write_text("\n".join(lines) + "\n")
    return folder / out_name


def looks_like_markup(head: bytes) -> bool:
    """True for HTML/XML (an error page from a CDN or proxy) rather than the file that was asked for."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<"


_GNU_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]{32}|[0-9a-fA-F]{64}) [ *](?P<name>.+)$")
_BSD_LINE = re.compile(r"^(?P<algo>MD5|SHA256) \((?P<name>.+)\) = (?P<hex>[0-9a-fA-F]{32,64})$")


def read_checklist(path: Path) -> dict[str, tuple[str, str]]:
    """{file name: (algorithm, hex digest)} from an md5sum/sha256sum list such as checklist.chk
    (GNU `<hex>  <name>` or BSD `MD5 (<name>) = <hex>`). Strict like `md5sum -c --strict`: any
    malformed line is an error, because a half-parsed list would silently verify less than it
    claims."""
    path = Path(path)
    raw = path.read_bytes()
    if looks_like_markup(raw[:512]):
        raise MetaFormatError(
            f"{path}: an HTML/XML page ({len(raw)} bytes), not a checksum list; the download URL "
            "has probably expired or was copied incompletely (Meta's presigned URLs expire after "
            "24 h): request a new one")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MetaFormatError(f"{path}: not a text checksum list (not UTF-8)") from None
    entries: dict[str, tuple[str, str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _GNU_LINE.match(line) or _BSD_LINE.match(line)
        if m is None:
            raise MetaFormatError(f"{path}:{lineno}: not a checksum line ('<hex digest>  <file>'): "
                                  f"{line[:60]!r}")
        digest = m["hex"].lower()
        if len(digest) not in (32, 64):
            raise MetaFormatError(f"{path}:{lineno}: digest of {len(digest)} hex digits")
        name = m["name"].removeprefix("./")
        entries[name] = ("md5" if len(digest) == 32 else "sha256", digest)
    if not entries:
        raise MetaFormatError(f"{path}: no checksum lines (empty list)")
    return entries


def save_meta_checkpoint(meta_state: dict, params: dict | MetaParams, out_dir: Path,
                         n_shards: int = 1, tokenizer_model: Path | None = None) -> Path:
    """Write consolidated.NN.pth (one per model-parallel rank), params.json and checklist.chk.

    Sharded tensors are split with torch.tensor_split, so a dimension that does not divide
    (e.g. 13B's 49953-row output across 2 ranks) gives uneven parts, which convert concatenates
    back by their actual sizes (docs/recipe.md, "Meta shards may split a dimension unevenly")."""
    import torch

    p = params if isinstance(params, MetaParams) else MetaParams.from_dict(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks: list[dict] = [{} for _ in range(n_shards)]
    for name, t in meta_state.items():
        if n_shards == 1:
            shard_dim(name)  # validates the name
            ranks[0][name] = t
            continue
        dim = shard_dim(name)
        parts = [t] * n_shards if dim is None else torch.tensor_split(t, n_shards, dim=dim)
        for r, part in enumerate(parts):
            ranks[r][name] = part.clone()  # own storage: saving a view would write the whole tensor
    names = []
    for r, sd in enumerate(ranks):
        name = f"consolidated.{r:02d}.pth"
        torch.save(sd, out_dir / name)
        names.append(name)
    (out_dir / "params.json").write_text(json.dumps(p.to_json()))
    write_checklist(out_dir, names + ["params.json"])
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
        write_checklist(out_dir, ["tokenizer.model"], "tokenizer_checklist.chk")
    return out_dir


def synthesize_checkpoint(out_dir: Path, params: dict, tokenizer_model: Path, n_shards: int = 1,
                          seed: int = 0, dtype=None, std: float = 0.02) -> Path:
    """A random Meta checkpoint in the real layout (norms = 1, weights N(0, std)), for the demo,
    tests and benchmarks. vocab_size -1 takes the tokenizer's piece count, as Meta's code does."""
    import sentencepiece as spm
    import torch

    dtype = dtype or torch.bfloat16
    p = MetaParams.from_dict(params)
    vocab = p.vocab_size if p.vocab_size > 0 else \
        spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in p.shapes(vocab).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = (torch.randn(shape, generator=g) * std).to(dtype)
    return save_meta_checkpoint(state, p, out_dir, n_shards, tokenizer_model)
