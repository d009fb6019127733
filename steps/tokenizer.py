"""SentencePiece <-> Hugging Face tokenizer files, shared by convert, vocab and merge.

Every model directory the pipeline writes carries the SentencePiece `tokenizer.model` (llama.cpp
and the vocab stage read it) next to the HF files (`tokenizer.json`, `tokenizer_config.json`)
built from it, so both runtimes see one vocabulary and, on plain text, the same ids.

Why the HF tokenizer is built here instead of by `LlamaTokenizer.from_pretrained` (transformers 5):
- its BPE merges are ranked by piece id, while SentencePiece (and llama.cpp) merge by piece score.
  LLaMA's whitespace-run pieces ("▁▁", id 259, score -1e9) then merge first in HF and last in
  SentencePiece, and pieces appended by a vocabulary merge rank by id whatever their score;
- its Metaspace pre-tokenizer does not add the dummy prefix to text that already starts with a
  space, so " = Robert =" (every wikitext line) loses a token compared with SentencePiece;
- loading a tokenizer.json as `LlamaTokenizer` rebuilds that pre-tokenizer whatever the file says.
So the tokenizer.json written here ranks merges by score, puts SentencePiece's normalisation in a
normalizer (the "legacy" Llama conversion: prepend "▁", spaces -> "▁"), and is saved with the
generic fast-tokenizer class so AutoTokenizer loads it verbatim (transformers 5 and 4.x alike;
see save_tokenizer, which also writes the added_tokens.json llama.cpp's converter reads).
"""
from __future__ import annotations

import shutil
from pathlib import Path

# Every file a model or adapter directory may carry for its tokenizer (copied and digested as one).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def carries_tokenizer(directory: Path) -> bool:
    """Whether a model or adapter dir has a tokenizer of its own (HF or SentencePiece file)."""
    return any((Path(directory) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def tokenizer_source(model_dir: Path, adapters=()) -> Path:
    """The dir whose tokenizer goes with `model_dir` once `adapters` are applied in order: the
    last adapter that carries a tokenizer, else the model's own. An adapter that grew the
    vocabulary (SFT's [PAD]) carries the tokenizer it was trained with, and every later user of
    the model (training on top, merge, evaluate) must tokenize with that one."""
    src = Path(model_dir)
    for a in adapters:
        if carries_tokenizer(a):
            src = Path(a)
    return src


# sentencepiece_model_pb2 piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def load_sp_proto(sp_model: Path):
    """Parse a SentencePiece model file into its ModelProto, with an error naming the file."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp_model = Path(sp_model)
    if not sp_model.is_file():
        raise FileNotFoundError(f"{sp_model}: SentencePiece model not found")
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(sp_model.read_bytes())
    except DecodeError as e:
        raise ValueError(f"{sp_model} is not a SentencePiece model (protobuf parse failed: {e}); "
                         "pass a tokenizer.model written by sentencepiece") from None
    if len(proto.pieces) == 0:
        raise ValueError(f"{sp_model} is not a SentencePiece model (it has no pieces); pass a "
                         "tokenizer.model written by sentencepiece")
    return proto


def build_hf_tokenizer(sp_model: Path):
    """A `tokenizers.Tokenizer` that gives SentencePiece's ids for `sp_model` (a BPE model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    proto = load_sp_proto(sp_model)
    if proto.trainer_spec.model_type != 2:  # BPE
        raise ValueError(f"{sp_model}: model_type {proto.trainer_spec.model_type} is not BPE; LLaMA "
                         "tokenizers (and merged vocabularies built on them) are BPE")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # Only NORMAL pieces are merge results in SentencePiece (it never merges into control, byte,
    # unused or user-defined pieces); their priority is the score, highest first.
    skip = {p.piece for p in proto.pieces if p.type != NORMAL}
    scores = {p.piece: p.score for p in proto.pieces if p.type == NORMAL}
    merges = generate_merges(vocab, scores, skip_tokens=skip)
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                        byte_fallback=proto.trainer_spec.byte_fallback))

    spec = proto.normalizer_spec
    norm = []
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # SentencePiece drops leading and trailing spaces and collapses runs of them, where a
        # space is U+0020 after the charsmap above: with the identity normalizer "\n", "\t" and
        # U+3000 stay (byte pieces or their own pieces), with nmt_nfkc they have become " " by
        # now. normalizers.Strip would strip every Unicode whitespace (a story's leading and
        # trailing newlines), so only " " is matched here. \A and \z, not ^ and $: in these
        # regexes ^ and $ match at every line break, which would strip spaces around each "\n".
        norm += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(r" +\z"), ""),
                 normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == USER_DEFINED])
    return tok, proto


def save_hf_tokenizer(sp_model: Path, out_dir: Path, pad_token: str | None = None) -> int:
    """Write tokenizer.model plus HF tokenizer files for `sp_model` into `out_dir`.

    Returns len(tokenizer) (SentencePiece pieces plus added tokens such as a pad token).
    BOS is prepended and EOS is not, as LLaMA's tokenizer does. A pad token that is not a piece
    of `sp_model` is added as a special token after the last piece (Chinese-Alpaca's [PAD] = 49953)."""
    from transformers import PreTrainedTokenizerFast

    sp_model, out_dir = Path(sp_model), Path(out_dir)
    backend, proto = build_hf_tokenizer(sp_model)
    spec = proto.trainer_spec
    piece = lambda i: proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None  # noqa: E731
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=piece(spec.unk_id), bos_token=piece(spec.bos_id),
        eos_token=piece(spec.eos_id), add_bos_token=spec.bos_id >= 0, add_eos_token=False,
        clean_up_tokenization_spaces=False)
    if pad_token is None and spec.pad_id >= 0:
        pad_token = piece(spec.pad_id)
    if pad_token is not None:
        tok.add_special_tokens({"pad_token": pad_token})
    # BOS lives in tokenizer.json's post-processor: transformers 5 drops add_bos_token from
    # tokenizer_config.json whenever a tokenizer.json is present (tok.add_bos_token reads False
    # after loading, yet ids start with BOS).
    save_tokenizer(tok, out_dir)
    if sp_model.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    return len(tok)


# The class tokenizer_config.json names: transformers 4.x knows no "TokenizersBackend" (what 5
# writes) and refuses to load it; 4.x loads "PreTrainedTokenizerFast" from tokenizer.json as it
# stands, and 5 maps the name onto TokenizersBackend, which also takes tokenizer.json verbatim.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def save_tokenizer(tok, out_dir: Path) -> None:
    """`tok.save_pretrained(out_dir)` plus what other readers of the files need.

    - tokenizer_config.json names TOKENIZER_CLASS, so transformers 4.x and 5 both load it;
    - added_tokens.json maps each added token that is not a vocabulary piece ([PAD]) to its id,
      as transformers 4.x wrote it and Chinese-LLaMA-Alpaca's tokenizers ship it. llama.cpp's
      convert_hf_to_gguf.py builds the GGUF vocabulary from tokenizer.model and fills the ids
      past its pieces from added_tokens.json (text as given, USER_DEFINED); without the file
      [PAD] became the placeholder "[PAD49953]", UNUSED. USER_DEFINED is also what the quantize
      stage's exporter gives it, so both routes to a GGUF give one vocabulary.
      No added_tokens_decoder is written: the converter turns every entry marked special into a
      CONTROL token, <unk> included (UNKNOWN in tokenizer.model), and both transformers versions
      take the added tokens from tokenizer.json."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    cfg_file = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = TOKENIZER_CLASS
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    data = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = data["model"]["vocab"]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])
             if t["content"] not in pieces}
    if added:
        (out_dir / "added_tokens.json").write_text(
            json.dumps(added, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        (out_dir / "added_tokens.json").unlink(missing_ok=True)
