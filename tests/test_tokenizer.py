"""steps/tokenizer.py: the HF tokenizer files written next to a tokenizer.model give
SentencePiece's ids (what llama.cpp uses) on real text."""
from __future__ import annotations

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from steps.tokenizer import load_sp_proto, save_hf_tokenizer
from tests.tiny import DEMO_DATA


def _lines(path):
    return [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def _mismatches(sp_model, hf_dir, lines):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    hf_ids = hf(lines, add_special_tokens=False)["input_ids"]
    return [l for l, a, b in zip(lines, sp.encode(lines), hf_ids) if a != b]


@pytest.fixture(scope="module")
def llama_hf(llama_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_hf")
    assert save_hf_tokenizer(llama_tokenizer, out) == 32000
    return out


def test_llama_hf_matches_sentencepiece_on_every_line(llama_tokenizer, llama_hf, shared_data):
    # Every wikitext line starts with a space and many hold double spaces: the stock transformers 5
    # conversion drops the dummy prefix there and merges "▁▁" (score -1e9) first.
    wiki = _lines(shared_data / "eval/wikitext-2-raw/wiki.test.raw")
    zh = _lines(shared_data / "corpora/CLUECorpusSmall_sampled.txt")
    assert len(wiki) == 2891 and len(zh) == 2500
    assert _mismatches(llama_tokenizer, llama_hf, wiki) == []
    assert _mismatches(llama_tokenizer, llama_hf, zh) == []


def test_llama_hf_special_tokens_and_bos(llama_tokenizer, llama_hf):
    tok = AutoTokenizer.from_pretrained(str(llama_hf))
    assert len(tok) == 32000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer))
    text = " Hello  world, 2000 年\n"
    ids = tok(text)["input_ids"]
    assert ids == [1] + sp.encode(text)           # BOS prepended, no EOS
    assert tok.decode(ids, skip_special_tokens=True) == text == sp.decode(sp.encode(text))
    assert (llama_hf / "tokenizer.model").read_bytes() == llama_tokenizer.read_bytes()


def test_pad_token_is_added_after_the_pieces(tiny_sp_model, tmp_path):
    n = spm.SentencePieceProcessor(model_file=str(tiny_sp_model)).get_piece_size()
    assert save_hf_tokenizer(tiny_sp_model, tmp_path, pad_token="[PAD]") == n + 1
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (len(tok), tok.pad_token, tok.pad_token_id) == (n + 1, "[PAD]", n)
    assert tok("a [PAD]", add_special_tokens=False)["input_ids"][-1] == n
    assert tok("a")["input_ids"][0] == 1 and tok("a")["input_ids"][-1] != 2  # BOS, no EOS


def test_tiny_tokenizer_matches_sentencepiece(tiny_sp_model, tmp_path):
    # The demo text has Chinese (byte fallback in this English-only tokenizer) and English.
    save_hf_tokenizer(tiny_sp_model, tmp_path)
    lines = []
    for name in ("corpus_en.txt", "corpus_zh.txt", "eval_en.txt", "eval_zh.txt"):
        lines += _lines(DEMO_DATA / name)
    lines += ["  two leading spaces", "tabs\tand  double  spaces ", "ümlaut café"]
    assert _mismatches(tiny_sp_model, tmp_path, lines) == []


def test_not_a_sentencepiece_model_names_the_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(ValueError, match=str(bad)):
        load_sp_proto(bad)
    with pytest.raises(ValueError, match=str(bad)):
        save_hf_tokenizer(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_sp_proto(tmp_path / "missing.model")
