"""steps/tokenizer.py: the HF tokenizer files written next to a tokenizer.model give
SentencePiece's ids (what llama.cpp uses) on real text."""
from __future__ import annotations

import json
from pathlib import Path

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


# ------------------------------------------------------------------ whole texts, every tokenizer

EDGE_TEXTS = [
    "\nOnce upon a time.\n",                    # a story's leading and trailing newline
    "\n\n  two spaces after two newlines  \n\n",
    "\t tab,\t\ttabs \t",
    "   runs    of     spaces   ",
    "\u3000全角空格\u3000\u3000之间\u3000",          # U+3000: a space only after nmt_nfkc
    "中文 混合 English\n  缩进的行\n",
    "a \n b\r\nc\u00a0\u00a0d",
    " \n ",
    "   ",
]


def _variant(sp_model, out, *, dummy: bool, charsmap_from=None):
    """`sp_model` with add_dummy_prefix set to `dummy` (and another model's normaliser)."""
    proto = load_sp_proto(sp_model)
    if charsmap_from is not None:
        proto.normalizer_spec.CopyFrom(load_sp_proto(charsmap_from).normalizer_spec)
    proto.normalizer_spec.add_dummy_prefix = dummy
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return out


@pytest.fixture(scope="module")
def every_tokenizer(shared_data, tiny_sp_model, tmp_path_factory):
    """Each SentencePiece model the project ships or makes, with add_dummy_prefix on and off:
    LLaMA's (identity, spaces kept), stories260K's tok512 (identity, extra spaces removed),
    chinese_sp merged into LLaMA's by the vocab stage, the tests' tiny one, and tok512 with
    chinese_sp's nmt_nfkc charsmap (a charsmap before the whitespace rules)."""
    from steps.vocab import merge_tokenizers

    root = tmp_path_factory.mktemp("every_tokenizer")
    llama = shared_data / "tokenizers" / "llama_tokenizer.model"
    zh_sp = shared_data / "tokenizers" / "chinese_sp.model"
    tok512 = shared_data / "models" / "stories260K" / "tok512.model"
    merged = merge_tokenizers(llama, zh_sp, root / "merged") / "tokenizer.model"
    models = {"llama": (llama, None), "tok512": (tok512, None), "merged": (merged, None),
              "tiny": (tiny_sp_model, None), "tok512-nfkc": (tok512, zh_sp)}
    out = {}
    for name, (model, charsmap) in models.items():
        for dummy in (True, False):
            sp_file = _variant(model, root / f"{name}-{dummy}" / "sp" / "tokenizer.model",
                               dummy=dummy, charsmap_from=charsmap)
            save_hf_tokenizer(sp_file, root / f"{name}-{dummy}" / "hf")
            out[f"{name}-dummy{int(dummy)}"] = (sp_file, root / f"{name}-{dummy}" / "hf")
    assert load_sp_proto(tok512).normalizer_spec.remove_extra_whitespaces
    assert not load_sp_proto(llama).normalizer_spec.remove_extra_whitespaces
    return out


@pytest.mark.parametrize("name", [f"{n}-dummy{d}" for n in
                                  ("llama", "tok512", "merged", "tiny", "tok512-nfkc")
                                  for d in (1, 0)])
def test_hf_matches_sentencepiece_on_whole_texts(every_tokenizer, shared_data, name):
    # Whole files, as the evaluate stage tokenizes them: leading and trailing newlines, runs of
    # spaces and tabs survive or go exactly as SentencePiece's normaliser decides (tok512 used to
    # lose the sample's edge newlines in HF: 1878 ids against SentencePiece's and llama.cpp's 1883).
    sp_file, hf_dir = every_tokenizer[name]
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = {"tinystories": shared_data / "eval/tinystories/tinystories_sample.txt",
             "zh": shared_data / "eval/zh/libai_doc.txt"}
    texts |= {p.name: p for p in sorted(DEMO_DATA.glob("*.txt"))}
    texts = {k: p.read_text(encoding="utf-8") for k, p in texts.items()}
    texts |= {f"edge{i}": t for i, t in enumerate(EDGE_TEXTS)}
    for key, text in texts.items():
        ids = hf(text)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(text), (name, key)
        assert hf.backend_tokenizer.normalizer.normalize_str(text) == sp.normalize(text), (name, key)
        assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), (name, key)
    if name.startswith("tok512-dummy1"):
        assert len(hf(texts["tinystories"])["input_ids"]) == 1883


# ------------------------------------------------------------------ files other readers load

def test_files_name_a_class_transformers_4_knows_and_list_added_tokens(tiny_sp_model, tmp_path):
    # transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x refuses to load;
    # llama.cpp's converter takes the ids past tokenizer.model's pieces from added_tokens.json.
    n = spm.SentencePieceProcessor(model_file=str(tiny_sp_model)).get_piece_size()
    save_hf_tokenizer(tiny_sp_model, tmp_path / "pad", pad_token="[PAD]")
    save_hf_tokenizer(tiny_sp_model, tmp_path / "plain")
    for d in ("pad", "plain"):
        cfg = json.loads((tmp_path / d / "tokenizer_config.json").read_text())
        assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
        # an added_tokens_decoder entry marked special would become a CONTROL token in the converter
        assert "added_tokens_decoder" not in cfg
    assert json.loads((tmp_path / "pad" / "added_tokens.json").read_text()) == {"[PAD]": n}
    assert not (tmp_path / "plain" / "added_tokens.json").exists()   # nothing past the pieces
    # transformers 5 still loads the files verbatim: same ids as SentencePiece, [PAD] last
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "pad"))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_sp_model))
    text = (DEMO_DATA / "eval_en.txt").read_text(encoding="utf-8")
    assert tok(text)["input_ids"] == [1] + sp.encode(text)
    assert (len(tok), tok.pad_token_id) == (n + 1, n)


def _llama_cpp_converter(pytestconfig, tmp_path_factory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ package and its own gguf-py, which
    the full conversion needs: the installed gguf lacks parts of it) from the sdist of the
    installed llama-cpp-python: $LLAMAFLOW_LLAMA_CPP_SRC, pytest's cache, or `pip download`."""
    import os
    import subprocess
    import sys
    import tarfile
    import tempfile

    import llama_cpp

    if os.environ.get("LLAMAFLOW_LLAMA_CPP_SRC"):
        return Path(os.environ["LLAMAFLOW_LLAMA_CPP_SRC"])
    name = f"llama_cpp_convert_{llama_cpp.__version__}"
    cache = getattr(pytestconfig, "cache", None)   # None under -p no:cacheprovider
    root = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    if all((root / p).exists() for p in ("convert_hf_to_gguf.py", "conversion", "gguf-py/gguf")):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", "-d", tmp, f"llama-cpp-python=={llama_cpp.__version__}"],
                           capture_output=True, text=True, timeout=900)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode or not sdists:
            msg = f"llama-cpp-python sdist not downloadable: {r.stderr[-500:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(msg + " (CI=true: this test must run)")
            pytest.skip(msg)
        with tarfile.open(sdists[0]) as tf:
            prefix = tf.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tf.getmembers() if m.name == prefix + "convert_hf_to_gguf.py"
                       or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/gguf/"))]
            for m in members:
                m.name = m.name[len(prefix):]
            tf.extractall(root, members=members, filter="data")
    return root


def test_llama_cpp_converter_reads_pad_and_vocabulary(tiny_sp_model, tmp_path, pytestconfig,
                                                     tmp_path_factory):
    # A Chinese-Alpaca-like model dir (pieces + [PAD], embedding rows = len(tokenizer)) through
    # llama.cpp's own converter, run against the installed gguf package (NO_LOCAL_GGUF).
    import os
    import subprocess
    import sys

    import gguf
    import llama_cpp

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steps.quantize import _vocab

    converter = _llama_cpp_converter(pytestconfig, tmp_path_factory)
    n = spm.SentencePieceProcessor(model_file=str(tiny_sp_model)).get_piece_size()
    model = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=n + 1, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(model)
    assert save_hf_tokenizer(tiny_sp_model, model, pad_token="[PAD]") == n + 1
    # the chat template SFT saves with its tokenizer
    from steps.sft import chat_template
    (model / "chat_template.jinja").write_text(chat_template(), encoding="utf-8")
    out = tmp_path / "vocab.gguf"
    r = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model),
                        "--vocab-only", "--outfile", str(out)], capture_output=True, text=True,
                       env=os.environ | {"NO_LOCAL_GGUF": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    f = gguf.GGUFReader(out).fields
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == n + 1
    assert tokens[n] == "[PAD]" and types[n] == gguf.TokenType.USER_DEFINED   # not [PAD320], UNUSED
    assert f["tokenizer.ggml.padding_token_id"].contents() == n
    # the converter and the quantize stage's exporter give one vocabulary
    ours = _vocab(model, n + 1)
    assert tokens == [t.decode() for t in ours["tokens"]] and types == ours["types"]
    assert f["tokenizer.ggml.scores"].contents() == pytest.approx(ours["scores"])
    assert f["tokenizer.chat_template"].contents() == ours["chat_template"] == chat_template()
    # llama.cpp on that vocabulary tokenizes a whole text as SentencePiece does
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_sp_model))
    text = (DEMO_DATA / "eval_en.txt").read_text(encoding="utf-8")
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1] + sp.encode(text)
    llm.close()
