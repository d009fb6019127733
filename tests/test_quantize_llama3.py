"""Quantize stage on a Llama 3 (byte-level BPE, tiktoken-derived) vocabulary.

A tiny Llama-3-shaped HF model (GQA 4/2, rope_theta 500000, llama3 rope scaling, the real
128256-token Llama 3 vocabulary from `llama-models`) is exported by our exporter and by llama.cpp's
own convert_hf_to_gguf.py (with the gguf-py of the same llama.cpp source, from the installed
llama-cpp-python's sdist): every tensor and every metadata value must agree, each difference named
below. Then llama.cpp must tokenize the eval texts exactly as the HF tokenizer does, and its
perplexity must agree with HF's on the same ids, which only holds if rope_freqs is right.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from steps import quantize as Q
from tests.test_quantize import _gguf_logits, _hf_logits, _llama
from tests.test_tokenizer import _llama_cpp_converter
from tests.tiny import DEMO_DATA

BOS, EOS, EOT = 128000, 128001, 128009
# The instruct models' template, enough to check it reaches tokenizer.chat_template verbatim.
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
                 "\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}")
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}

# Keys only llama.cpp's converter writes, and why ours does without them.
CONVERTER_ONLY = {
    "general.type": "'model'; llama.cpp reads it only to tell LoRA adapters from models",
    "general.size_label": "a display label ('17M') from the converter's naming metadata",
    "llama.attention.key_length": "head_dim; our exporter refuses head_dim != hidden/heads, which "
                                  "is what llama.cpp assumes without the key",
    "llama.attention.value_length": "as key_length",
}
# Keys both write with different values: the converter title-cases the folder name.
DIFFERENT = {"general.name"}


def make_llama3_tokenizer(out_dir: Path):
    """The real Llama 3 tokenizer (llama-models' tiktoken tokenizer.model) as HF files, made with
    transformers' own TikTokenConverter: Llama 3's split pattern, its 256 special tokens, BOS
    prepended by the post-processor, the chat template."""
    from llama_models.llama3 import tokenizer as meta_tokenizer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = Path(meta_tokenizer.__file__).parent / "tokenizer.model"
    meta = meta_tokenizer.Tokenizer(model_file)
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    tk = TikTokenConverter(vocab_file=str(model_file), pattern=meta.pat_str,
                           extra_special_tokens=specials).converted()
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, meta.bos_id)])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token="<|end_of_text|>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    assert (meta.bos_id, meta.eos_id, meta.eot_id, meta.n_words) == (BOS, EOS, EOT, 128256)
    return fast


def make_tiny_llama3(out_dir: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Llama-3-shaped, hidden 64, 2 layers: GQA, rope_theta 500000, llama3 rope scaling with a
    64-position original context (so head_dim 16 has all three of its regimes and a 128-token
    window reaches past it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(ROPE), bos_token_id=BOS, eos_token_id=EOS,
                         tie_word_embeddings=False,
                         initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    make_llama3_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def llama3_hf(tmp_path_factory) -> Path:
    return make_tiny_llama3(tmp_path_factory.mktemp("llama3_hf"))


@pytest.fixture(scope="module")
def llama3_f16(llama3_hf, tmp_path_factory) -> Path:
    return Q.export_gguf(llama3_hf, tmp_path_factory.mktemp("llama3_gguf") / "f16.gguf", "f16")


@pytest.fixture(scope="module")
def converter_f16(llama3_hf, pytestconfig, tmp_path_factory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py --outtype f16 on the same HF folder, run with its own
    gguf-py (no NO_LOCAL_GGUF)."""
    src = _llama_cpp_converter(pytestconfig, tmp_path_factory)
    out = tmp_path_factory.mktemp("llama3_ref") / "ref-f16.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(llama3_hf),
                        "--outtype", "f16", "--outfile", str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _fields(path: Path) -> dict:
    import gguf

    return {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()
            if not k.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------
# against llama.cpp's converter


@pytest.mark.slow
def test_every_tensor_equals_llama_cpp_converter(llama3_f16, converter_f16):
    """Same tensor names, shapes, ggml types and bytes, rope_freqs included."""
    import gguf

    ours = {t.name: t for t in gguf.GGUFReader(llama3_f16).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(converter_f16).tensors}
    assert ours.keys() == ref.keys()
    assert "rope_freqs.weight" in ours and len(ours) == 22
    for name in ref:
        a, b = ours[name], ref[name]
        assert (a.tensor_type, a.shape.tolist()) == (b.tensor_type, b.shape.tolist()), name
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes(), name


@pytest.mark.slow
def test_metadata_equals_llama_cpp_converter(llama3_f16, converter_f16):
    """Every key both write has the same value (token list, types, merges, special ids, chat
    template, rope, GQA); the converter's extra keys are the explained ones."""
    ours, ref = _fields(llama3_f16), _fields(converter_f16)
    assert set(ref) - set(ours) == set(CONVERTER_ONLY), CONVERTER_ONLY
    assert set(ours) - set(ref) == set()
    same = sorted(set(ours) & set(ref) - DIFFERENT)
    assert len(same) == 24
    assert {k: ours[k] for k in same} == {k: ref[k] for k in same}
    assert (ours["general.name"], ref["general.name"]) == ("llama3_hf0", "Llama3_Hf0")
    assert ref["llama.attention.key_length"] == ref["llama.attention.value_length"] == 64 // 4


def test_llama3_metadata(llama3_f16, llama3_hf):
    """What the Llama 3 file must say, independently of the converter."""
    f = _fields(llama3_f16)
    expected = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.freq_base": 500000.0, "llama.vocab_size": 128256,
                "tokenizer.ggml.bos_token_id": BOS, "tokenizer.ggml.eos_token_id": EOS,
                "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
                "tokenizer.chat_template": CHAT_TEMPLATE}
    assert {k: f[k] for k in expected} == expected
    assert "llama.rope.scaling.type" not in f   # llama3 scaling is the rope_freqs tensor
    assert "tokenizer.ggml.scores" not in f
    tj = json.loads((llama3_hf / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert {t: i for i, t in enumerate(tokens[:BOS])} == tj["model"]["vocab"]
    assert tokens[EOT] == "<|eot_id|>" and tokens[-1] == "<|reserved_special_token_245|>"
    assert set(types[:BOS]) == {1} and set(types[BOS:]) == {3}   # NORMAL, CONTROL
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in tj["model"]["merges"]]


def test_rope_freqs_are_transformers_llama3_scaling(llama3_f16, llama3_hf):
    """rope_freqs[i] = default inv_freq / transformers' llama3 inv_freq, with all three regimes
    (unscaled, blended, ×8) present at head_dim 16, original context 64."""
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(llama3_hf)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    t = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(llama3_f16).tensors}["rope_freqs.weight"]
    np.testing.assert_allclose(t, base / scaled.double().numpy(), rtol=1e-5)
    assert t[0] == 1.0 and t[-1] == 8.0 and ((t > 1) & (t < 8)).any(), t


def test_llama_cpp_reads_special_tokens(llama3_f16):
    """llama.cpp finds EOT by itself (the converter writes no eot id either) and parses control
    tokens only when asked to."""
    import llama_cpp

    llm = _llama(llama3_f16, n_ctx=64)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert (llm.token_bos(), llm.token_eos(), llama_cpp.llama_vocab_eot(vocab)) == (BOS, EOS, EOT)
    assert llm.tokenize(b"<|eot_id|>", add_bos=False, special=True) == [EOT]
    assert llm.tokenize(b"<|eot_id|>", add_bos=False, special=False) != [EOT]
    llm.close()


def test_non_llama3_byte_level_bpe_is_refused(llama3_hf, tmp_path):
    """A byte-level BPE with another split (GPT-2's) would be tokenized wrongly by llama.cpp."""
    d = tmp_path / "gpt2_split"
    d.mkdir()
    for f in llama3_hf.iterdir():
        if f.name != "tokenizer.json":
            (d / f.name).symlink_to(f)
    tj = json.loads((llama3_hf / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"'s|'t| ?\p{L}+| ?\p{N}+"
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(ValueError, match="not Llama 3's"):
        Q.export_gguf(d, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


# ---------------------------------------------------------------------------------------------
# tokenization of the eval texts, perplexity, llama.cpp quantization


def _eval_texts(shared_data: Path) -> dict[str, str]:
    """Whole files as stored (wikitext keeps its CRLF line ends)."""
    files = {"wikitext-2 test": "eval/wikitext-2-raw/wiki.test.raw",
             "libai_doc (zh)": "eval/zh/libai_doc.txt",
             "news-commentary en-zh": "eval/zh/news-commentary-v13-en-zh_sampled.txt",
             "CLUECorpusSmall sample (zh)": "corpora/CLUECorpusSmall_sampled.txt"}
    return {k: (shared_data / p).read_bytes().decode("utf-8") for k, p in files.items()}


@pytest.mark.slow
def test_llama_cpp_tokenizes_eval_texts_like_hf(llama3_f16, llama3_hf, shared_data):
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(llama3_hf))
    llm = llama_cpp.Llama(str(llama3_f16), vocab_only=True, verbose=False)
    for name, text in _eval_texts(shared_data).items():
        ref = hf(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        same = sum(a == b for a, b in zip(got, ref)) / max(len(got), len(ref))
        print(f"{name}: {len(ref)} HF ids, llama.cpp {len(got)}, {same:.4%} equal by position")
        assert got == ref, f"{name}: llama.cpp and HF ids differ ({same:.4%} equal)"
    llm.close()


def _ids(llama3_hf: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_hf))(text)["input_ids"]


@pytest.mark.slow
def test_quantized_llama3_perplexity_matches_hf(shared_data, tmp_path, monkeypatch):
    """evaluate's llama.cpp-protocol perplexity on identical ids: f16 within 0.5% of HF fp32, q8_0
    within 1%, q4_k_m (fallback types at width 64) further off than q8_0. Weights drawn with std
    0.3 so the model is confident and its perplexity moves with every error (at std 0.02 it
    sits at the vocabulary size whatever the file holds); 128-token windows reach past the
    64-position original context, and a file without rope_freqs is more than 1% off."""
    from steps.evaluate import perplexity

    hf = make_tiny_llama3(tmp_path / "hf", initializer_range=0.3)
    text = (shared_data / "eval/wikitext-2-raw/wiki.test.raw").read_bytes().decode("utf-8")
    ids = _ids(hf, text[:4000])[:385]   # three 128-token windows
    assert len(ids) == 385
    ref = perplexity(hf, token_ids=ids, n_ctx=128, progress=False)
    paths = {"f16": Q.export_gguf(hf, tmp_path / "f16.gguf", "f16")}
    paths |= {q: Q.quantize_gguf(paths["f16"], tmp_path / f"{q}.gguf", q) for q in ("q8_0", "q4_k_m")}
    monkeypatch.setattr(Q, "_extra_tensors", lambda config, rope: {})
    paths["no rope_freqs"] = Q.export_gguf(hf, tmp_path / "bad.gguf", "f16")
    rel = {}
    for q, p in paths.items():
        got = perplexity(p, token_ids=ids, n_ctx=128, n_threads=2, progress=False)
        rel[q] = got["ppl"] / ref["ppl"] - 1
        print(f"llama3 {q}: PPL {got['ppl']:.6g} vs HF {ref['ppl']:.6g} ({rel[q]:+.4%}), "
              f"{Q.gguf_info(p)['tensor_types']}")
        assert got["n_scored"] == ref["n_scored"]
    assert abs(rel["f16"]) < 0.005 and abs(rel["q8_0"]) < 0.01, rel
    assert abs(rel["q4_k_m"]) > abs(rel["q8_0"]) and abs(rel["no rope_freqs"]) > 0.01, rel
    assert Q.gguf_info(paths["q4_k_m"])["file_type"] == "MOSTLY_Q4_K_M"


def test_rope_freqs_is_what_makes_logits_match(llama3_f16, llama3_hf, tmp_path, monkeypatch):
    """Logits agree with HF at every position of a 120-token prompt; a file exported without
    rope_freqs (llama.cpp then rotates by the unscaled frequencies) does not (the check can fail)."""
    text = (DEMO_DATA / "eval_en.txt").read_text(encoding="utf-8")
    ids = _ids(llama3_hf, text)[:120]
    ref = _hf_logits(llama3_hf, ids)
    diff = float(np.abs(_gguf_logits(llama3_f16, ids) - ref).max())
    monkeypatch.setattr(Q, "_extra_tensors", lambda config, rope: {})
    bad = Q.export_gguf(llama3_hf, tmp_path / "no_rope_freqs.gguf", "f16")
    diff_bad = float(np.abs(_gguf_logits(bad, ids) - ref).max())
    print(f"max |Δlogit| vs HF over {len(ids)} positions: {diff:.2e} with rope_freqs, "
          f"{diff_bad:.2e} without")
    assert diff < 5e-3, diff
    assert diff_bad > 5 * diff, (diff, diff_bad)   # measured: ~11x


@pytest.mark.slow
def test_tied_llama3_2_with_added_tokens(tmp_path, pytestconfig, tmp_path_factory):
    """Llama 3.2's tied embeddings (no output.weight) and words added to the vocabulary (the vocab
    stage's add_tokens): the vocabulary equals llama.cpp's converter's (added words
    USER_DEFINED), llama.cpp matches the added words whole as HF does, and its logits follow HF."""
    import gguf
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path / "hf"
    tok = make_llama3_tokenizer(d)
    assert tok.add_tokens(["中文词", "llamaflow"]) == 2
    tok.save_pretrained(d)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        rope_theta=500000.0, rope_scaling=dict(ROPE), bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=True)).save_pretrained(d)
    ours = Q.export_gguf(d, tmp_path / "ours.gguf", "f16")
    names = {t.name for t in gguf.GGUFReader(ours).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names

    src = _llama_cpp_converter(pytestconfig, tmp_path_factory)
    ref = tmp_path / "ref.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(d), "--vocab-only",
                        "--outfile", str(ref)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _fields(ours), _fields(ref)
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert a[k] == b[k], k
    assert a["tokenizer.ggml.tokens"][-2:] == ["中文词", "llamaflow"]
    assert a["tokenizer.ggml.token_type"][-2:] == [gguf.TokenType.USER_DEFINED] * 2

    text = "llamaflow 把中文词放进 llamaflow的词表: 中文词中文词 and llamaflows."
    hf_ids = AutoTokenizer.from_pretrained(str(d))(text)["input_ids"]
    assert len(tok) - 2 in hf_ids and len(tok) - 1 in hf_ids
    llm = _llama(ours)
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == hf_ids
    llm.close()
    diff = float(np.abs(_gguf_logits(ours, hf_ids) - _hf_logits(d, hf_ids)).max())
    assert diff < 5e-3, diff
