"""vocab stage: train or take a Chinese SentencePiece model, merge it into the LLaMA tokenizer,
and resize the model's embeddings to the merged vocabulary (Chinese-LLaMA-Alpaca's
merge_tokenizers.py and resize_token_embeddings; docs/recipe.md, "Appended pieces need scores that
order them").

The merge works on the SentencePiece ModelProto, as the recipe's merge_tokenizers.py does: the base
pieces keep their ids, scores and order; each extra piece not already present is appended. Two
defects of the recipe are fixed:
- scores: the recipe appends every piece with score 0. SentencePiece (and llama.cpp) merge by
  score, breaking ties by position; a Hugging Face BPE merge list breaks them by rank, so the two
  disagree on ~60% of Chinese lines. Here appended pieces continue the base's strictly descending
  scores (score_strategy="rank"): no ties, and merge priority by score == by id, so a converter
  that ranks the new merges by score (steps/tokenizer.py, llama.cpp) or by id (transformers 5's
  own) orders them as SentencePiece does. Measured: HF ids == SentencePiece ids on every line of
  the CLUE corpus sample and of wikitext-2 test (score 0: 61% / 38% of lines differ).
  The price: pieces and ids are the recipe's, but SentencePiece (and llama.cpp) now segment 61%
  of CLUE lines (54% of wikitext lines) otherwise than the recipe's merged tokenizer.model does
  (457,389 vs 456,726 tokens on CLUE). score_strategy="zero" writes the recipe's tokenizer.model
  exactly (`vocab.score_strategy=zero`); its HF tokenizer then disagrees with it as above, since
  SentencePiece breaks score ties by position and a BPE merge list cannot. Each run records
  which one it used (the stage's params, vocab_report.json) and, with eval_zh/eval_en, the share
  of lines segmented otherwise than the recipe's (differs_from_recipe_lines_*).
- English: chinese_sp brings Latin and digit pieces that retokenize ~55% of wikitext lines (65%
  with the recipe's score-0 pieces).
  mode="cjk" appends only pieces containing CJK characters, so text without CJK is untouched.

extend_model streams the safetensors tensor by tensor (one tensor in memory at a time): old rows
are copied bit for bit, new rows initialised by `init`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from steps import Stage, vocab_bpe
from steps.files import data_files
from steps.tokenizer import (NORMAL, TOKENIZER_FILES, UNUSED, USER_DEFINED, load_sp_proto,
                             save_hf_tokenizer)

VERSION = "3"
STAGE = Stage()

TRAIN_THREADS = 2   # SentencePiece trainer threads when none are given (see Config.num_threads)

Mode = Literal["all", "cjk", "given", "none", "add_tokens"]
Init = Literal["mean", "subword_mean", "normal"]
ScoreStrategy = Literal["rank", "zero"]


class Config(BaseModel):
    """vocab stage: merge a Chinese SentencePiece model into the model's LLaMA tokenizer and
    resize embed_tokens/lm_head to the merged vocabulary. Defaults = Chinese-LLaMA."""
    model_config = ConfigDict(extra="forbid")
    extra_sp: Path | None = Field(None, description=(
        "an existing SentencePiece model to merge, e.g. Chinese-LLaMA-Alpaca's 20K "
        "chinese_sp.model (LLaMA 32000 + its 17953 new pieces = 49953). null: train one on "
        "`corpus` with the settings below"))
    corpus: list[Path] | Path | None = Field(None, description=(
        "text to train the extra model on when extra_sp is null: files or directories of .txt "
        "(one text per line) and .jsonl (a `text` field per line); streamed, never loaded whole"))
    vocab_size: int = Field(20000, description=(
        "trainer settings (those of chinese_sp.model) from here to character_coverage. "
        "vocab_size counts the extra model's own pieces; the ones LLaMA already has are skipped "
        "at merge time"))
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="unigram | bpe")
    character_coverage: float = Field(0.9995, description="share of the corpus's characters the "
                                                          "pieces cover")
    input_sentence_size: int = Field(2_000_000, description="lines the trainer samples at random "
                                                            "from the corpus (0: all of them)")
    # The trained model depends on the thread count (the trainer splits the sentences among its
    # threads and sums their counts in that order), so it is a fixed number, part of the cache
    # key, never this machine's core count: the same corpus gives the same pieces everywhere.
    num_threads: int = Field(TRAIN_THREADS, ge=1, description=(
        "trainer threads; fixed, not the core count: the trained pieces depend on it"))
    mode: Mode = Field("all", description=(
        "all: append every missing piece (the recipe; it also retokenizes ~55% of English lines, "
        "since chinese_sp brings Latin and digit pieces). cjk: only pieces with a CJK character "
        "(English stays tokenized exactly as before; Chinese ratio 0.470 instead of 0.457 of the "
        "base token count). Both merge SentencePiece models: SentencePiece bases only "
        "(LLaMA-1/2).\n"
        "given: `tokenizer`, a finished SentencePiece tokenizer.model that extends the base's "
        "(its first pieces are the base's, in order; Chinese-LLaMA-2's 55,296-piece "
        "scripts/tokenizer/tokenizer.model), taken as it is; the rows grow to its size.\n"
        "none: no extension, the model passes through; with eval_zh/eval_en the run reports the "
        "base's tokens per character (tokens_per_char_zh_base), which tells whether extending "
        "would pay (Llama 3, whose 128K vocabulary already covers Chinese).\n"
        "add_tokens: add the whole tokens of add_tokens/add_tokens_file to a byte-level BPE "
        "tokenizer (Llama 3's tokenizer.json) and grow the rows by `init`"))
    tokenizer: Path | None = Field(None, description=(
        "mode given: the finished tokenizer.model. Its appended pieces keep their own scores, "
        "so with score 0 ones (Chinese-LLaMA-2's) the HF ids differ from SentencePiece's on "
        "part of the Chinese lines, as with score_strategy zero (hf_sp_mismatch_lines_*)"))
    add_tokens: list[str] = Field(default_factory=list, description=(
        "mode add_tokens: tokens to add, each kept whole (one id wherever it occurs); tokens the "
        "base already encodes as one id are skipped"))
    add_tokens_file: Path | None = Field(None, description=(
        "mode add_tokens: a UTF-8 file of tokens to add, one a line (added after add_tokens)"))
    pad_token: str | None = Field(None, description=(
        "Chinese-Alpaca adds \"[PAD]\" as one more special token (49954); null for Chinese-LLaMA "
        "(49953)"))
    pad_to_multiple_of: int | None = Field(None, description=(
        "append unused pieces until len(tokenizer) is a multiple of this (256: every K-quant "
        "divides the rows; Chinese-LLaMA-2 chose 55296 = 216 x 256). null: no padding"))
    score_strategy: ScoreStrategy = Field("rank", description=(
        "scores of appended pieces (the pieces and their ids are the same either way).\n"
        "rank: continue the base's descending scores, so Hugging Face and SentencePiece/llama.cpp "
        "give the same ids on every line. SentencePiece then segments some lines otherwise than "
        "the recipe's merged tokenizer.model (61% of CLUE lines with chinese_sp; 457,389 vs "
        "456,726 tokens): the vocab run's differs_from_recipe_lines_* metrics measure it on "
        "eval_zh/eval_en.\n"
        "zero: the recipe's score 0, i.e. its tokenizer.model exactly (SentencePiece and "
        "llama.cpp segment as upstream); the HF tokenizer the training stages use then gives "
        "other ids on ~61% of Chinese lines (hf_sp_mismatch_lines_*), as SentencePiece breaks "
        "score ties by position.\n"
        "Each run records its choice: the stage's MLflow params and vocab_report.json "
        "(score_strategy, score_strategy_effect)"))
    init: Init = Field("mean", description=(
        "new embedding/lm_head rows: mean (of the old rows), subword_mean (of the old rows of "
        "the pieces the base tokenizer splits each new piece into), normal (N(0, "
        "initializer_range), seeded)"))
    seed: int = Field(0, description="seed of the trainer's sentence sampling and of "
                                         "init=normal")
    eval_zh: Path | None = Field(None, description=(
        "held-out Chinese text for tokens-per-character before and after (optional)"))
    eval_en: Path | None = Field(None, description="held-out English text, the same (optional)")

DATA_FIELDS = ("extra_sp", "corpus", "tokenizer", "eval_zh", "eval_en", "add_tokens_file")


# --------------------------------------------------------------------------------------------
# Training an extra tokenizer
# --------------------------------------------------------------------------------------------

def _corpus_files(corpus: list[Path] | Path) -> list[Path]:
    """.txt (one text per line) and .jsonl (a `text` field per line) files, directories expanded."""
    return data_files([corpus] if isinstance(corpus, (str, Path)) else corpus,
                      (".txt", ".jsonl"), "vocab.corpus")


def iter_corpus(corpus: list[Path] | Path) -> Iterator[str]:
    """Non-empty lines of .txt files and the `text` field of .jsonl records, one at a time."""
    for f in _corpus_files(corpus):
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if f.suffix == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{f}:{n}: not a JSON object with a `text` field") from None
                else:
                    text = line.rstrip("\r\n")
                if text.strip():
                    yield text


def train_tokenizer(corpus: list[Path] | Path, out_dir: Path, vocab_size: int,
                    model_type: str = "unigram", character_coverage: float = 0.9995,
                    input_sentence_size: int = 2_000_000, shuffle: bool = True,
                    num_threads: int | None = TRAIN_THREADS, seed: int = 0, **trainer_kwargs) -> Path:
    """Train a SentencePiece model on `corpus` (files or directories of .txt/.jsonl) and return
    out_dir/tokenizer.model. Lines are streamed into the trainer, which keeps a random sample of
    `input_sentence_size` of them (0: all), so a multi-GB corpus is never loaded whole.

    Defaults suit a model meant for merging into LLaMA's: the identity normalizer (LLaMA's; the
    recipe's nmt_nfkc would fold the full-width punctuation "，" to ","), digits split as LLaMA
    does, no byte pieces (the base has them). `trainer_kwargs` go to SentencePieceTrainer.

    The pieces depend on num_threads (None: TRAIN_THREADS, not the machine's cores). The model
    file records no path: the trainer's model_prefix (where it was written, a temp dir inside
    the stage) is set to the bare file name, so the same corpus and settings give the same
    bytes in any directory."""
    import sentencepiece as spm

    _corpus_files(corpus)  # fail on a bad path before starting the trainer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    options = dict(model_type=model_type, vocab_size=vocab_size,
                   character_coverage=character_coverage, input_sentence_size=input_sentence_size,
                   shuffle_input_sentence=shuffle, num_threads=num_threads or TRAIN_THREADS,
                   normalization_rule_name="identity", split_digits=True, byte_fallback=False,
                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384,
                   minloglevel=2)
    options.update(trainer_kwargs)
    corpus_errors: list[Exception] = []

    def lines() -> Iterator[str]:
        try:
            yield from iter_corpus(corpus)
        except Exception as e:  # the trainer would re-raise it as an opaque RuntimeError
            corpus_errors.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines(),
                                       model_prefix=str(out_dir / "tokenizer"), **options)
    except RuntimeError as e:
        if corpus_errors:
            raise corpus_errors[0] from None
        raise ValueError(f"training a SentencePiece model on {corpus} with vocab_size={vocab_size} "
                         f"failed: {e}. vocab_size must cover the corpus' required characters "
                         "and not exceed what the corpus supports: change vocab_size (or "
                         "character_coverage) as the message says") from None
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    model_file = out_dir / "tokenizer.model"
    proto = load_sp_proto(model_file)
    proto.trainer_spec.model_prefix = model_file.stem
    model_file.write_bytes(proto.SerializeToString())
    return model_file


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------

# Han ideographs (all blocks), radicals, CJK punctuation, kana, bopomofo, hangul, CJK
# compatibility and full-width forms: the characters that never occur in plain English text.
_CJK_RANGES = ((0x1100, 0x11FF), (0x2E80, 0x9FFF), (0xA960, 0xA97F), (0xAC00, 0xD7FF),
               (0xF900, 0xFAFF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF),
               (0x1B000, 0x1B16F), (0x1F200, 0x1F2FF), (0x20000, 0x3FFFF))


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def has_cjk(text: str) -> bool:
    return any(is_cjk(c) for c in text)


# What each score_strategy changes, written into vocab_report.json (logged with the stage's run).
SCORE_STRATEGY_EFFECT = {
    "rank": "appended pieces continue the base's descending scores: the Hugging Face tokenizer "
            "gives SentencePiece's (and llama.cpp's) ids; pieces and ids are the recipe's, but "
            "lines may be segmented otherwise than by the recipe's score-0 tokenizer.model "
            "(differs_from_recipe_lines_*); vocab.score_strategy=zero writes that one exactly",
    "zero": "appended pieces score 0, as the recipe's merge_tokenizers.py: tokenizer.model is the "
            "recipe's exactly (SentencePiece and llama.cpp segment as upstream), but the Hugging "
            "Face tokenizer the training stages use gives other ids on many Chinese lines "
            "(hf_sp_mismatch_lines_*)",
}


def recipe_tokenizer(merged_sp: Path, base_pieces: int):
    """A SentencePieceProcessor for the recipe's merge of the same pieces: `merged_sp` with every
    piece past the first `base_pieces` at score 0 (what merge_tokenizers.py appends)."""
    import sentencepiece as spm

    proto = load_sp_proto(merged_sp)
    for p in proto.pieces[base_pieces:]:
        p.score = 0.0
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def merge_tokenizers(base_sp: Path, extra_sp: Path, out_dir: Path, mode: Mode = "all",
                     pad_token: str | None = None, pad_to_multiple_of: int | None = None,
                     score_strategy: ScoreStrategy = "rank") -> Path:
    """Append the pieces of `extra_sp` missing from `base_sp` (a BPE model such as LLaMA's) and
    write out_dir/tokenizer.model, the HF tokenizer files and vocab_report.json; returns out_dir.

    mode "cjk" appends only pieces with a CJK character. pad_token is added as an HF special
    token after the last piece ([PAD] = 49953 -> len 49954). pad_to_multiple_of appends unused
    pieces "<unused{i}>" (never produced by encoding) until len(tokenizer) % N == 0.
    score_strategy "rank" continues the base's descending scores (SentencePiece == HF ids);
    "zero" is the recipe's score 0: its tokenizer.model exactly, HF ids then differ (see the
    module docstring)."""
    base_sp, extra_sp, out_dir = Path(base_sp), Path(extra_sp), Path(out_dir)
    base, extra = load_sp_proto(base_sp), load_sp_proto(extra_sp)
    if base.trainer_spec.model_type != 2:
        raise ValueError(f"{base_sp}: the base tokenizer must be a BPE SentencePiece model like "
                         f"LLaMA's (model_type {base.trainer_spec.model_type})")
    if mode not in ("all", "cjk"):
        raise ValueError(f"mode={mode!r}: use 'all' or 'cjk'")
    if score_strategy not in ("rank", "zero"):
        raise ValueError(f"score_strategy={score_strategy!r}: use 'rank' or 'zero'")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of}: must be a positive integer")

    base_count = len(base.pieces)
    merged = _MergedPieces(base, score_strategy)
    counts = _append_extra_pieces(merged, extra, mode)
    counts["added_chars"] = _append_missing_chars(merged)
    counts["unused_pieces"] = _append_unused_pieces(merged, pad_token, pad_to_multiple_of)

    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = out_dir / "tokenizer.model"
    model_file.write_bytes(base.SerializeToString())
    n_tokens = save_hf_tokenizer(model_file, out_dir, pad_token=pad_token)
    report = dict(base_sp=Path(base_sp).name, extra_sp=Path(extra_sp).name, mode=mode,
                  score_strategy=score_strategy,
                  score_strategy_effect=SCORE_STRATEGY_EFFECT[score_strategy],
                  base_pieces=base_count,
                  extra_pieces=len(extra.pieces),
                  pieces_added=len(merged.added) - counts["unused_pieces"],
                  merged_pieces=len(base.pieces), pad_token=pad_token, tokenizer_size=n_tokens,
                  pad_to_multiple_of=pad_to_multiple_of, **counts)
    (out_dir / "vocab_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return out_dir


def check_extends(base_sp: Path, given_sp: Path, base=None, given=None) -> None:
    """Raise unless `given_sp` extends `base_sp`: the base's pieces first, with the same ids and
    types, and the same normalizer and model type; else the base model's rows would stand for
    other text."""
    base = base if base is not None else load_sp_proto(base_sp)
    given = given if given is not None else load_sp_proto(given_sp)
    fix = ("vocab.tokenizer must extend the base tokenizer; to build one from a Chinese "
           "SentencePiece model use vocab.mode=all with vocab.extra_sp")
    if len(given.pieces) < len(base.pieces):
        raise ValueError(f"vocab.tokenizer={given_sp}: {len(given.pieces)} pieces, fewer than the "
                         f"base's {len(base.pieces)} ({base_sp}): {fix}")
    for i, (b, g) in enumerate(zip(base.pieces, given.pieces)):
        if (b.piece, b.type) != (g.piece, g.type):
            raise ValueError(f"vocab.tokenizer={given_sp}: id {i} is {g.piece!r} (type {g.type}), "
                             f"the base's is {b.piece!r} (type {b.type}) in {base_sp}: {fix}")
    if given.normalizer_spec != base.normalizer_spec or \
            given.trainer_spec.model_type != base.trainer_spec.model_type:
        raise ValueError(f"vocab.tokenizer={given_sp}: its normalizer or model type differs from "
                         f"{base_sp}'s, so the base's own text would tokenize otherwise: {fix}")


def take_tokenizer(base_sp: Path, given_sp: Path, out_dir: Path, pad_token: str | None = None,
                   pad_to_multiple_of: int | None = None) -> Path:
    """out_dir/tokenizer.model = `given_sp` byte for byte, with the HF tokenizer files and
    vocab_report.json (as merge_tokenizers writes them); returns out_dir. `given_sp` must
    extend `base_sp` (check_extends). A pad_token it lacks is added to the HF tokenizer after
    the last piece (tokenizer.model stays the given bytes); pad_to_multiple_of is checked, not
    applied: padding would change the file."""
    base_sp, given_sp, out_dir = Path(base_sp), Path(given_sp), Path(out_dir)
    base, given = load_sp_proto(base_sp), load_sp_proto(given_sp)
    check_extends(base_sp, given_sp, base, given)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(given_sp, out_dir / "tokenizer.model")
    n_tokens = save_hf_tokenizer(out_dir / "tokenizer.model", out_dir, pad_token=pad_token)
    if pad_to_multiple_of and n_tokens % pad_to_multiple_of:
        raise ValueError(f"vocab.tokenizer={given_sp}: {n_tokens} tokens"
                         f"{' with ' + pad_token if pad_token else ''}, not a multiple of "
                         f"vocab.pad_to_multiple_of={pad_to_multiple_of}: set it to null, or "
                         "pad the tokenizer itself")
    report = dict(base_sp=base_sp.name, tokenizer=given_sp.name, mode="given",
                  tokenizer_sha256=hashlib.sha256(given_sp.read_bytes()).hexdigest(),
                  base_pieces=len(base.pieces), merged_pieces=len(given.pieces),
                  pieces_added=len(given.pieces) - len(base.pieces), pad_token=pad_token,
                  tokenizer_size=n_tokens, pad_to_multiple_of=pad_to_multiple_of)
    (out_dir / "vocab_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return out_dir


class _MergedPieces:
    """The base ModelProto being appended to, the pieces it holds, and the score the next
    appended normal piece gets."""

    def __init__(self, proto, score_strategy: ScoreStrategy):
        self.proto, self.score_strategy = proto, score_strategy
        self.seen = {p.piece for p in proto.pieces}
        self.added: list[str] = []
        # Below every base score except LLaMA's -1e9 whitespace-run pieces, which must stay last.
        normal_scores = [p.score for p in proto.pieces if p.type == NORMAL and p.score > -1e8]
        self.next_score = (min(normal_scores) if normal_scores else 0.0) - 1.0

    def append(self, piece: str, kind: int = NORMAL) -> None:
        new = self.proto.pieces.add()
        new.piece, new.type = piece, kind
        new.score = 0.0 if self.score_strategy == "zero" or kind != NORMAL else self.next_score
        if kind == NORMAL and self.score_strategy == "rank":
            self.next_score -= 1.0
        self.seen.add(piece)
        self.added.append(piece)


def _append_extra_pieces(merged: _MergedPieces, extra, mode: Mode) -> dict[str, int]:
    """Append extra's normal and user-defined pieces the base lacks (in mode "cjk" only those with
    a CJK character); returns how many were duplicates, not CJK, or special."""
    counts = dict(duplicates=0, skipped_non_cjk=0, skipped_special=0)
    for p in extra.pieces:
        if p.type not in (NORMAL, USER_DEFINED):  # <unk>, <s>, </s>, byte and unused pieces
            counts["skipped_special"] += 1
            continue
        if p.piece in merged.seen:
            counts["duplicates"] += 1
            continue
        if mode == "cjk" and not has_cjk(p.piece):
            counts["skipped_non_cjk"] += 1
            continue
        merged.append(p.piece, p.type)
    return counts


def _append_missing_chars(merged: _MergedPieces) -> int:
    """Append each character of an appended piece that has no piece of its own; returns how many.

    A character missing from the vocabulary becomes byte pieces in HF's BPE before any merge,
    while SentencePiece merges raw characters: add it so both reach the pieces containing it.
    (Single characters are never merge results, so their place and score change no merge.)"""
    n = 0
    for piece in list(merged.added):
        for ch in piece if len(piece) > 1 else ():
            if ch not in merged.seen:
                merged.append(ch)
                n += 1
    return n


def _append_unused_pieces(merged: _MergedPieces, pad_token: str | None,
                          pad_to_multiple_of: int | None) -> int:
    """Append "<unused{i}>" pieces until the tokenizer (pieces + pad_token when new) has a
    multiple of pad_to_multiple_of tokens; returns how many."""
    n_pieces = len(merged.proto.pieces)
    extra_tokens = 1 if pad_token is not None and pad_token not in merged.seen else 0
    n_unused = (-(n_pieces + extra_tokens)) % pad_to_multiple_of if pad_to_multiple_of else 0
    appended, i = 0, 0
    while appended < n_unused:
        if f"<unused{i}>" not in merged.seen:
            merged.append(f"<unused{i}>", UNUSED)
            appended += 1
        i += 1
    return appended


# --------------------------------------------------------------------------------------------
# Measuring a merge
# --------------------------------------------------------------------------------------------

def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file (CRLF or LF)."""
    return [l for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


def compare_tokenizers(base_sp: Path, merged_dir: Path, lines: list[str]) -> dict:
    """On `lines`: characters, base and merged SentencePiece token counts (no BOS), the share of
    lines whose tokens changed, the round-trip failures, the share of lines where the HF
    tokenizer in merged_dir (AutoTokenizer) gives other ids than SentencePiece, and the share the
    merged SentencePiece model segments otherwise than the recipe's score-0 merge would."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    base = spm.SentencePieceProcessor(model_file=str(base_sp))
    merged = spm.SentencePieceProcessor(model_file=str(Path(merged_dir) / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(merged_dir))
    b, m = base.encode(lines), merged.encode(lines)
    h = hf(lines, add_special_tokens=False)["input_ids"] if lines else []
    r = recipe_tokenizer(Path(merged_dir) / "tokenizer.model", base.get_piece_size()).encode(lines)
    n = max(len(lines), 1)
    return dict(lines=len(lines), chars=sum(map(len, lines)), base_tokens=sum(map(len, b)),
                merged_tokens=sum(map(len, m)),
                retokenized=sum(x != y for x, y in zip(b, m)) / n,
                roundtrip_failures=sum(merged.decode(ids) != l for ids, l in zip(m, lines)),
                hf_sp_mismatch=sum(x != y for x, y in zip(m, h)) / n,
                differs_from_recipe=sum(x != y for x, y in zip(m, r)) / n)


# --------------------------------------------------------------------------------------------
# Extending the model
# --------------------------------------------------------------------------------------------

def _subword_ids(base_proto, pieces: list[str]) -> list[list[int]]:
    """The base-tokenizer ids each piece string splits into (no dummy prefix added)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.CopyFrom(base_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return sp.encode([p.replace("▁", " ") for p in pieces])


def _new_rows(old, n_new: int, init: str, subwords: list[list[int] | None], std: float, seed: int):
    """`n_new` rows for matrix `old` (rows x dim), computed in float32 and cast to old.dtype."""
    import torch

    old32 = old.to(torch.float32)
    mean = old32.mean(dim=0)
    if init == "normal":
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randn(n_new, old.shape[1], generator=gen) * std
    else:
        rows = mean.expand(n_new, -1).clone()
        if init == "subword_mean":
            for j, ids in enumerate(subwords):
                if ids:
                    rows[j] = old32[ids].mean(dim=0)
    return rows.to(old.dtype)


def extend_model(model_dir: Path, tokenizer_dir: Path, out_dir: Path, init: Init = "mean",
                 seed: int = 0) -> Path:
    """Write the HF model in `model_dir` with embed_tokens and lm_head resized to the merged
    vocabulary in `tokenizer_dir` (rows = len(tokenizer)) into `out_dir`, with the merged
    tokenizer files. Old rows are bit-identical; new rows by `init`:
    mean: the mean of the old rows; subword_mean: the mean of the old rows of the pieces the BASE
    tokenizer splits the new piece into (mean for pad/unused pieces); normal:
    N(0, initializer_range) from `seed`. Tensors are streamed one at a time."""
    import torch

    from steps.checks import tokenizer_size

    model_dir, tokenizer_dir, out_dir = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    shards = _extend_inputs(model_dir, tokenizer_dir, init)
    config = json.loads((model_dir / "config.json").read_text())
    old_vocab = int(config["vocab_size"])
    new_vocab, _ = tokenizer_size(tokenizer_dir)
    if new_vocab < old_vocab:
        raise ValueError(f"{tokenizer_dir} has {new_vocab} tokens but {model_dir} already has "
                         f"{old_vocab}: a merged tokenizer only appends pieces")
    n_new = new_vocab - old_vocab
    subwords = _subwords(model_dir, tokenizer_dir, init, old_vocab, n_new)
    std = float(config.get("initializer_range", 0.02))

    def grow(name: str, t):
        # embed_tokens and lm_head draw from different streams (seed, seed + 1)
        return torch.cat([t, _new_rows(t, n_new, init, subwords, std,
                                       seed + name.endswith("lm_head.weight"))])

    out_dir.mkdir(parents=True, exist_ok=True)
    resized = [name for shard in shards
               for name in _extend_shard(shard, out_dir / shard.name, old_vocab, new_vocab, grow)]
    if not any(n.endswith("embed_tokens.weight") for n in resized):
        raise ValueError(f"no embed_tokens.weight in {model_dir}/*.safetensors")
    _write_shard_index(model_dir, out_dir, shards)
    config["vocab_size"] = new_vocab
    pad_id = _pad_token_id(tokenizer_dir)
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (model_dir / "generation_config.json").is_file():
        shutil.copyfile(model_dir / "generation_config.json", out_dir / "generation_config.json")
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copyfile(tokenizer_dir / f, out_dir / f)
    return out_dir


def _subwords(model_dir: Path, tokenizer_dir: Path, init: str, old_vocab: int,
              n_new: int) -> list[list[int] | None]:
    """subword_mean's old-vocabulary ids per new row (None: the mean of all rows); a BPE
    tokenizer (no tokenizer.model) splits its added tokens with the base's tokenizer.json."""
    if not (tokenizer_dir / "tokenizer.model").is_file():
        if init != "subword_mean":
            return [None] * n_new
        added = {t["id"]: t["content"] for t in json.loads(
            (tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]}
        new = [added.get(old_vocab + j) for j in range(n_new)]
        split = vocab_bpe.subwords(model_dir, [t for t in new if t is not None], old_vocab)
        it = iter(split)
        return [next(it) if t is not None else None for t in new]
    merged = load_sp_proto(tokenizer_dir / "tokenizer.model")
    base = _base_tokenizer(model_dir, tokenizer_dir, merged, init)
    return _new_piece_subwords(base, merged, old_vocab, n_new) if init == "subword_mean" \
        else [None] * n_new


def _extend_inputs(model_dir: Path, tokenizer_dir: Path, init: str) -> list[Path]:
    """Fail early on a bad init or an input dir that is not what extend_model reads; returns the
    model's safetensors shards."""
    if init not in ("mean", "subword_mean", "normal"):
        raise ValueError(f"init={init!r}: use 'mean', 'subword_mean' or 'normal'")
    # a SentencePiece merge writes both files; a BPE tokenizer (vocab_bpe) tokenizer.json alone
    needed = ("tokenizer.model", "tokenizer.json") if vocab_bpe.is_sentencepiece_base(model_dir) \
        else ("tokenizer.json",)
    for f in needed:
        if not (tokenizer_dir / f).is_file():
            raise FileNotFoundError(f"{tokenizer_dir / f} not found: tokenizer_dir must be the "
                                    "output of merge_tokenizers (tokenizer.model + HF files)")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: model_dir must be a Hugging Face model "
                                "directory (run the convert stage first)")
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}: extend_model reads safetensors "
                                "(the convert stage writes them)")
    return shards


def _base_tokenizer(model_dir: Path, tokenizer_dir: Path, merged, init: str):
    """The model's own tokenizer.model (None when it has none), after checking that `merged` kept
    every one of its pieces at its id; subword_mean cannot do without it."""
    if (model_dir / "tokenizer.model").is_file():
        base = load_sp_proto(model_dir / "tokenizer.model")
        moved = [i for i, p in enumerate(base.pieces)
                 if i >= len(merged.pieces) or merged.pieces[i].piece != p.piece]
        if moved:
            raise ValueError(f"{tokenizer_dir / 'tokenizer.model'} was not merged from "
                             f"{model_dir / 'tokenizer.model'}: base piece id {moved[0]} differs; "
                             "merge the extra vocabulary into this model's own tokenizer")
        return base
    if init == "subword_mean":
        raise FileNotFoundError(f"{model_dir / 'tokenizer.model'} not found: init='subword_mean' "
                                "splits new pieces with the base tokenizer")
    return None


def _new_piece_subwords(base, merged, old_vocab: int, n_new: int) -> list[list[int] | None]:
    """For each new row, the old-vocabulary ids the base tokenizer splits its piece into; None for
    rows with no normal or user-defined piece (pad, unused)."""
    subwords: list[list[int] | None] = [None] * n_new
    if n_new:
        idx = [j for j in range(n_new) if old_vocab + j < len(merged.pieces)
               and merged.pieces[old_vocab + j].type in (NORMAL, USER_DEFINED)]
        for j, ids in zip(idx, _subword_ids(base, [merged.pieces[old_vocab + j].piece for j in idx])):
            subwords[j] = [i for i in ids if i < old_vocab]
    return subwords


def _extend_shard(shard: Path, out_file: Path, old_vocab: int, new_vocab: int, grow) -> list[str]:
    """Copy one safetensors shard to out_file, tensor by tensor, with the embed_tokens/lm_head
    rows grown from old_vocab to new_vocab by grow(name, tensor); returns the names resized."""
    from safetensors import safe_open

    from steps.safetensors_io import ST_DTYPES, read_header, read_metadata, write_safetensors

    specs, resized = [], []
    for name, info in read_header(shard).items():
        shape = info.shape
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            if shape[0] != old_vocab:
                raise ValueError(f"{shard}: {name} has {shape[0]} rows but config.json "
                                 f"vocab_size is {old_vocab}; fix the input model first")
            shape = (new_vocab, *shape[1:])
            resized.append(name)
        specs.append((name, shape, ST_DTYPES[info.dtype]))
    with safe_open(str(shard), framework="pt") as st:
        def tensors():
            for name, _, _ in specs:
                t = st.get_tensor(name)
                yield name, grow(name, t) if name in resized and new_vocab > old_vocab else t

        write_safetensors(out_file, specs, tensors(), read_metadata(shard))
    return resized


def _write_shard_index(model_dir: Path, out_dir: Path, shards: list[Path]) -> None:
    """A sharded model's index with the total size of the resized shards."""
    from steps.safetensors_io import read_header

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = sum(
            info.nbytes for shard in shards for info in read_header(out_dir / shard.name).values())
        (out_dir / index.name).write_text(json.dumps(data, indent=2))


def _pad_token_id(tokenizer_dir: Path) -> int | None:
    """The id of tokenizer_config.json's pad_token in the merged tokenizer (None when unset)."""
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()) \
        if (tokenizer_dir / "tokenizer_config.json").is_file() else {}
    if not tok_cfg.get("pad_token"):
        return None
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pad_ids = [t["id"] for t in vocab.get("added_tokens", []) if t["content"] == tok_cfg["pad_token"]]
    pad_ids = pad_ids or [vocab["model"]["vocab"].get(tok_cfg["pad_token"])]
    return pad_ids[0]


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------

def run(config: Config, out_dir: Path, *, on_metrics=None, model: Path) -> dict:
    """Merge config's extra tokenizer (given or trained on `corpus`) into `model`'s tokenizer and
    write the extended model with the merged tokenizer into out_dir (a normal HF model dir)."""
    from steps.checks import check_model

    start = time.time()
    model, out_dir = Path(model), Path(out_dir)
    if config.mode in vocab_bpe.BPE_MODES or not vocab_bpe.is_sentencepiece_base(model):
        return _run_without_merge(config, model, out_dir, start)
    base_sp = model / "tokenizer.model"
    if not base_sp.is_file():
        raise FileNotFoundError(f"{base_sp} not found: the vocab stage merges into the model's "
                                "SentencePiece tokenizer, which the convert stage writes")
    load_sp_proto(base_sp)
    if config.mode == "given":
        if config.tokenizer is None:
            raise ValueError("vocab.mode=given: set vocab.tokenizer (the finished tokenizer.model)")
        load_sp_proto(config.tokenizer)
    elif config.extra_sp is not None:
        load_sp_proto(config.extra_sp)   # a bad file fails here, before any work
    elif config.corpus is None:
        raise ValueError("vocab: set `extra_sp` (an existing SentencePiece model) or `corpus` (text "
                         "to train one on)")
    else:
        _corpus_files(config.corpus)
    _check_eval_files(config)

    work = out_dir / "_work"
    extra_sp = config.extra_sp
    if config.mode == "given":
        tok_dir = take_tokenizer(base_sp, config.tokenizer, work / "tokenizer",
                                 pad_token=config.pad_token,
                                 pad_to_multiple_of=config.pad_to_multiple_of)
    elif extra_sp is None:
        extra_sp = train_tokenizer(config.corpus, work / "extra", config.vocab_size,
                                   model_type=config.model_type,
                                   character_coverage=config.character_coverage,
                                   input_sentence_size=config.input_sentence_size,
                                   num_threads=config.num_threads, seed=config.seed)
    if config.mode != "given":
        tok_dir = merge_tokenizers(base_sp, extra_sp, work / "tokenizer", mode=config.mode,
                                   pad_token=config.pad_token,
                                   pad_to_multiple_of=config.pad_to_multiple_of,
                                   score_strategy=config.score_strategy)
    report = json.loads((tok_dir / "vocab_report.json").read_text())
    extend_model(model, tok_dir, out_dir, init=config.init, seed=config.seed)

    metrics = dict(base_vocab=report["base_pieces"], merged_pieces=report["merged_pieces"],
                   merged_vocab=report["tokenizer_size"], pieces_added=report["pieces_added"])
    for lang in ("zh", "en"):
        path = getattr(config, f"eval_{lang}")
        if path is not None:
            stats = compare_tokenizers(base_sp, out_dir, read_lines(path))
            metrics[f"tokens_per_char_{lang}_base"] = stats["base_tokens"] / max(stats["chars"], 1)
            metrics[f"tokens_per_char_{lang}_merged"] = stats["merged_tokens"] / max(stats["chars"], 1)
            metrics[f"retokenized_lines_{lang}"] = stats["retokenized"]
            metrics[f"hf_sp_mismatch_lines_{lang}"] = stats["hf_sp_mismatch"]
            metrics[f"differs_from_recipe_lines_{lang}"] = stats["differs_from_recipe"]
            report[f"eval_{lang}"] = stats
    (out_dir / "vocab_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if config.extra_sp is None and config.mode != "given":
        shutil.copyfile(extra_sp, out_dir / "extra_sp.model")
    shutil.rmtree(work)
    sizes = check_model(out_dir)
    metrics["embedding_rows"] = sizes.embed_rows
    metrics["seconds"] = time.time() - start
    return metrics


def _check_eval_files(config: Config) -> None:
    for field in ("eval_zh", "eval_en"):
        path = getattr(config, field)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"vocab.{field}={path}: file not found")


def _run_without_merge(config: Config, model: Path, out_dir: Path, start: float) -> dict:
    """vocab.mode none (pass the model through) or add_tokens (a BPE base grown by whole
    tokens), measured on eval_zh/eval_en with the HF tokenizers (steps/vocab_bpe.py)."""
    from steps.checks import check_model, tokenizer_size

    vocab_bpe.check_mode(config.mode, vocab_bpe.is_sentencepiece_base(model), str(model))
    _check_eval_files(config)
    if config.mode == "none":
        vocab_bpe.pass_through(model, out_dir)
        report = dict(mode="none", base_pieces=tokenizer_size(model)[0], pieces_added=0)
    else:
        tokens = vocab_bpe.read_token_list(config.add_tokens, config.add_tokens_file)
        if not tokens:
            raise ValueError("vocab.mode=add_tokens: set vocab.add_tokens (a list of tokens) or "
                             "vocab.add_tokens_file (one token a line)")
        work = out_dir / "_work"
        report = vocab_bpe.add_tokens(model, tokens, work / "tokenizer")
        extend_model(model, work / "tokenizer", out_dir, init=config.init, seed=config.seed)
        shutil.rmtree(work)
    metrics = dict(base_vocab=report["base_pieces"], merged_vocab=tokenizer_size(out_dir)[0],
                   pieces_added=report["pieces_added"])
    for lang in ("zh", "en"):
        path = getattr(config, f"eval_{lang}")
        if path is not None:
            lines = read_lines(path)
            chars = max(sum(map(len, lines)), 1)
            stats = dict(lines=len(lines), chars=chars,
                         base_tokens=vocab_bpe.count_tokens(model, lines),
                         merged_tokens=vocab_bpe.count_tokens(out_dir, lines))
            metrics[f"tokens_per_char_{lang}_base"] = stats["base_tokens"] / chars
            metrics[f"tokens_per_char_{lang}_merged"] = stats["merged_tokens"] / chars
            report[f"eval_{lang}"] = stats
    (out_dir / "vocab_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    metrics["embedding_rows"] = check_model(out_dir).embed_rows
    metrics["seconds"] = time.time() - start
    return metrics
