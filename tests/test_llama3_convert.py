"""convert on Llama 3 / 3.1 / 3.2 in Meta's layout, checked against Meta's own code, not ours.

The outside truth is the `llama-models` package (dev extras): llama_models/llama3/model.py (the
reference forward, fairscale model-parallel layers), tokenizer.py and the real Llama 3
tokenizer.model, chat_format.py and sku_list.py. The synthetic checkpoints take their tensor
names, shapes and model-parallel split from Meta's Transformer itself (its ColumnParallelLinear,
RowParallelLinear and VocabParallelEmbedding modules), not from steps/.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

if os.environ.get("CI") == "true":  # CI installs the dev extras: a missing one is an error there
    import fairscale  # noqa: F401
    import llama_models
else:
    pytest.importorskip("fairscale", reason="dev extras (make install) bring fairscale")
    llama_models = pytest.importorskip("llama_models",
                                       reason="dev extras (make install) bring llama-models")

from steps.convert import Config, convert_meta_to_hf, run  # noqa: E402
from steps.meta import MetaFormatError  # noqa: E402

META_TOKENIZER = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
SMALL_ORIGINAL = 64     # original_max_position_embeddings scaled down so the test passes it
SEQ = 96                # positions 64..95 lie past it
# Llama 3.1 / 3.2 / 3 shapes, scaled down: GQA, the release's ffn multiplier, theta 500000.
SHAPES = {
    "3.1": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim_multiplier": 1.3,
            "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True},
    "3.2": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim_multiplier": 1.5,
            "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True},
    "3": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim_multiplier": 1.3,
          "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0},
}
FACTOR = {"3.1": None, "3.2": 32.0, "3": None}   # what conf/model/ gives convert


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    """A 1-process gloo group and fairscale model parallel of size 1, as llama_models' generation
    sets them up (there with NCCL, one process per shard), on the CPU."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        init = tmp_path_factory.mktemp("gloo") / "init"
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    yield
    fs_init.destroy_model_parallel()
    if own:
        dist.destroy_process_group()


def tiny_tiktoken(path: Path) -> Path:
    """A tiktoken BPE file: the 256 bytes, then a few merges (ranks in merge order)."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" t", b" the", b"in"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


def meta_transformer(params: dict, vocab: int, max_seq_len: int = SEQ):
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    return Transformer(ModelArgs(**params, vocab_size=vocab, max_seq_len=max_seq_len,
                                 max_batch_size=2))


def meta_split_dims(model) -> dict[str, int]:
    """Meta tensor name -> the dim fairscale shards it on, read off Meta's module types."""
    from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                    VocabParallelEmbedding)

    dims = {}
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims[f"{name}.weight"] = 0
        elif isinstance(module, RowParallelLinear):
            dims[f"{name}.weight"] = 1
    return dims


def make_checkpoint(out: Path, params: dict, tokenizer: Path, n_shards: int, seed: int = 0,
                    std: float = 0.3) -> dict:
    """A random Meta checkpoint with Meta's tensor names and shapes, split into `n_shards` as
    fairscale's model parallel holds it (rank r: the r-th equal part of each sharded dim);
    returns the full state."""
    from llama_models.llama3.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer).n_words
    model = meta_transformer(params, vocab)
    g = torch.Generator().manual_seed(seed)
    state = {n: (1 + 0.1 * torch.randn(t.shape, generator=g)) if t.dim() == 1 else
             torch.randn(t.shape, generator=g) * std for n, t in model.state_dict().items()}
    dims = meta_split_dims(model)
    out.mkdir(parents=True)
    for r in range(n_shards):
        shard = {n: t.chunk(n_shards, dims[n])[r].clone() if n in dims else t
                 for n, t in state.items()}
        torch.save(shard, out / f"consolidated.{r:02d}.pth")
    (out / "params.json").write_text(json.dumps(params | {"vocab_size": vocab}))
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return state


def meta_apply_scaling(factor: float, original: int):
    """Meta's apply_scaling (llama3/model.py) with its two hard-coded constants replaced: the
    factor (3.2 1B/3B's 32 where Meta's code has 8) and the original context (scaled down)."""
    from llama_models.llama3 import model as meta_model

    src = inspect.getsource(meta_model.apply_scaling)
    for old, new in (("scale_factor = 8\n", f"scale_factor = {factor}\n"),
                     ("old_context_len = 8192", f"old_context_len = {original}")):
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    namespace = dict(vars(meta_model))
    exec(src, namespace)  # noqa: S102 - Meta's own function text, two numbers changed
    return namespace["apply_scaling"]


def meta_logits(params: dict, state: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = meta_transformer(params, state["output.weight"].shape[0])
    model.load_state_dict(state)
    return model(tokens, start_pos=0).float()


def hf_logits(hf: Path, tokens: torch.Tensor, original: int | None = None,
              drop_scaling: bool = False) -> torch.Tensor:
    """Logits of the converted model; `original` rewrites original_max_position_embeddings in a
    copy of its config (the scaled-down test), drop_scaling removes the rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((hf / "config.json").read_text())
    if original or drop_scaling:
        for key in ("rope_scaling", "rope_parameters"):
            if drop_scaling:
                cfg[key] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
            else:
                cfg[key]["original_max_position_embeddings"] = original
    model = LlamaForCausalLM.from_pretrained(hf, config=LlamaConfig.from_dict(cfg),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


CASES = {"3.1-1shard": ("3.1", 1), "3.1-2shards": ("3.1", 2), "3.2-1shard": ("3.2", 1),
         "3.2-2shards": ("3.2", 2), "3-2shards": ("3", 2)}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_metas_reference_forward(case, tmp_path, model_parallel, monkeypatch):
    from llama_models.llama3 import model as meta_model

    shape, n_shards = CASES[case]
    params = SHAPES[shape]
    meta = tmp_path / "meta"
    state = make_checkpoint(meta, params, tiny_tiktoken(tmp_path / "tok.model"), n_shards)
    assert len(list(meta.glob("consolidated.*.pth"))) == n_shards
    hf = convert_meta_to_hf(meta, tmp_path / "hf", dtype="float32",
                            rope_scaling_factor=FACTOR[shape])
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_key_value_heads"], cfg["vocab_size"]) == (2, 262 + 256)
    assert cfg["intermediate_size"] == state["layers.0.feed_forward.w1.weight"].shape[0]
    if params.get("use_scaled_rope"):
        assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": FACTOR[shape] or 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}
        assert cfg["max_position_embeddings"] == 131072
    else:
        assert "rope_scaling" not in cfg and cfg["max_position_embeddings"] == 8192

    tokens = torch.randint(0, cfg["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    original = None
    if params.get("use_scaled_rope"):
        original = SMALL_ORIGINAL
        monkeypatch.setattr(meta_model, "apply_scaling",
                            meta_apply_scaling(FACTOR[shape] or 8, SMALL_ORIGINAL))
    ref = meta_logits(params, state, tokens)
    got = hf_logits(hf, tokens, original)
    diff = (ref - got).abs().max().item()
    print(f"max |HF - Meta reference| {case}: {diff:.2e}")
    assert diff <= 1e-4, f"{case}: max |HF - Meta reference| = {diff}"
    assert ref.abs().max() > 1.0
    if original:  # the scaling is live where the test looks: without it the logits differ
        unscaled = (hf_logits(hf, tokens, drop_scaling=True) - ref).abs().max().item()
        assert unscaled > 1e-2, unscaled


def test_metas_unmodified_rope_scaling_on_the_real_constants(tmp_path, model_parallel):
    """Meta's model.py exactly as shipped (factor 8, original context 8192) against the config
    convert writes for 3.1, unedited."""
    meta = tmp_path / "meta"
    state = make_checkpoint(meta, SHAPES["3.1"], tiny_tiktoken(tmp_path / "tok.model"), 2, seed=3)
    hf = convert_meta_to_hf(meta, tmp_path / "hf", dtype="float32")
    tokens = torch.randint(0, 518, (1, SEQ), generator=torch.Generator().manual_seed(4))
    diff = (meta_logits(SHAPES["3.1"], state, tokens) - hf_logits(hf, tokens)).abs().max().item()
    print(f"max |HF - Meta reference| 3.1, Meta's constants: {diff:.2e}")
    assert diff <= 1e-4, diff


# Greedy continuation of the converted 3.1-shaped model (seed 7, 2 shards) from ids 1..8, pinned
# so that a silent change of the conversion fails; Meta's reference forward gives the same ids.
GREEDY_8 = [400, 346, 278, 213, 59, 478, 189, 322]


def test_golden_greedy_ids(tmp_path, model_parallel):
    from transformers import LlamaForCausalLM

    meta = tmp_path / "meta"
    state = make_checkpoint(meta, SHAPES["3.1"], tiny_tiktoken(tmp_path / "tok.model"), 2, seed=7)
    hf = convert_meta_to_hf(meta, tmp_path / "hf", dtype="float32")
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = torch.arange(1, 9)[None]
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 8:]
    ids = prompt
    for _ in range(8):  # Meta's forward, greedy, without its kv cache
        ids = torch.cat([ids, meta_logits(SHAPES["3.1"], state, ids)[:, -1].argmax(-1, True)], 1)
    assert out.tolist() == ids[0, 8:].tolist()
    assert out.tolist() == GREEDY_8


@pytest.fixture(scope="module")
def real_vocab_hf(tmp_path_factory, model_parallel):
    """A Llama-3.2-shaped checkpoint with the real tokenizer (128256 rows), converted once."""
    tmp = tmp_path_factory.mktemp("real_vocab")
    params = SHAPES["3.2"] | {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}
    make_checkpoint(tmp / "meta", params, META_TOKENIZER, 1, std=0.02)
    return tmp / "meta", convert_meta_to_hf(tmp / "meta", tmp / "hf", dtype="bfloat16",
                                            rope_scaling_factor=32)


def _whole_texts(shared_data: Path) -> dict[str, str]:
    files = {"wikitext-2 test": "eval/wikitext-2-raw/wiki.test.raw",
             "CLUE sample": "corpora/CLUECorpusSmall_sampled.txt",
             "zh eval (libai)": "eval/zh/libai_doc.txt",
             "zh eval (news-commentary)": "eval/zh/news-commentary-v13-en-zh_sampled.txt"}
    return {k: (shared_data / v).read_text(encoding="utf-8") for k, v in files.items()}


def _line_pieces(text: str, limit: int) -> list[str]:
    """`text` cut at line ends into pieces of at most `limit` characters."""
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = text.rindex("\n", start, start + limit) + 1
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


# Token counts (with BOS) of the real Llama 3 vocabulary on each whole text, pinned.
TOKENS = {"wikitext-2 test": 288937, "CLUE sample": 570183, "zh eval (libai)": 2058,
          "zh eval (news-commentary)": 61861}


def test_token_ids_equal_metas_tokenizer_on_whole_texts(real_vocab_hf, shared_data):
    """The HF tokenizer.json convert writes gives Meta's tokenizer's ids on every text, 100 %.
    Meta's Tokenizer.encode cuts its input every 400,000 characters (TIKTOKEN_MAX_ENCODE_CHARS)
    wherever that falls, mid-word included, so texts longer than that are compared with the
    tiktoken Encoding it builds on the whole text, and with encode() on pieces cut at line ends."""
    from llama_models.llama3.tokenizer import TIKTOKEN_MAX_ENCODE_CHARS, Tokenizer
    from transformers import AutoTokenizer

    meta = Tokenizer(META_TOKENIZER)
    hf = AutoTokenizer.from_pretrained(real_vocab_hf[1])
    for name, text in _whole_texts(shared_data).items():
        ids = hf(text)["input_ids"]
        whole = [meta.bos_id] + meta.model.encode(text, allowed_special=set(), disallowed_special=())
        assert ids == whole, name
        pieces = _line_pieces(text, TIKTOKEN_MAX_ENCODE_CHARS)
        by_piece = [meta.bos_id] + [i for p in pieces for i in meta.encode(p, bos=False, eos=False)]
        assert ids == by_piece, name
        if len(pieces) == 1:
            assert ids == meta.encode(text, bos=True, eos=False), name
        assert len(ids) == TOKENS[name], (name, len(ids))
        assert hf.decode(ids[1:]) == text, name
        print(f"{name}: {len(text)} chars, {len(ids)} ids, HF = Meta on all of them")


def test_special_tokens_are_metas(real_vocab_hf):
    from llama_models.llama3.tokenizer import Tokenizer
    from transformers import AutoTokenizer

    meta = Tokenizer(META_TOKENIZER)
    hf = AutoTokenizer.from_pretrained(real_vocab_hf[1])
    added = {t.content: i for i, t in hf.added_tokens_decoder.items()}
    assert added == meta.special_tokens and len(added) == 256
    assert len(hf) == meta.n_words == 128256
    assert all(t.special for t in hf.added_tokens_decoder.values())
    assert (hf.bos_token, hf.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert hf(text, add_special_tokens=False)["input_ids"] == \
        meta.encode(text, bos=False, eos=False, allowed_special="all")
    gen = json.loads((real_vocab_hf[1] / "generation_config.json").read_text())
    cfg = json.loads((real_vocab_hf[1] / "config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (meta.bos_id, meta.eos_id) == (128000, 128001)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128001)
    assert not (real_vocab_hf[1] / "tokenizer.model").exists()  # readers of that name want SentencePiece


def test_instruct_eos_and_chat_template_are_metas(real_vocab_hf, tmp_path):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    from transformers import AutoTokenizer

    meta_dir, _ = real_vocab_hf
    hf_dir = convert_meta_to_hf(meta_dir, tmp_path / "hf", dtype="bfloat16", instruct=True)
    meta = Tokenizer(META_TOKENIZER)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == meta.stop_tokens == [128001, 128008, 128009]
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert hf.eos_token == "<|eot_id|>"
    dialog = [("system", "You are a helpful assistant. 你是一个乐于助人的助手。"),
              ("user", " 用一句话介绍李白。\n"), ("assistant", "李白是唐代诗人。"),
              ("user", "More?")]
    want = ChatFormat(meta).encode_dialog_prompt(
        [RawMessage(role=r, content=c) for r, c in dialog]).tokens
    got = hf.apply_chat_template([{"role": r, "content": c} for r, c in dialog],
                                 add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(got) == want


def test_run_metrics(real_vocab_hf, tmp_path):
    metrics = run(Config(dtype="bfloat16", context_length=None, rope_scaling_factor=32),
                  tmp_path / "out", meta=real_vocab_hf[0])
    assert (metrics["vocab_size"], metrics["bos_id"], metrics["eos_id"], metrics["unk_id"]) == \
        (128256, 128000, 128001, -1)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"]["factor"] == 32.0 and cfg["max_position_embeddings"] == 131072


def _refused(meta: Path, out: Path, *words: str, **options) -> str:
    """convert fails with an error naming each of `words`, and writes nothing."""
    with pytest.raises(MetaFormatError) as e:
        convert_meta_to_hf(meta, out, dtype="float32", **options)
    assert not out.exists(), "nothing may be written before the checks pass"
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    return str(e.value)


def test_tiktoken_vocabulary_with_llama2_params_is_refused(tmp_path, tiny_sp_model):
    from steps.meta import synthesize_checkpoint

    llama2 = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
              "vocab_size": -1}
    meta = synthesize_checkpoint(tmp_path / "meta", llama2, tiny_sp_model)
    shutil.copyfile(META_TOKENIZER, meta / "tokenizer.model")
    msg = _refused(meta, tmp_path / "hf", str(meta / "tokenizer.model"), "params.json",
                   "vocab_size -1", "128256")
    assert "320 rows" in msg
    params = json.loads((meta / "params.json").read_text()) | {"vocab_size": 32000}
    (meta / "params.json").write_text(json.dumps(params))
    _refused(meta, tmp_path / "hf", str(meta / "params.json"), "vocab_size 32000")


def test_rope_scaling_keys(tmp_path, model_parallel):
    """Meta's args.py reads use_scaled_rope and no factor (model.py hard-codes them), so a 3.1
    params.json with `use_scaled_rope: true` and nothing else converts, with Meta's factors (the
    logits tests above). What is refused, naming params.json and the field: a params.json without
    use_scaled_rope (a Llama 3 one, 8192 positions) converted for 131072 positions (conf/model's
    llama3.1 context), a factor configured for such a checkpoint, and a non-boolean flag."""
    meta = tmp_path / "meta"
    params = dict(SHAPES["3.1"])
    params.pop("use_scaled_rope")
    make_checkpoint(meta, params, tiny_tiktoken(tmp_path / "tok.model"), 1)
    pj = str(meta / "params.json")
    _refused(meta, tmp_path / "hf", pj, "use_scaled_rope", "131072", context_length=131072)
    _refused(meta, tmp_path / "hf", pj, "use_scaled_rope", "rope_scaling_factor",
             rope_scaling_factor=32.0)
    (meta / "params.json").write_text(json.dumps(
        json.loads((meta / "params.json").read_text()) | {"use_scaled_rope": "true"}))
    _refused(meta, tmp_path / "hf", pj, "field use_scaled_rope")


def test_shards_of_unequal_split_are_refused(tmp_path, model_parallel):
    meta = tmp_path / "meta"
    make_checkpoint(meta, SHAPES["3.2"], tiny_tiktoken(tmp_path / "tok.model"), 2)
    shards = [torch.load(meta / f"consolidated.0{r}.pth", weights_only=True) for r in (0, 1)]
    name = "layers.1.attention.wq.weight"
    full = torch.cat([s[name] for s in shards])
    shards[0][name], shards[1][name] = full[:40].clone(), full[40:].clone()
    for r, s in enumerate(shards):
        torch.save(s, meta / f"consolidated.0{r}.pth")
    _refused(meta, tmp_path / "hf", name, "consolidated.00.pth: (40, 64)",
             "consolidated.01.pth: (24, 64)", "unequally")


def test_heads_that_do_not_divide_over_the_shards_are_refused(tmp_path, model_parallel):
    meta = tmp_path / "meta"
    make_checkpoint(meta, SHAPES["3.1"], tiny_tiktoken(tmp_path / "tok.model"), 4)
    _refused(meta, tmp_path / "hf", str(meta / "params.json"), "n_kv_heads 2", "4 model-parallel")


def test_bad_tiktoken_line_names_file_and_line(tmp_path, model_parallel):
    meta = tmp_path / "meta"
    make_checkpoint(meta, SHAPES["3.1"], tiny_tiktoken(tmp_path / "tok.model"), 1)
    lines = (meta / "tokenizer.model").read_text().splitlines()
    lines[5] = "not-base64! 5"
    (meta / "tokenizer.model").write_text("\n".join(lines) + "\n")
    _refused(meta, tmp_path / "hf", f"{meta / 'tokenizer.model'}:6", "not a tiktoken line")


LLAMA3 = {"llama3-8b": ("Llama-3-8B", 14336), "llama3-70b": ("Llama-3-70B", 28672),
          "llama3.1-8b": ("Llama3.1-8B", 14336), "llama3.1-70b": ("Llama3.1-70B", 28672),
          "llama3.2-1b": ("Llama3.2-1B", 8192), "llama3.2-3b": ("Llama3.2-3B", 8192)}


@pytest.mark.parametrize("name", sorted(LLAMA3))
def test_conf_model_has_metas_exact_params(name):
    """conf/model/ against Meta's own model list (llama_models/sku_list.py): params, shard count,
    context; FFN width as Meta's FeedForward computes it; the rope factor convert gets."""
    from llama_models.sku_list import resolve_model

    from pipelines.config import load_config
    from steps.llama3 import Llama3Params

    cfg = load_config([f"model={name}"])
    model, (sku_id, ffn) = cfg["model"], LLAMA3[name]
    sku = resolve_model(sku_id)
    assert dict(model["params"]) == sku.arch_args
    assert (model["n_shards"], model["context_length"]) == (sku.pth_file_count, sku.max_seq_length)
    p = Llama3Params.from_dict(dict(model["params"]), f"conf/model/{name}.yaml")
    assert p.ffn_dim == ffn
    assert cfg["convert"]["rope_scaling_factor"] == (32 if name.startswith("llama3.2") else None)


def test_metas_llama31_params_json_reads_as_llama3(shared_data):
    from pipelines.config import load_config
    from steps.llama3 import Llama3Params

    p = Llama3Params.from_file(shared_data / "models" / "llama31_8b_params.json")
    assert p == Llama3Params.from_dict(dict(load_config(["model=llama3.1-8b"])["model"]["params"]))
