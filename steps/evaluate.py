"""Evaluate stage: perplexity of one model (HF dir, HF + peft adapters, or GGUF) on text sets,
multiple-choice accuracy (C-Eval, CMMLU: steps/mc.py), plus generations on a fixed prompt set for
human (or model-judge) review (steps/judge.py, pipelines/reviews.py).

Perplexity protocols
--------------------
"llama.cpp" — what `llama-perplexity` computes, so the numbers match what llama.cpp users quote
(examples/perplexity/perplexity.cpp): the whole text is tokenized once with BOS; it is cut into
n_chunk = floor(N / n_ctx) non-overlapping chunks of n_ctx tokens; the first token of every chunk
is replaced by BOS; only the second half is scored: logits at positions j = n_ctx/2 … n_ctx-2
predict token j+1, i.e. n_ctx/2 - 1 scored tokens per chunk. NLL = -log_softmax in float64.
PPL = exp(mean NLL) and its error, as llama.cpp prints it,
ppl_err = PPL * sqrt((mean(NLL²) - mean(NLL)²) / (count - 1)). llama.cpp refuses texts shorter
than 2·n_ctx tokens and so do we.

"strided" — the transformers documentation's sliding window ("Perplexity of fixed-length
models"): windows of n_ctx tokens start every `stride` tokens (default n_ctx/2); each window scores
only the tokens the previous window did not, with everything before them in the window as
context. Every token except the leading BOS is scored exactly once (the documentation's
`num_valid_tokens - 1` per window undercounts by one per window; we count exactly).

Comparable across vocabularies
------------------------------
Per-token perplexity does not compare across the stages' tokenizers (32000 vs 49953 pieces), so
each result also normalises the same summed NLL by the text the scored tokens stand for:
  * a token's bytes = its UTF-8 surface form as llama.cpp's `token_to_piece` gives it (for
    SentencePiece vocabularies such as LLaMA's; the HF side maps pieces the same way):
    "▁" counts as one space byte, a byte-fallback piece <0xNN> is that one byte, control tokens
    (BOS/EOS/pad) are empty;
  * n_bytes = sum of the bytes of the scored (target) tokens;
  * n_chars = number of UTF-8 characters those bytes start, i.e. bytes that are not UTF-8
    continuation bytes (10xxxxxx): a character split over byte-fallback tokens is counted once,
    with the token holding its first byte;
  * bits_per_byte = nll_sum / n_bytes / ln 2 (lm-evaluation-harness' definition, on our scored
    tokens), byte_ppl = exp(nll_sum / n_bytes), char_ppl = exp(nll_sum / n_chars).

KL divergence
-------------
Given a `reference` model (run(reference=...), config.kld true, protocol "llama.cpp"), each set
also gets sets[name]["kld"]: the statistics `llama-perplexity --kl-divergence` prints, of this
model's token distributions against the reference's on the same chunks and scored positions
(steps/kld.py, which streams them chunk by chunk). Both models are loaded at once, with the same
runtime settings; a reference with another tokenizer is refused before any scoring. Their
"ppl_base" is llama.cpp's, from the reference's 16-bit log-probs floored at max-16, so it can sit
below the reference's own perplexity (stories260K, TinyStories sample, n_ctx 128: 6.339 vs 6.846,
11 of 882 targets below the floor); compare models' perplexities through their own "ppl".
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Annotated, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from steps import MetricsCallback, Stage
from steps.mc import DEFAULT_SPLIT, McSet
from steps.sft import ALPACA_ZH_TEMPLATE, format_prompt  # the prompt SFT trains on

VERSION = "5"  # 5: multiple-choice accuracy; the judge moved to its own stage


class FlowKeys(BaseModel):
    """The evaluate key the flow reads: it runs the stage once per model."""
    models: list[str] = Field(["base", "base-zh", "base-zh+pt", "merged", "gguf"], description=(
        "Which models the lifecycle evaluates: base, base-zh, base-zh+pt (base-zh with the "
        "pre-training LoRA applied unmerged), merged, gguf (every quant type) or gguf-<type>"))
    kld_reference: Literal["gguf-f16", "merged"] | None = Field("gguf-f16", description=(
        "the reference every other GGUF's evaluation measures its KL divergence from (evaluate's "
        "`reference` input; needs evaluate.kld true and protocol llama.cpp): gguf-f16, llama.cpp "
        "users' practice, or merged, the HF merged model at evaluate.dtype (float32 by default); "
        "null: no KLD"))


def kld_reference(section: dict) -> str | None:
    """The model label GGUF evaluations measure KLD against: evaluate.kld_reference, unless
    KLD is off or the protocol is not llama.cpp's (validation refuses that pairing)."""
    if not section.get("kld", True) or section.get("protocol", "llama.cpp") != "llama.cpp":
        return None
    return section.get("kld_reference")


# generations.jsonl as a table for review, without the token ids of each answer
STAGE = Stage(gpu=True, flow=FlowKeys, tables={"generations.jsonl": ("output_ids",)},
              review="generations.jsonl")
PROTOCOLS = ("llama.cpp", "strided")

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _is_byte_level(tokenizer) -> bool:
    """Whether an HF tokenizer is a byte-level BPE (Llama 3's): its pieces spell bytes in the
    printable alphabet of tokenizers' ByteLevel, not text with "▁" for spaces."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """ByteLevel's character -> byte: printable Latin-1 bytes stand for themselves, the other
    bytes for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _byte_level_bytes(tokenizer, ids: set[int], special: set[int]) -> dict[int, bytes]:
    """Each id's bytes as llama.cpp's token_to_piece gives them for a byte-level BPE: a piece's
    characters mapped back to bytes; an added token (kept as text, not as byte characters) its
    UTF-8; control tokens empty."""
    alphabet = _byte_level_alphabet()
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    out = {}
    for i in ids:
        if i in special:
            out[i] = b""
        elif i in added:
            out[i] = added[i].encode("utf-8")
        else:
            out[i] = bytes(alphabet[c] for c in tokenizer.convert_ids_to_tokens(i))
    return out


# ---------------------------------------------------------------------------------------------
# Models: one small wrapper per runtime with the same four operations.
# ---------------------------------------------------------------------------------------------

def _gguf_file(model: Path) -> Path | None:
    """The .gguf file `model` names (the file, or a dir holding exactly one), else None."""
    if model.is_file() and model.suffix == ".gguf":
        return model
    if model.is_dir():
        found = sorted(model.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{model} holds {len(found)} .gguf files ({[f.name for f in found]}); "
                             "pass the one to evaluate")
        if found:
            return found[0]
    return None


class HFModel:
    """A transformers causal LM (float32 by default) with peft adapters applied in order.

    All adapters but the last are merged in memory, in order, as the SFT stage trained on them
    (base + pt merged); the last stays unmerged (peft's LoRA forward), so a LoRA is evaluated
    exactly as it was trained."""

    kind = "hf"

    def __init__(self, model_dir: Path, adapters: Sequence[Path] = (), *, device: str | None = None,
                 dtype: str = "float32"):
        import torch

        from steps.train.model import load_base

        self.path = Path(model_dir)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a Hugging Face model directory (no "
                                    "config.json) and not a .gguf file or a dir holding one")
        adapters = [Path(a) for a in adapters]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, self.tokenizer = load_base(self.path, adapters, precision=dtype,
                                          attn_implementation=None, merge_last=False)
        self.model = model.to(self.device).eval()
        self.n_vocab = int(self.model.get_input_embeddings().weight.shape[0])
        self.bos_id = self.tokenizer.bos_token_id
        self.adapters = adapters

    def close(self) -> None:
        self.model = None

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def token_bytes(self, ids: Sequence[int]) -> dict[int, bytes]:
        special = set(self.tokenizer.all_special_ids)
        if _is_byte_level(self.tokenizer):
            return _byte_level_bytes(self.tokenizer, set(int(t) for t in ids), special)
        out = {}
        for i in set(int(t) for t in ids):
            piece = self.tokenizer.convert_ids_to_tokens(i)
            m = _BYTE_PIECE.match(piece or "")
            out[i] = (b"" if i in special else bytes([int(m.group(1), 16)]) if m
                      else piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def window_nll(self, windows: list[tuple[list[int], int]], batch_size: int, progress,
                   on_logits=None) -> list[np.ndarray]:
        """NLL (float64) of tokens ids[s+1:] given ids[:j+1] for each window (ids, s).
        on_logits(window, float32 logits of its scored positions), when given, sees each
        window's logits as they are computed (steps/kld.py compares them with a reference's)."""
        import torch

        out: list[np.ndarray | None] = [None] * len(windows)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (ids, s) in enumerate(windows):
            groups.setdefault((len(ids), s), []).append(k)
        with torch.inference_mode():
            for (n, s), members in groups.items():
                for b in range(0, len(members), batch_size):
                    ks = members[b:b + batch_size]
                    x = torch.tensor([windows[k][0] for k in ks], dtype=torch.long, device=self.device)
                    # only the rows we score go through lm_head: positions s … n-1 (last dropped)
                    logits = self.model(input_ids=x, logits_to_keep=n - s, use_cache=False).logits
                    for row, k in enumerate(ks):
                        lp = torch.log_softmax(logits[row, :-1].double(), dim=-1)
                        nll = -lp.gather(-1, x[row, s + 1:].unsqueeze(-1)).squeeze(-1)
                        out[k] = nll.cpu().numpy()
                        if on_logits is not None:
                            on_logits(windows[k], logits[row, :-1].float().cpu().numpy())
                    progress.update(len(ks))
        return out

    def window_logits(self, windows: list[tuple[list[int], int]], batch_size: int):
        """float32 logits at positions s … len-2 of each window (ids, s), in order, computed
        batch_size windows at a time: what steps/kld.py compares."""
        import torch

        with torch.inference_mode():
            for b in range(0, len(windows), batch_size):
                group = windows[b:b + batch_size]
                # windows of one length and start share a forward pass (the llama.cpp protocol's
                # chunks all do); any others go one by one
                same = all(len(w) == len(group[0][0]) and s == group[0][1] for w, s in group)
                for part in [group] if same else [[w] for w in group]:
                    n, s = len(part[0][0]), part[0][1]
                    x = torch.tensor([w for w, _ in part], dtype=torch.long, device=self.device)
                    logits = self.model(input_ids=x, logits_to_keep=n - s, use_cache=False).logits
                    for row in range(len(part)):
                        yield logits[row, :-1].float().cpu().numpy()


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """Llama() takes its llama_model_params from llama_model_default_params() and has no argument
    for `use_extra_bufts` (ggml's AMX and repacked-weight CPU buffers), so swap the default in
    for the constructor call. Why off by default: a llama-cpp-python built with GGML_NATIVE on a
    CPU that advertises AMX (this project's VMs) dies with SIGILL on the first AMX tile
    instruction when it runs Q8_0/Q4_0 weights. The plain CPU kernels do not give identical
    numbers: they accumulate in another order, which moves perplexity by up to ~1e-3 relative
    on repacked Q4_0 (an f16 stories260K moved 4e-5), well inside llama.cpp's printed ± error."""
    import llama_cpp
    import llama_cpp.llama as L

    orig = L.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = use_extra_bufts
        return p

    L.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        L.llama_cpp.llama_model_default_params = orig


class GGUFModel:
    """A GGUF file on llama.cpp (llama-cpp-python), with logits for every position."""

    kind = "gguf"

    def __init__(self, path: Path, *, n_ctx: int = 512, n_threads: int | None = None,
                 device: str | None = None, extra_buffers: bool = False, flash_attn: bool = False):
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise ImportError("evaluating a .gguf needs llama-cpp-python: pip install "
                              "'llama-cpp-python==0.3.36' (or the project's [llamacpp] extra)") from e
        from steps.llamacpp_log import route_llama_cpp_log

        route_llama_cpp_log()  # the model loader's dump only when asked for
        self.path = Path(path)
        self.n_ctx = n_ctx
        with _model_params(extra_buffers):
            self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx,
                             n_ubatch=min(n_ctx, 512), logits_all=True,
                             n_threads=n_threads or os.cpu_count(),
                             n_threads_batch=n_threads or os.cpu_count(),
                             n_gpu_layers=-1 if (device or "").startswith("cuda") else 0,
                             flash_attn=flash_attn, verbose=False)
        self.bos_id = self.llm.token_bos()
        self.n_vocab = int(self.llm.n_vocab())
        self.adapters: list[Path] = []

    def close(self) -> None:
        # explicit, because llama-cpp-python's __del__ at interpreter exit raises TypeError noise
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        # as llama-perplexity: common_tokenize(ctx, text, add_special=true, parse_special=false)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def token_bytes(self, ids: Sequence[int]) -> dict[int, bytes]:
        import ctypes

        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        buf = ctypes.create_string_buffer(256)
        out = {}
        for i in set(int(t) for t in ids):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, False)
            out[i] = bytes(buf.raw[:max(n, 0)])
        return out

    def window_nll(self, windows: list[tuple[list[int], int]], batch_size: int, progress,
                   on_logits=None) -> list[np.ndarray]:
        out = []
        for ids, s in windows:
            if len(ids) > self.n_ctx:
                raise ValueError(f"window of {len(ids)} tokens > the context {self.n_ctx} this "
                                 "GGUF model was opened with")
            self.llm.reset()  # clears the KV cache for positions >= 0: a fresh context per chunk
            self.llm.eval(ids)
            logits = np.asarray(self.llm.scores[s:len(ids) - 1], dtype=np.float64)
            out.append(_nll_from_logits(logits, np.asarray(ids[s + 1:])))
            if on_logits is not None:  # a float32 copy: the next eval overwrites the buffer
                on_logits((ids, s), np.array(self.llm.scores[s:len(ids) - 1], dtype=np.float32))
            progress.update(1)
        return out

    def window_logits(self, windows: list[tuple[list[int], int]], batch_size: int = 1):
        """float32 logits at positions s … len-2 of each window (ids, s), one window at a time
        (a copy: the next window's eval overwrites llama-cpp-python's buffer)."""
        for ids, s in windows:
            if len(ids) > self.n_ctx:
                raise ValueError(f"window of {len(ids)} tokens > the context {self.n_ctx} this "
                                 "GGUF model was opened with")
            self.llm.reset()
            self.llm.eval(ids)
            yield np.array(self.llm.scores[s:len(ids) - 1], dtype=np.float32)


def _nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log_softmax(logits)[target] per row, max-subtracted, float64."""
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[:, 0]
    return lse - logits[np.arange(len(targets)), targets]


def load(model: Path | str, adapters: Sequence[Path] = (), *, n_ctx: int = 512,
         n_threads: int | None = None, device: str | None = None, dtype: str = "float32",
         extra_buffers: bool = False, flash_attn: bool = False):
    """Open `model`: a .gguf file or a dir holding exactly one (llama.cpp), else an HF dir."""
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"model {model} does not exist")
    gguf = _gguf_file(model)
    if gguf is not None:
        if adapters:
            raise ValueError(f"{gguf}: adapters apply to HF models only; merge them first "
                             "(merge stage) and export the merged model")
        return GGUFModel(gguf, n_ctx=n_ctx, n_threads=n_threads, device=device,
                         extra_buffers=extra_buffers, flash_attn=flash_attn)
    return HFModel(model, adapters, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------

def windows_for(ids: Sequence[int], *, n_ctx: int, protocol: str, stride: int | None,
                bos_id: int | None, max_tokens: int | None) -> list[tuple[list[int], int]]:
    """The (input ids, s) windows a protocol evaluates; logits s … len-2 predict ids[s+1:]."""
    ids = list(ids)
    if protocol == "llama.cpp":
        if len(ids) < 2 * n_ctx:
            raise ValueError(f"the text has {len(ids)} tokens; protocol llama.cpp needs at least "
                             f"2*n_ctx = {2 * n_ctx} (as llama-perplexity): use a longer text or "
                             "a smaller n_ctx")
        n_chunk = len(ids) // n_ctx
        if max_tokens is not None:
            if max_tokens < n_ctx:
                raise ValueError(f"max_tokens={max_tokens} < n_ctx={n_ctx} leaves no chunk to "
                                 "evaluate; raise max_tokens to at least n_ctx")
            n_chunk = min(n_chunk, max_tokens // n_ctx)
        first = n_ctx // 2
        out = []
        for i in range(n_chunk):
            chunk = ids[i * n_ctx:(i + 1) * n_ctx]
            if bos_id is not None:
                chunk[0] = bos_id
            out.append((chunk, first))
        return out
    if protocol == "strided":
        stride = stride or n_ctx // 2
        if not 0 < stride <= n_ctx:
            raise ValueError(f"stride={stride} must be in 1..n_ctx ({n_ctx})")
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"the text has {len(ids)} tokens; nothing to score")
        out, prev_end, begin = [], 0, 0
        while True:
            end = min(begin + n_ctx, len(ids))
            s = max(prev_end, 1) - 1 - begin  # targets are the tokens prev_end … end-1
            out.append((ids[begin:end], s))
            prev_end = end
            if end == len(ids):
                return out
            begin += stride
    raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")


def read_text(path: Path, kind: str = "text") -> str:
    """The eval text. kind "text": the file's bytes as UTF-8, line endings untouched (as
    llama-perplexity reads it). kind "wikitext": `wikitext-test.hf-joined.txt` (HF rows joined by
    "\\n\\n", CRLF) rebuilt into the canonical `wiki.test.raw` layout that llama.cpp users evaluate
    (shared/data README: CRLF→LF, rows split on "\\n\\n", empty rows written as " \\n")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval text {path} not found")
    text = path.read_bytes().decode("utf-8")
    if kind == "text":
        return text
    if kind == "wikitext":
        return _canonical_wikitext(text, path)
    raise ValueError(f"eval set kind={kind!r} for {path}; choose text or wikitext")


def _canonical_wikitext(joined: str, path: Path) -> str:
    """HF rows (each "" or one line ending in "\n") joined by "\n\n" → the canonical layout.
    A plain split on "\n\n" is ambiguous (a row's own "\n" touches the separator), so parse
    row by row; for the shared file this gives sha256 173c87a5…7dd08, 1,290,590 bytes."""
    t = joined.replace("\r\n", "\n")
    rows, p, n = [], 0, len(t)
    while True:
        if p == n or t[p] == "\n":
            rows.append("")
        else:
            e = t.find("\n", p)
            if e < 0:
                raise ValueError(f"{path}: not an HF-joined WikiText file (a row without \\n at "
                                 f"offset {p}); use kind: text for a plain file")
            rows.append(t[p:e + 1])
            p = e + 1
        if p == n:
            break
        if not t.startswith("\n\n", p):
            raise ValueError(f"{path}: not an HF-joined WikiText file (no \\n\\n separator at "
                             f"offset {p}); use kind: text for a plain file")
        p += 2
        if p == n:
            rows.append("")
            break
    return "".join(" \n" if r == "" else r for r in rows)


def perplexity(model, text_path: Path | None = None, *, n_ctx: int = 512,
               protocol: str = "llama.cpp", stride: int | None = None,
               max_tokens: int | None = None, token_ids: Sequence[int] | None = None,
               adapters: Sequence[Path] = (), batch_size: int = 8, n_threads: int | None = None,
               device: str | None = None, text: str | None = None, kind: str = "text",
               progress: bool = True, on_logits=None) -> dict:
    """Perplexity of `model` (HF dir, .gguf, dir with one .gguf, or a model from `load`) on the
    text at `text_path` (or `text`, or pre-made `token_ids`: identical ids for an HF vs GGUF
    comparison) under `protocol`; see the module docstring for the definitions.

    max_tokens caps the tokens fed to the model (llama.cpp: whole chunks, floor(max_tokens/n_ctx);
    strided: the first max_tokens tokens). on_logits(window, logits): see window_nll."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError(f"n_ctx={n_ctx} must be an even number >= 4")
    if token_ids is None and text is None:
        if text_path is None:
            raise ValueError("give text_path, text or token_ids")
        text = read_text(text_path, kind)
    if isinstance(model, (HFModel, GGUFModel)):
        return _perplexity(model, text, n_ctx, protocol, stride, max_tokens, token_ids,
                           batch_size, progress, on_logits)
    m = load(model, adapters, n_ctx=n_ctx, n_threads=n_threads, device=device)
    try:
        return _perplexity(m, text, n_ctx, protocol, stride, max_tokens, token_ids, batch_size,
                           progress, on_logits)
    finally:
        m.close()


def _perplexity(m, text, n_ctx, protocol, stride, max_tokens, token_ids, batch_size,
                progress, on_logits=None) -> dict:
    from tqdm.auto import tqdm

    ids = list(token_ids) if token_ids is not None else m.tokenize(text)
    windows = windows_for(ids, n_ctx=n_ctx, protocol=protocol, stride=stride, bos_id=m.bos_id,
                          max_tokens=max_tokens)

    t0 = time.perf_counter()
    bar = tqdm(total=len(windows), desc=f"ppl {Path(str(m.path)).name}", unit="win",
               disable=not progress, leave=False)
    try:
        nlls = m.window_nll(windows, batch_size, bar, on_logits)
    finally:
        bar.close()
    # what on_logits spent (a reference model's forward passes) is not this model's time
    seconds = time.perf_counter() - t0 - getattr(on_logits, "seconds", 0.0)

    nll = np.concatenate(nlls)
    targets = [t for ids_w, s in windows for t in ids_w[s + 1:]]
    pieces = m.token_bytes(targets)
    n_bytes = sum(len(pieces[t]) for t in targets)
    n_chars = sum(sum(1 for b in pieces[t] if b & 0xC0 != 0x80) for t in targets)
    count = len(nll)
    nll_sum = float(nll.sum())
    mean, mean2 = nll_sum / count, float((nll * nll).sum()) / count
    ppl = math.exp(mean)
    var = mean2 - mean * mean
    n_fed = sum(len(w) for w, _ in windows)
    return {
        "ppl": ppl,
        "ppl_err": ppl * math.sqrt(var / (count - 1)) if count > 1 and var > 0 else 0.0,
        "nll_sum": nll_sum, "nll_mean": mean, "n_scored": count,
        "n_tokens": n_fed, "n_text_tokens": len(ids), "n_chunks": len(windows),
        "protocol": protocol, "n_ctx": n_ctx,
        "stride": (stride or n_ctx // 2) if protocol == "strided" else None,
        "bits_per_byte": nll_sum / n_bytes / math.log(2) if n_bytes else None,
        "byte_ppl": math.exp(nll_sum / n_bytes) if n_bytes else None,
        "char_ppl": math.exp(nll_sum / n_chars) if n_chars else None,
        "n_bytes": n_bytes, "n_chars": n_chars,
        "seconds": seconds, "tokens_per_s": n_fed / seconds if seconds > 0 else None,
        "backend": m.kind, "model": str(m.path), "adapters": [str(a) for a in m.adapters],
    }


# ---------------------------------------------------------------------------------------------
# Generations for review
# ---------------------------------------------------------------------------------------------

def load_prompts(path: Path) -> list[dict]:
    """A JSON list of {"instruction", "input", "group"} records (Alpaca style; "input" may be
    empty, "group" left out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a list of "
                         '{"instruction": ..., "input": ...} records') from e
    if not isinstance(data, list) or not all(isinstance(d, dict) and "instruction" in d for d in data):
        raise ValueError(f"{path}: expected a JSON list of records with an 'instruction' key")
    # "group": the task group a prompt belongs to (the recipe judged 10 groups × 20 prompts:
    # knowledge QA, translation, writing, ...); the judge's scores are averaged per group
    return [{"instruction": d["instruction"], "input": d.get("input", "") or ""}
            | ({"group": str(d["group"])} if d.get("group") else {}) for d in data]


def generate(model, prompts: Sequence[dict | str], *, template: str = ALPACA_ZH_TEMPLATE,
             max_new_tokens: int = 128, greedy: bool = True, temperature: float = 0.2,
             top_p: float = 0.9, top_k: int = 40, repetition_penalty: float = 1.1, seed: int = 1,
             adapters: Sequence[Path] = (), n_ctx: int = 512, n_threads: int | None = None,
             device: str | None = None) -> list[dict]:
    """Answer each prompt with `model` (HF dir + adapters, GGUF, or a model from `load`).

    greedy=True: argmax decoding, no penalty (deterministic; HF and GGUF give the same text when
    their logits agree). greedy=False: sampling with the recipe's inference defaults
    (scripts/inference/inference_hf.py: temperature 0.2, top_k 40, top_p 0.9, repetition
    penalty 1.1), seeded."""
    if not isinstance(model, (HFModel, GGUFModel)):
        m = load(model, adapters, n_ctx=n_ctx, n_threads=n_threads, device=device)
        try:
            return generate(m, prompts, template=template, max_new_tokens=max_new_tokens,
                            greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
        finally:
            m.close()
    m = model
    records = [{"instruction": p, "input": ""} if isinstance(p, str) else p for p in prompts]
    out = []
    for i, rec in enumerate(records):
        prompt = format_prompt(rec["instruction"], rec.get("input", ""), template)
        t0 = time.perf_counter()
        if m.kind == "hf":
            text, new_ids = _generate_hf(m, prompt, max_new_tokens, greedy, temperature, top_p,
                                         top_k, repetition_penalty, seed + i)
        else:
            text, new_ids = _generate_gguf(m, prompt, max_new_tokens, greedy, temperature, top_p,
                                           top_k, repetition_penalty, seed + i)
        out.append({"instruction": rec["instruction"], "input": rec.get("input", ""),
                    **({"group": rec["group"]} if rec.get("group") else {}),
                    "prompt": prompt, "output": text, "mode": "greedy" if greedy else "sampled",
                    "n_new_tokens": len(new_ids), "output_ids": new_ids,
                    "seconds": round(time.perf_counter() - t0, 4)})
    return out


def _generate_hf(m: HFModel, prompt, max_new_tokens, greedy, temperature, top_p, top_k,
                 repetition_penalty, seed) -> tuple[str, list[int]]:
    import torch

    enc = m.tokenizer(prompt, return_tensors="pt", add_special_tokens=True).to(m.device)
    torch.manual_seed(seed)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                  "repetition_penalty": repetition_penalty}
    with torch.inference_mode():
        ids = m.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                               eos_token_id=m.tokenizer.eos_token_id,
                               pad_token_id=m.tokenizer.pad_token_id or m.tokenizer.eos_token_id,
                               **({"top_k": None, "top_p": None, "temperature": None}
                                  if greedy else sampling))
    new = ids[0, enc["input_ids"].shape[1]:]
    return m.tokenizer.decode(new, skip_special_tokens=True), [int(t) for t in new]


def _generate_gguf(m: GGUFModel, prompt, max_new_tokens, greedy, temperature, top_p, top_k,
                   repetition_penalty, seed) -> tuple[str, list[int]]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(m.llm.model)
    m.llm.set_seed(seed)   # the dist sampler is built from this seed on each generate()
    # temperature 0 selects llama.cpp's greedy sampler; top_k 0 / min_p 0 disable those filters
    new: list[int] = []
    for tok in m.llm.generate(m.tokenize(prompt), temp=0.0 if greedy else temperature,
                              top_p=1.0 if greedy else top_p, top_k=0 if greedy else top_k,
                              min_p=0.0, repeat_penalty=1.0 if greedy else repetition_penalty,
                              reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        new.append(int(tok))
        if len(new) >= max_new_tokens:
            break
    return m.llm.detokenize(new).decode("utf-8", errors="replace"), new


# ---------------------------------------------------------------------------------------------
# Stage protocol
# ---------------------------------------------------------------------------------------------

class EvalSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a UTF-8 text file")
    kind: Literal["text", "wikitext"] = Field("text", description=(
        "text: the file as-is (line endings untouched, as llama-perplexity reads it); wikitext: "
        "an HF-joined WikiText file rebuilt into the canonical wiki.test.raw layout llama.cpp "
        "users evaluate (335,688 LLaMA tokens, 655 chunks at n_ctx 512)"))
    max_tokens: int | None = Field(None, description=(
        "token budget for this set (whole n_ctx chunks), instead of the stage's max_tokens; "
        "null = the stage's"))


class Config(BaseModel):
    """evaluate stage: perplexity of each model on each eval set, plus answers to a fixed prompt
    set for review. One stage run evaluates ONE model; the flow runs it per model."""
    model_config = ConfigDict(extra="forbid")
    eval_sets: dict[str, EvalSet] = Field(default_factory=dict, description=(
        "name -> {path, kind, max_tokens}. The lifecycle's sets are a conf/evaluate/eval_sets/ "
        "option, replaced whole by picking another (evaluate/eval_sets=NAME): Hydra would merge "
        "a mapping given as keys"), json_schema_extra={"conf_option": "eval_sets/default"})
    n_ctx: int = Field(512, description=(
        "context per chunk; 512 is llama-perplexity's default and the figure its README quotes"))
    protocol: Literal["llama.cpp", "strided"] = Field("llama.cpp", description=(
        "\"llama.cpp\": non-overlapping n_ctx chunks, BOS first, second half scored "
        "(llama-perplexity). \"strided\": transformers' sliding window (every token but BOS "
        "scored once)"))
    stride: int | None = Field(None, description="strided only: window step; null = n_ctx/2")
    max_tokens: int | None = Field(None, description=(
        "default token budget for sets without their own max_tokens (null = whole text)"))
    batch_size: int = Field(8, description="windows per HF forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "HF compute dtype; float32 keeps HF and f16/f32 GGUF numbers comparable to ~1e-6"))
    n_threads: int | None = Field(None, description="llama.cpp threads (null = all cores)")
    extra_buffers: bool = Field(False, description=(
        "llama.cpp's extra CPU buffer types (AMX, repacked weights): faster where they work; off "
        "because a GGML_NATIVE build on a VM that advertises AMX dies with SIGILL on Q8_0/Q4_0 "
        "weights"))
    flash_attn: bool = Field(False, description=(
        "llama.cpp flash attention: false reproduces `llama-perplexity -fa off`, true `-fa on` "
        "(its default, -fa auto, is on for CPU), each to all printed digits with -b n_ctx. The "
        "two differ by up to ~1e-3 relative (stories260K at n_ctx 256: q4_0 7.68127 off, "
        "7.67814 on, 4e-4; f16 5e-5), inside the ± error but far above float noise: compare "
        "runs only at the same setting"))
    device: str | None = Field(None, description="null = cuda when available, else cpu")
    prompts: str | None = Field(None, description=(
        "prompt set for generations (JSON list of {instruction, input}); null = no generations. "
        "The lifecycle's: the demo's prompts"),
        json_schema_extra={"conf": "${repo:pipelines/demo_data/prompts.json}"})
    template: str = Field(ALPACA_ZH_TEMPLATE, description=(
        "Chinese-Alpaca's prompt (note the trailing space); the lifecycle's: the one the SFT "
        "stage trained on"), json_schema_extra={"conf": "${sft.prompt_template}"})
    max_new_tokens: int = Field(128, description="tokens generated per answer at most")
    modes: list[Literal["greedy", "sampled"]] = Field(
        default_factory=lambda: ["greedy", "sampled"], description=(
            "greedy: argmax, deterministic. sampled: the recipe's inference defaults below, "
            "seeded"))
    temperature: float = Field(0.2, description="sampled mode: softmax temperature (the "
                                                "recipe's inference default, as the next three)")
    top_p: float = Field(0.9, description="sampled mode: nucleus (top-p) threshold")
    top_k: int = Field(40, description="sampled mode: sample among the k likeliest tokens")
    repetition_penalty: float = Field(1.1, description="sampled mode: penalty on tokens already "
                                                       "in the text (1.0: none)")
    seed: int = Field(1, description="seed of the sampled mode")
    mc_sets: dict[str, McSet] = Field(default_factory=dict, description=(
        "multiple-choice sets (C-Eval, CMMLU or a user's set in their layout, steps/mc.py): name "
        "-> {path, layout (ceval, cmmlu, jsonl), split, subjects, max_questions}; the accuracy of "
        "every evaluated model on them, HF and GGUF alike. {} = none"))
    mc_shots: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 5], description=(
        "few-shot counts each set is scored at (the first k dev questions of the subject)"))
    mc_style: Literal["recipe", "lm-eval"] = Field("recipe", description=(
        "recipe: the recipe's (and C-Eval's) prompt, `以下是中国关于{subject}考试的单项选择题，…`, "
        "answers as `答案：X`; lm-eval: lm-evaluation-harness' ceval-valid/cmmlu prompts, to "
        "compare with its numbers"))
    mc_scoring: Literal["letter", "continuation"] = Field("letter", description=(
        "letter: the choice whose letter's token is likeliest right after the prompt; "
        "continuation: the summed log-likelihood of each choice's continuation (lm-eval's acc); "
        "the same whenever each letter is one token"))
    mc_n_ctx: int = Field(2048, ge=64, description=(
        "the GGUF context when mc_sets are set: the longest prompt (5-shot) must fit"))
    kld: bool = Field(True, description=(
        "when the stage is given a reference model (the f16 GGUF, or the HF model in fp32, with "
        "the same tokenizer): KL divergence of this model's token distributions from the "
        "reference's on every eval set, as `llama-perplexity --kl-divergence` computes it "
        "(protocol llama.cpp only). false: the reference is ignored. No reference: nothing"))


DATA_FIELDS = ("eval_sets.*.path", "prompts", "mc_sets.*.path")
# knobs that change speed, not results (batching moves float sums by ~1e-7), kept out of the key
CACHE_EXCLUDE = ("n_threads", "device", "batch_size")
# how long scoring and each generation took: other numbers on every run, so kept out of
# results.json and generations.jsonl (the same model and sets give the same bytes there)
TIMINGS = "timings.json"
DIGEST_EXCLUDE = (TIMINGS,)


def _name(path) -> str:
    return Path(str(path)).name


# the KLD statistics also logged as metrics, as {set}.{key}
KLD_METRICS = ("kld_mean", "kld_err", "kld_median", "kld_p90", "kld_p95", "kld_p99", "kld_p99_9",
               "kld_max", "same_top_p", "same_top_p_err", "rms_dp", "rms_dp_err", "dp_mean",
               "ppl_ratio", "ppl_diff", "ln_ppl_cor")


def run(config: Config, out_dir: Path, *, on_metrics: MetricsCallback | None = None,
        model: Path, adapters: Sequence[Path] = (), reference: Path | None = None) -> dict:
    """Evaluate ONE model (HF dir [+ adapters] or a GGUF artifact dir/file) on every eval set,
    every multiple-choice set and the prompt set → out_dir/results.json, mc_answers.jsonl,
    generations.jsonl. With a `reference` model (GGUF or HF artifact) and config.kld: also the KL
    divergence from it (steps/kld.py)."""
    out_dir = Path(out_dir)
    model, adapters = Path(model), [Path(a) for a in adapters]
    # every input is checked before the model is loaded
    if not model.exists():
        raise FileNotFoundError(f"model {model} does not exist")
    reference = Path(reference) if reference is not None and config.kld else None
    if reference is not None:
        _check_reference(config, reference)
    texts = {name: read_text(Path(s.path), s.kind) for name, s in config.eval_sets.items()}
    prompts = load_prompts(Path(config.prompts)) if config.prompts else []
    mc_sets = read_mc_sets(config)

    # a GGUF context also has to hold prompt + answer; each perplexity chunk still starts afresh
    n_ctx = max(config.n_ctx, 512 if prompts else 0)
    m = load(model, adapters, n_ctx=n_ctx, n_threads=config.n_threads, device=config.device,
             dtype=config.dtype, extra_buffers=config.extra_buffers, flash_attn=config.flash_attn)
    ref = None
    try:
        if reference is not None:
            # the same runtime settings as the model, so the two differ only in their weights
            ref = load(reference, n_ctx=config.n_ctx, n_threads=config.n_threads,
                       device=config.device, dtype=config.dtype,
                       extra_buffers=config.extra_buffers, flash_attn=config.flash_attn)
        return _run_loaded(config, out_dir, m, texts, prompts, mc_sets, on_metrics, ref)
    finally:
        m.close()
        if ref is not None:
            ref.close()


def read_mc_sets(config: Config) -> dict:
    """Every multiple-choice set's subjects, read and checked (layout, answers, enough dev
    examples for the shots) before any model is loaded; a problem names evaluate.mc_sets.<name>."""
    from steps.mc import check_shots, read_set

    out = {}
    for name, s in config.mc_sets.items():
        try:
            out[name] = read_set(s)
            check_shots(name, out[name], config.mc_shots)
        except (OSError, ValueError) as e:
            raise ValueError(f"evaluate.mc_sets.{name} ({s.path}): {e}") from None
    return out


def _check_reference(config: Config, reference: Path) -> None:
    if not reference.exists():
        raise FileNotFoundError(f"reference model {reference} does not exist")
    if config.protocol != "llama.cpp":
        raise ValueError(f"evaluate.kld: KL divergence is defined on the llama.cpp protocol's "
                         f"chunks, not protocol={config.protocol!r}; set evaluate.protocol="
                         "llama.cpp or evaluate.kld=false")


def _tokenize_sets(config: Config, m, texts: dict) -> tuple[dict, dict]:
    """Each set's token ids and token budget. Every set is tokenized and cut first, so a set too
    short for n_ctx fails before any scoring."""
    ids, budget = {}, {}
    for name, text in texts.items():
        s = config.eval_sets[name]
        ids[name] = m.tokenize(text)
        budget[name] = s.max_tokens if s.max_tokens is not None else config.max_tokens
        try:
            windows_for(ids[name], n_ctx=config.n_ctx, protocol=config.protocol,
                        stride=config.stride, bos_id=m.bos_id, max_tokens=budget[name])
        except ValueError as e:
            raise ValueError(f"eval set `{name}` ({s.path}): {e}") from None
    return ids, budget


def _score_set(config: Config, m, ref, name: str, text: str, ids: list[int],
               budget: int | None, results: dict) -> tuple[dict, dict, dict]:
    """(results entry, metrics, timings) of one eval set: perplexity, then the KL divergence
    from the reference when there is one."""
    s = config.eval_sets[name]
    compare = None
    if ref is not None:
        from steps.kld import Comparison

        # the model's logits of the perplexity pass itself, compared as they come
        compare = Comparison(ref, config.batch_size)
    r = perplexity(m, token_ids=ids, n_ctx=config.n_ctx, protocol=config.protocol,
                   stride=config.stride, batch_size=config.batch_size, max_tokens=budget,
                   on_logits=compare)
    r |= {"path": _name(s.path), "kind": s.kind, "model": results["model"],
          "adapters": results["adapters"],
          "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    flat = {f"{name}.{k}": r[k] for k in ("ppl", "ppl_err", "bits_per_byte", "char_ppl",
                                          "n_scored", "n_tokens", "tokens_per_s")
            if r[k] is not None}
    timing = {k: r.pop(k) for k in ("seconds", "tokens_per_s")}
    if compare is not None:
        r["kld"] = compare.summary() | {"n_ctx": config.n_ctx}
        timing["kld_seconds"] = compare.seconds
        # the extra work made visible: its seconds go to MLflow, not into results.json
        flat |= {f"{name}.{k}": r["kld"][k] for k in KLD_METRICS if r["kld"].get(k) is not None}
        flat[f"{name}.kld_seconds"] = compare.seconds
    return r, flat, timing


def _run_loaded(config: Config, out_dir: Path, m, texts: dict, prompts: list, mc_sets: dict,
                on_metrics, ref=None) -> dict:
    # n_vocab (embedding rows; a GGUF's token list, which both converters pad to those rows) and
    # each text's sha256 let the report compare like with like: one model's HF and GGUF forms
    # share both, so their n_text_tokens must agree (steps/report.py)
    # models, adapters and eval sets by file or directory name, not path: the same evaluation in
    # another workspace writes the same bytes (the manifest's inputs name them by digest)
    results = {"model": _name(m.path), "backend": m.kind, "adapters": [_name(a) for a in m.adapters],
               "protocol": config.protocol, "n_ctx": config.n_ctx, "n_vocab": m.n_vocab,
               "sets": {}}
    if ref is not None:  # only then: without a reference, results.json is what it always was
        results["reference"] = _name(ref.path)
    metrics: dict = {}
    timings: dict = {"sets": {}, "generations": []}
    ids, budget = _tokenize_sets(config, m, texts)
    if ref is not None:
        from steps.kld import same_tokenizer

        # a reference with another tokenizer is refused here, before any scoring
        same_tokenizer(m, ref, texts.items(), model_ids=ids)
    for step, name in enumerate(texts):
        r, flat, timings["sets"][name] = _score_set(config, m, ref, name, texts[name],
                                                    ids[name], budget[name], results)
        results["sets"][name] = r
        metrics |= flat
        if on_metrics:
            on_metrics(flat, step)
    if mc_sets:
        results["mc"], flat, timings["mc"] = _score_mc(config, m, mc_sets, out_dir)
        metrics |= flat

    generations = []
    for mode in config.modes if prompts else []:
        generations += generate(m, prompts, template=config.template,
                                max_new_tokens=config.max_new_tokens, greedy=mode == "greedy",
                                temperature=config.temperature, top_p=config.top_p,
                                top_k=config.top_k, repetition_penalty=config.repetition_penalty,
                                seed=config.seed)
    if generations:
        metrics["generations"] = len(generations)
        metrics["gen_tokens_per_s"] = (sum(g["n_new_tokens"] for g in generations)
                                       / max(sum(g["seconds"] for g in generations), 1e-9))
    results["generations"] = len(generations)
    timings["generations"] = [g.pop("seconds") for g in generations]
    (out_dir / TIMINGS).write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False),
                                          encoding="utf-8")
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as f:
        for g in generations:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
    return metrics


def _score_mc(config: Config, m, mc_sets: dict, out_dir: Path) -> tuple[dict, dict, dict]:
    """(results["mc"], metrics, seconds per set) of the multiple-choice sets; every question's
    pick and the four scores go to mc_answers.jsonl."""
    from steps.mc import evaluate_set

    if m.kind == "gguf" and m.n_ctx < config.mc_n_ctx:
        # a context of its own for the long few-shot prompts: opening the perplexity context
        # larger would move llama.cpp's numbers away from llama-perplexity's at -c n_ctx
        # (stories260K q8_0 by 1.3e-3); the weights are mmap'd, so the second copy costs little
        mc_model = GGUFModel(m.path, n_ctx=config.mc_n_ctx, n_threads=config.n_threads,
                             device=config.device, extra_buffers=config.extra_buffers,
                             flash_attn=config.flash_attn)
        try:
            return _score_mc(config, mc_model, mc_sets, out_dir)
        finally:
            mc_model.close()
    n_ctx = getattr(m, "n_ctx", None)  # a GGUF's opened context; HF models take any length
    out, flat, seconds = {}, {}, {}
    with open(out_dir / "mc_answers.jsonl", "w", encoding="utf-8") as f:
        for name, subjects in mc_sets.items():
            t0 = time.perf_counter()
            summary, records = evaluate_set(m, name, config.mc_sets[name], subjects,
                                            config.mc_shots, style=config.mc_style,
                                            scoring=config.mc_scoring, max_len=n_ctx)
            seconds[name] = time.perf_counter() - t0
            s = config.mc_sets[name]
            out[name] = {"layout": s.layout, "split": s.split or DEFAULT_SPLIT[s.layout],
                         "style": config.mc_style, "scoring": config.mc_scoring} | summary
            for shot, r in summary.items():
                flat[f"mc.{name}.{shot}.acc"] = r["acc"]
                flat[f"mc.{name}.{shot}.n"] = r["n"]
                flat |= {f"mc.{name}.{shot}.{c}.acc": v["acc"] for c, v in r["categories"].items()}
                flat |= {f"mc.{name}.{shot}.subject.{k}.acc": v["acc"]
                         for k, v in r["subjects"].items()}
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out, flat, seconds
