"""Llama 3 / 3.1 / 3.2 in Meta's layout: params.json, model-parallel shards, tiktoken vocabulary.

What differs from LLaMA-1/2 (steps/meta.py), as Meta's llama3 model.py, args.py and tokenizer.py
have it:
- tok_embeddings is a VocabParallelEmbedding, sharded on the vocabulary (dim 0), where LLaMA-1/2's
  ParallelEmbedding split the embedding dim; every other tensor splits as before. fairscale divides
  each sharded dim by the model-parallel size with no remainder, so Meta's shards are always equal;
  unequal parts mean shards of different checkpoints or a damaged file.
- `use_scaled_rope: true` (3.1, 3.2) stretches the rotary frequencies, and params.json carries no
  factors: Meta's model.py hard-codes factor 8, low/high-frequency factors 1 and 4 and the original
  context 8192, and its args.py reads no other rope key. So a params.json with use_scaled_rope and
  nothing else is complete, and convert follows that code. The one exception is 3.2 1B/3B, released
  with factor 32 in their HF configs while their params.json is the same as 3.1's: conf/model/
  names that factor (`rope_scaling_factor`) and convert takes it from there.
- tokenizer.model is a tiktoken BPE file (`<base64 bytes> <rank>` a line, 128000 ranks), followed
  by 256 special tokens whose names and order tokenizer.py fixes. The HF tokenizer.json is made by
  transformers' own TikTokenConverter from the ranks read here (so tiktoken itself is not needed
  to convert), with Llama 3's pre-tokenizer pattern and BOS prepended as Meta's encode(bos=True).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path

from steps.meta import MetaFormatError, MetaParams
from steps.meta import shard_dim as _llama2_shard_dim

# tokenizer.py's pat_str: the pre-tokenizer split that tiktoken applies before merging.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
N_SPECIAL = 256
_NAMED_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>")
SPECIAL_TOKENS = _NAMED_SPECIAL + tuple(f"<|reserved_special_token_{2 + i}|>"
                                        for i in range(N_SPECIAL - len(_NAMED_SPECIAL)))
# An instruct model ends a turn with <|eot_id|> and a tool call with <|eom_id|>; a base model
# ends its text with <|end_of_text|> (tokenizer.py's stop_tokens are all three).
INSTRUCT_STOP = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

ORIGINAL_CONTEXT = 8192     # Llama 3's context, the `old_context_len` of scaled rope
SCALED_CONTEXT = 131072     # 3.1 / 3.2 with scaled rope
# model.py's apply_scaling constants, as HF's `llama3` rope type names them.
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT}

# Meta's chat format (chat_format.py): BOS once, then per message a header with the role
# ("tool" is written "ipython"), a blank line, the content as given and <|eot_id|>; the prompt
# ends with the assistant's header for the model to continue.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")


@dataclass(frozen=True)
class Llama3Params(MetaParams):
    """params.json of Llama 3.x: MetaParams plus use_scaled_rope (args.py's only other key)."""
    use_scaled_rope: bool = False

    @classmethod
    def _check_family(cls, d: dict, source: str) -> None:
        v = d.get("use_scaled_rope", False)
        if not isinstance(v, bool):
            raise MetaFormatError(f"{source}: field use_scaled_rope = {v!r} must be true or false")

    def to_json(self) -> dict:
        d = super().to_json()
        if not d.get("use_scaled_rope"):
            d.pop("use_scaled_rope", None)
        return d


def is_tiktoken(path: Path) -> bool:
    """Whether `path` is a tiktoken BPE file (text, `<base64> <rank>` lines); SentencePiece's
    tokenizer.model is protobuf and starts with a non-base64 byte."""
    try:
        with open(path, "rb") as f:
            first = f.read(256).split(b"\n", 1)[0]
    except OSError:
        return False
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} \d+\r?", first) is not None


def read_ranks(path: Path) -> dict[bytes, int]:
    """The tiktoken file's {token bytes: rank}, every line checked: a skipped or repeated line
    would shift no id yet leave a token the model never learnt, so any bad line is an error."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if len(parts) != 2 or rank < 0 or token in ranks:
                raise ValueError
        except (IndexError, ValueError, binascii.Error):
            raise MetaFormatError(f"{path}:{lineno}: not a tiktoken line ('<base64 bytes> "
                                  f"<rank>', each token once): {line[:60]!r}") from None
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise MetaFormatError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise MetaFormatError(f"{path}: no token for byte(s) {missing[:8]}: a byte-level BPE "
                              "vocabulary has all 256 single bytes")
    return ranks


def shard_dim(meta_name: str) -> int | None:
    """Model-parallel dim of a Meta tensor in a Llama 3 checkpoint (vocab-parallel embedding)."""
    return 0 if meta_name == "tok_embeddings.weight" else _llama2_shard_dim(meta_name)


def build_tokenizer(ranks: dict[bytes, int]):
    """`tokenizers.Tokenizer` for the tiktoken ranks: byte-level BPE, Llama 3's split pattern,
    the 256 special tokens after the ranks, BOS prepended."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _FromRanks(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _file: ranks)

    tok = _FromRanks(vocab_file="tokenizer.model", pattern=PATTERN,
                     extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    bos, bos_id = SPECIAL_TOKENS[0], len(ranks)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)])])
    return tok


def special_ids(n_ranks: int, instruct: bool) -> tuple[int, int | list[int]]:
    """(BOS id, EOS id or ids) for a vocabulary of `n_ranks` ranks."""
    ids = {t: n_ranks + i for i, t in enumerate(SPECIAL_TOKENS)}
    eos = [ids[t] for t in INSTRUCT_STOP] if instruct else ids[SPECIAL_TOKENS[1]]
    return ids[SPECIAL_TOKENS[0]], eos


@dataclass(frozen=True)
class Conversion:
    """What convert does differently for a Llama 3.x checkpoint (steps/convert.py calls it)."""
    meta_dir: Path
    context_length: int | None = None
    rope_scaling_factor: float | None = None
    instruct: bool = False

    shard_dim = staticmethod(shard_dim)

    @property
    def tokenizer_model(self) -> Path:
        return Path(self.meta_dir) / "tokenizer.model"

    def plan(self) -> tuple[Llama3Params, list[Path], int, dict[str, tuple[int, ...]]]:
        """Every check before anything is written: params, tokenizer, shard count and split,
        each tensor's shape; returns what convert's plan() returns for LLaMA-1/2."""
        from steps.convert import _load, _shard_files

        params_file = Path(self.meta_dir) / "params.json"
        params = Llama3Params.from_file(params_file)
        self.rope_scaling(params)
        self.context(params)
        n_tokens = len(read_ranks(self.tokenizer_model)) + N_SPECIAL
        files = _shard_files(Path(self.meta_dir))
        if params.n_heads % len(files) or params.kv_heads % len(files):
            raise MetaFormatError(f"{params_file}: n_heads {params.n_heads} / n_kv_heads "
                                  f"{params.kv_heads} do not divide over {len(files)} "
                                  "model-parallel shards, as Meta's shards always do")
        shards = _load(files)
        try:
            vocab = self._vocab_rows(files, shards, params, n_tokens)
            expected = params.shapes(vocab)
            for name, shape in expected.items():
                self._check_tensor(name, shape, files, shards, params)
            extra = set(shards[0]) - set(expected)
            if extra:
                raise MetaFormatError(f"{files[0]}: unexpected tensors {sorted(extra)[:5]}")
        finally:
            del shards
        return params, files, vocab, expected

    def _vocab_rows(self, files, shards, params: Llama3Params, n_tokens: int) -> int:
        for f, sd in zip(files, shards):
            if set(sd) != set(shards[0]):
                raise MetaFormatError(f"{f}: holds other tensors than {files[0].name}")
        if "tok_embeddings.weight" not in shards[0]:
            raise MetaFormatError(f"{files[0]}: no tok_embeddings.weight; not a LLaMA checkpoint")
        rows = sum(sd["tok_embeddings.weight"].shape[0] for sd in shards)
        params_file = Path(self.meta_dir) / "params.json"
        if params.vocab_size > 0 and params.vocab_size != rows:
            raise MetaFormatError(f"{params_file}: vocab_size {params.vocab_size} but "
                                  f"tok_embeddings has {rows} rows")
        if n_tokens != rows:
            raise MetaFormatError(
                f"{self.tokenizer_model}: a tiktoken (Llama 3) vocabulary of {n_tokens} tokens "
                f"({n_tokens - N_SPECIAL} ranks + {N_SPECIAL} special), but tok_embeddings has "
                f"{rows} rows ({params_file}: vocab_size {params.vocab_size}); the tokenizer and "
                "the weights are of different models")
        return rows

    def _check_tensor(self, name: str, shape: tuple[int, ...], files, shards, params) -> None:
        if name not in shards[0]:
            raise MetaFormatError(f"{files[0]}: tensor {name} missing (params.json says "
                                  f"{params.n_layers} layers)")
        parts = [sd[name].shape for sd in shards]
        dim = shard_dim(name)
        if dim is not None and len({p[dim] for p in parts}) > 1:
            where = ", ".join(f"{f.name}: {tuple(p)}" for f, p in zip(files, parts))
            raise MetaFormatError(f"{self.meta_dir}: {name} is split unequally over the shards "
                                  f"({where}); Meta's model-parallel shards are equal parts of "
                                  "one checkpoint: a shard is damaged or from another download")
        got = list(parts[0])
        if dim is not None:
            got[dim] = sum(p[dim] for p in parts)
        if tuple(got) != shape:
            raise MetaFormatError(
                f"{self.meta_dir}: {name} has shape {tuple(got)} across {len(files)} shard(s), "
                f"params.json implies {shape} (dim {params.dim}, heads {params.n_heads}/"
                f"{params.kv_heads}, ffn {params.ffn_dim}); params.json belongs to another size")

    def rope_scaling(self, params: Llama3Params) -> dict | None:
        """HF `rope_scaling` for the checkpoint: model.py's constants, the factor as configured."""
        if not params.use_scaled_rope:
            if self.rope_scaling_factor is not None:
                raise MetaFormatError(
                    f"{Path(self.meta_dir) / 'params.json'}: field use_scaled_rope is not set, "
                    f"yet rope_scaling_factor {self.rope_scaling_factor} is configured "
                    "(conf/model/): a Llama 3.1/3.2 params.json has use_scaled_rope: true")
            return None
        factor = self.rope_scaling_factor or ROPE_SCALING["factor"]
        return ROPE_SCALING | {"factor": float(factor)}

    def context(self, params: Llama3Params) -> int:
        """max_position_embeddings: as configured, else Meta's for the release."""
        if self.context_length is None:
            return SCALED_CONTEXT if params.use_scaled_rope else ORIGINAL_CONTEXT
        if self.context_length > ORIGINAL_CONTEXT and not params.use_scaled_rope:
            raise MetaFormatError(
                f"{Path(self.meta_dir) / 'params.json'}: field use_scaled_rope is missing, so "
                f"this is a Llama 3 checkpoint of {ORIGINAL_CONTEXT} positions, but context_length "
                f"{self.context_length} is configured: without scaled rope the positions past "
                f"{ORIGINAL_CONTEXT} are untrained. A Llama 3.1/3.2 params.json has "
                "use_scaled_rope: true (download it again), or pick the model's own conf/model/")
        return self.context_length

    def save_tokenizer(self, out_dir: Path) -> int:
        """tokenizer.json (+ config, chat template) for the tiktoken file; returns len(tokenizer).
        tokenizer.model is not copied: readers of that name expect SentencePiece."""
        from transformers import PreTrainedTokenizerFast

        from steps.tokenizer import save_tokenizer

        ranks = read_ranks(self.tokenizer_model)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=build_tokenizer(ranks), bos_token=SPECIAL_TOKENS[0],
            eos_token="<|eot_id|>" if self.instruct else SPECIAL_TOKENS[1],
            clean_up_tokenization_spaces=False)
        tok.chat_template = CHAT_TEMPLATE
        save_tokenizer(tok, out_dir)
        return len(tok)

    def write_configs(self, out_dir: Path, params: Llama3Params, vocab: int, dtype: str) -> None:
        """config.json (LlamaForCausalLM, llama3 rope) and generation_config.json."""
        from transformers import GenerationConfig

        from steps.convert import _hf_config

        bos, eos = special_ids(vocab - N_SPECIAL, self.instruct)
        d = _hf_config(params, vocab, dtype, self.context(params))
        d |= {"bos_token_id": bos, "eos_token_id": eos, "rope_theta": params.rope_theta}
        scaling = self.rope_scaling(params)
        if scaling:
            # rope_parameters is what transformers 5 reads, rope_scaling what 4.x and llama.cpp's
            # converter read; both say the same.
            d["rope_parameters"] = scaling | {"rope_theta": params.rope_theta}
            d["rope_scaling"] = dict(scaling)
        (Path(out_dir) / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
        GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(out_dir)


def conversion(meta_dir: Path, **options) -> Conversion | None:
    """The Llama 3 conversion of `meta_dir` when its tokenizer.model is tiktoken's, else None."""
    c = Conversion(Path(meta_dir), **options)
    return c if is_tiktoken(c.tokenizer_model) else None


def check_special_ids(model_dir: Path, instruct: bool) -> dict[str, int]:
    """BOS/EOS as the converted tokenizer and config.json see them, checked against Meta's."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((model_dir / "config.json").read_text())
    bos, eos = special_ids(cfg["vocab_size"] - N_SPECIAL, instruct)
    first_eos = eos[-1] if isinstance(eos, list) else eos
    if (tok.bos_token_id, tok.eos_token_id, cfg["bos_token_id"], cfg["eos_token_id"]) != \
            (bos, first_eos, bos, eos):
        raise MetaFormatError(f"{model_dir}: bos/eos {tok.bos_token_id}/{tok.eos_token_id}, config "
                              f"{cfg['bos_token_id']}/{cfg['eos_token_id']}; Llama 3's are {bos}/"
                              f"{eos}")
    return {"unk": -1, "bos": bos, "eos": first_eos}
