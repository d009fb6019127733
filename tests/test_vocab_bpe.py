"""The vocab stage on a byte-level BPE (Llama 3) base: mode none passes through and measures,
mode add_tokens adds whole tokens and grows the rows, SentencePiece merging is refused with the
fix named (in the stage and at flow start)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steps import vocab
from steps.vocab import Config

ZH = ["我爱人工智能和自然语言处理。", "中国的首都是北京。"]
EN = ["the theory is in the text.", "then the end."]


def _tiny_ranks() -> dict[bytes, int]:
    """The 256 bytes and a few merges, in merge order (a tiktoken file's ranks)."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" t", b" the", b"in"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture
def bpe_model(tmp_path) -> Path:
    """A tiny HF LLaMA directory with a Llama-3-style byte-level BPE tokenizer.json (no
    tokenizer.model) and random embed_tokens/lm_head rows for every token."""
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    from steps.llama3 import SPECIAL_TOKENS, build_tokenizer

    d = tmp_path / "base"
    d.mkdir()
    tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(_tiny_ranks()),
                                  bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1])
    tok.save_pretrained(d)
    n = len(tok)
    g = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(n, 8, generator=g),
               "lm_head.weight": torch.randn(n, 8, generator=g),
               "model.norm.weight": torch.ones(8)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                               "vocab_size": n, "hidden_size": 8}))
    return d


def _lines(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_mode_none_passes_through_and_counts_tokens_per_character(bpe_model, tmp_path):
    from transformers import AutoTokenizer

    cfg = Config(mode="none", eval_zh=_lines(tmp_path, "zh.txt", ZH),
                 eval_en=_lines(tmp_path, "en.txt", EN))
    out = tmp_path / "out"
    out.mkdir()
    m = vocab.run(cfg, out, model=bpe_model)
    for f in bpe_model.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    hf = AutoTokenizer.from_pretrained(str(bpe_model))
    for lang, lines in (("zh", ZH), ("en", EN)):
        tokens = sum(len(hf(l, add_special_tokens=False)["input_ids"]) for l in lines)
        assert m[f"tokens_per_char_{lang}_base"] == tokens / sum(map(len, lines))
        assert m[f"tokens_per_char_{lang}_merged"] == m[f"tokens_per_char_{lang}_base"]
    # the tiny vocabulary has no CJK merges: every Chinese character is its 3 UTF-8 bytes
    assert m["tokens_per_char_zh_base"] == pytest.approx(
        sum(len(c.encode()) for l in ZH for c in l) / sum(map(len, ZH)))
    assert m["pieces_added"] == 0 and m["base_vocab"] == m["merged_vocab"] == m["embedding_rows"]
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["mode"] == "none" and report["eval_zh"]["chars"] == sum(map(len, ZH))


@pytest.mark.parametrize("init", ["mean", "subword_mean"])
def test_add_tokens_adds_whole_tokens_and_grows_the_rows(bpe_model, tmp_path, init):
    from transformers import AutoTokenizer

    tokens_file = _lines(tmp_path, "tokens.txt", ["自然语言", "人工智能"])
    cfg = Config(mode="add_tokens", add_tokens=["人工智能", "the", "北京"],
                 add_tokens_file=tokens_file, init=init, eval_zh=_lines(tmp_path, "zh.txt", ZH))
    out = tmp_path / "out"
    out.mkdir()
    m = vocab.run(cfg, out, model=bpe_model)
    base = AutoTokenizer.from_pretrained(str(bpe_model))
    hf = AutoTokenizer.from_pretrained(str(out))
    old = len(base)
    # "the" is one token already; the file's "人工智能" repeats the list's
    assert len(hf) == old + 3 and m["pieces_added"] == 3 and m["merged_vocab"] == old + 3
    new = {t: hf.convert_tokens_to_ids(t) for t in ("人工智能", "北京", "自然语言")}
    assert sorted(new.values()) == [old, old + 1, old + 2]
    ids = hf("我爱人工智能和自然语言处理。", add_special_tokens=False)["input_ids"]
    assert new["人工智能"] in ids and new["自然语言"] in ids
    assert hf.decode(ids) == "我爱人工智能和自然语言处理。"
    assert m["tokens_per_char_zh_merged"] < m["tokens_per_char_zh_base"]
    a, b = _tensors(bpe_model), _tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert b[name].shape[0] == old + 3 and torch.equal(b[name][:old], a[name])
        for t, i in new.items():
            split = base(t, add_special_tokens=False)["input_ids"] if init == "subword_mean" \
                else list(range(old))
            assert torch.allclose(b[name][i], a[name][split].mean(dim=0)), (name, t)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == old + 3


@pytest.mark.parametrize("mode", ["all", "cjk"])
def test_sentencepiece_merge_on_a_bpe_base_names_the_fix(bpe_model, tmp_path, mode):
    with pytest.raises(ValueError, match=f"vocab.mode={mode}") as e:
        vocab.run(Config(mode=mode, corpus=_lines(tmp_path, "c.txt", ZH)), tmp_path / "out",
                  model=bpe_model)
    assert "vocab.mode=none" in str(e.value) and "vocab.mode=add_tokens" in str(e.value)


def test_add_tokens_on_a_sentencepiece_base_is_refused(tiny_hf_model, tmp_path):
    with pytest.raises(ValueError, match="vocab.mode=add_tokens.*SentencePiece"):
        vocab.run(Config(mode="add_tokens", add_tokens=["中国"]), tmp_path / "out",
                  model=tiny_hf_model)


def test_add_tokens_without_tokens_is_an_error(bpe_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="vocab.add_tokens"):
        vocab.run(Config(mode="add_tokens"), out, model=bpe_model)


# ------------------------------------------------------------------ at flow start

@pytest.fixture(scope="module")
def llama3_workdir(tmp_path_factory) -> Path:
    """A workspace holding the demo-llama3 recipe's synthetic source (the real Llama 3
    tiktoken tokenizer.model)."""
    pytest.importorskip("llama_models", reason="the real Llama 3 tokenizer comes from llama-models")
    from pipelines.demo import ensure_demo_source

    workdir = tmp_path_factory.mktemp("llama3_ws")
    ensure_demo_source(workdir, recipe="demo-llama3")
    return workdir


def test_sentencepiece_merge_on_a_llama3_source_fails_at_flow_start(llama3_workdir):
    from pipelines.config import ConfigError
    from pipelines.validate import check

    base = ["recipe=demo-llama3", f"workdir={llama3_workdir}"]
    check(base)   # mode none: no problem, the tiktoken tokenizer.model is not taken for a bad one
    with pytest.raises(ConfigError) as e:
        check(base + ["vocab.mode=cjk", "vocab.corpus=null"])
    msg = str(e.value)
    assert "vocab.mode" in msg and "vocab.mode=none" in msg and "byte-level BPE" in msg
    assert "extra_sp" not in msg   # the mode is the problem, not the missing SentencePiece input


def test_eval_tokens_are_counted_with_the_llama3_tokenizer(llama3_workdir):
    """Before convert has run, the eval sets' token counts come from the source's tiktoken
    file, exact (the HF tokenizer convert writes, plus BOS), not a bound."""
    from pipelines.config import ConfigError
    from pipelines.validate import check
    from steps.evaluate import read_text
    from steps.llama3 import build_tokenizer, read_ranks

    with pytest.raises(ConfigError) as e:
        check(["recipe=demo-llama3", f"workdir={llama3_workdir}", "evaluate.n_ctx=1024"])
    cfg_zh = Path(__file__).resolve().parents[1] / "pipelines" / "demo_data" / "eval_zh.txt"
    tok = build_tokenizer(read_ranks(llama3_workdir / "demo-llama3-source" / "tokenizer.model"))
    n = len(tok.encode(read_text(cfg_zh, "text"), add_special_tokens=False).ids) + 1
    assert f"base: {n} tokens with the source's tokenizer" in str(e.value)
    assert f"{n} tokens with the merged vocabulary (vocab.mode none" in str(e.value)
