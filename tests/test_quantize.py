"""Quantize stage: every GGUF we produce is loaded by llama.cpp and compared with the HF model.

Figures measured on this machine are in the assertion messages and printed (pytest -s).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from steps import quantize as Q
from steps.checks import VocabMismatch
from tests.tiny import DEMO_DATA

PROMPT = "Quantization stores each weight with fewer bits, so the model is smaller: 42 cats, café!"


@contextlib.contextmanager
def _no_extra_buffers():
    """Open models without ggml's extra CPU buffer types (AMX, weight repacking).

    The wheel is built with GGML_NATIVE, and this VM advertises AMX (and the kernel grants
    ARCH_REQ_XCOMP_PERM), yet the first AMX tile instruction (tilezero, in ggml_backend_amx_mul_mat
    on Q8_0/Q4_0 weights) dies with SIGILL. Plain CPU kernels give the same results."""
    import llama_cpp
    import llama_cpp.llama as L

    orig = L.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    L.llama_cpp.llama_model_default_params = llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        L.llama_cpp.llama_model_default_params = llama_cpp.llama_model_default_params = orig


def _llama(path: Path, n_ctx: int = 128):
    from llama_cpp import Llama

    with _no_extra_buffers():
        return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                     n_threads=2)


def _gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama(path)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _sp_ids(model_dir: Path, text: str) -> list[int]:
    import sentencepiece as spm

    return [1] + spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).encode(text)


def _make_model(out_dir: Path, sp_model: Path, *, vocab: int | None = None, hidden: int = 64,
                intermediate: int = 128, pad_token: str | None = None, seed: int = 0) -> Path:
    """A random LLaMA like tests/tiny.py's, with a chosen vocabulary (rows) and width."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steps.tokenizer import save_hf_tokenizer

    n_tok = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size() + (pad_token is not None)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab or n_tok, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    save_hf_tokenizer(sp_model, out_dir, pad_token=pad_token)
    return out_dir


@pytest.fixture(scope="module")
def exports(tiny_hf_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {q: Q.export_gguf(tiny_hf_model, out / f"m-{q}.gguf", q) for q in Q.EXPORT_TYPES}


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory, tiny_sp_model) -> Path:
    """Width 256 (K-quant rows apply), vocabulary 320 pieces + [PAD] = 321 rows: an odd
    vocabulary with an added token (docs/recipe.md, "K-quants on a vocabulary not divisible by 256",
    "Added tokens and padded vocabularies reach llama.cpp")."""
    return _make_model(tmp_path_factory.mktemp("odd"), tiny_sp_model, hidden=256,
                       intermediate=512, pad_token="[PAD]")


# ---------------------------------------------------------------------------------------------
# metadata, vocabulary, layout


def test_metadata_read_back(exports, tiny_hf_model):
    import gguf
    import sentencepiece as spm

    r = gguf.GGUFReader(exports["f16"])
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama"
    expected = {"llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.vocab_size": 320, "general.file_type": 1, "general.quantization_version": 2,
                "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    assert {k: f[k] for k in expected} == expected
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["llama.rope.freq_base"] == 10000.0
    sp = spm.SentencePieceProcessor(model_file=str(tiny_hf_model / "tokenizer.model"))
    assert f["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(320)]
    assert f["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(320)])
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    names = {t.name for t in r.tensors}
    assert names == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
         "ffn_down")}
    assert {t.name: t.tensor_type.name for t in r.tensors if "norm" in t.name} == dict.fromkeys(
        ["blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.1.attn_norm.weight",
         "blk.1.ffn_norm.weight", "output_norm.weight"], "F32")


def test_f32_tensors_are_hf_weights_with_meta_rotary_layout(exports, tiny_hf_model):
    """token_embd is the embedding verbatim; attn_q/attn_k are HF's rows permuted back to Meta's
    interleaved pairs: undoing it with transformers' own HF permute gives HF's tensor exactly."""
    import gguf
    from safetensors.numpy import load_file

    hf = load_file(str(tiny_hf_model / "model.safetensors"))
    g = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
         for t in gguf.GGUFReader(exports["f32"]).tensors}

    def hf_permute(w, n_heads):  # convert_llama_weights_to_hf.py: Meta -> HF
        dim1, dim2 = w.shape
        return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).swapaxes(1, 2).reshape(dim1, dim2)

    assert np.array_equal(g["token_embd.weight"], hf["model.embed_tokens.weight"])
    assert np.array_equal(g["output.weight"], hf["lm_head.weight"])
    q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
    assert not np.array_equal(g["blk.1.attn_q.weight"], q)  # it really is permuted
    assert np.array_equal(hf_permute(g["blk.1.attn_q.weight"], 4), q)
    assert np.array_equal(hf_permute(g["blk.1.attn_k.weight"], 2), k)
    assert np.array_equal(g["blk.1.attn_v.weight"], hf["model.layers.1.self_attn.v_proj.weight"])


# ---------------------------------------------------------------------------------------------
# fidelity against the HF model (tiny random LLaMA, GQA)


def test_llama_cpp_tokenizes_like_sentencepiece(exports, tiny_hf_model):
    # No leading or repeated spaces: the tiny tokenizer keeps SentencePiece's default
    # remove_extra_whitespaces, which llama.cpp does not implement (LLaMA's own tokenizer has it off).
    llm = _llama(exports["f16"])
    for text in (PROMPT, "多字节 ✓ bytes", "a\nb c\n\nd"):
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == _sp_ids(tiny_hf_model, text)


@pytest.mark.parametrize("qtype,max_diff", [("f32", 1e-3), ("f16", 5e-3), ("bf16", 3e-2)])
def test_export_logits_match_hf(exports, tiny_hf_model, qtype, max_diff):
    ids = _sp_ids(tiny_hf_model, PROMPT)
    ref, got = _hf_logits(tiny_hf_model, ids), _gguf_logits(exports[qtype], ids)
    diff = float(np.abs(got - ref).max())
    print(f"{qtype}: {len(ids)} positions, max |Δlogit| = {diff:.2e} (logit std {ref.std():.3f})")
    assert (got.argmax(-1) == ref.argmax(-1)).all(), f"{qtype}: top-1 differs from HF"
    assert diff < max_diff, f"{qtype}: max |Δlogit| {diff:.2e} >= {max_diff}"


def test_error_grows_as_bits_shrink(exports, tiny_hf_model, tmp_path):
    """RMS logit error vs HF fp32: f32 < f16 < bf16 < q8_0 < q4_0 (exported) and the llama.cpp
    q8_0 < q4_0 from the f16 file (robust on any model; finer orders are tested on stories260K)."""
    ids = _sp_ids(tiny_hf_model, PROMPT)
    ref = _hf_logits(tiny_hf_model, ids)
    rms = {q: float(np.sqrt(((_gguf_logits(p, ids) - ref) ** 2).mean())) for q, p in exports.items()}
    for q in ("q8_0", "q4_0"):
        p = Q.quantize_gguf(exports["f16"], tmp_path / f"{q}.gguf", q)
        rms[f"llama.cpp {q}"] = float(np.sqrt(((_gguf_logits(p, ids) - ref) ** 2).mean()))
    print("RMS Δlogit:", {k: f"{v:.2e}" for k, v in rms.items()})
    order = ["f32", "f16", "bf16", "q8_0", "q4_0"]
    assert [rms[q] for q in order] == sorted(rms[q] for q in order), rms
    assert rms["llama.cpp q8_0"] < rms["llama.cpp q4_0"], rms


def test_numpy_export_is_byte_identical_to_llama_cpp(exports, tmp_path):
    """gguf's numpy Q8_0/Q4_0 and ggml's reference quantizers agree bit for bit: our direct q8_0
    export == llama.cpp Q8_0 from the f32 export; q4_0 == llama.cpp Q4_0 --pure (without --pure
    llama.cpp gives output.weight another type)."""
    import gguf

    for q, pure in (("q8_0", False), ("q4_0", True)):
        ref = Q.quantize_gguf(exports["f32"], tmp_path / f"{q}.gguf", q, pure=pure)
        a = {t.name: t for t in gguf.GGUFReader(exports[q]).tensors}
        b = {t.name: t for t in gguf.GGUFReader(ref).tensors}
        assert a.keys() == b.keys()
        for n in a:
            assert a[n].tensor_type == b[n].tensor_type, (q, n)
            assert np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)), (q, n)


def test_perplexity_parity_on_tiny_model(exports, tiny_hf_model, tmp_path):
    """llama.cpp-protocol perplexity on identical token ids: f16 GGUF within 0.5% of HF fp32,
    q8_0 within 1% (a random model: PPL is near the vocabulary size, so this checks parity only)."""
    from steps.evaluate import perplexity

    text = (DEMO_DATA / "eval_en.txt").read_text(encoding="utf-8")
    ids = _sp_ids(tiny_hf_model, text)
    assert len(ids) >= 256
    ref = perplexity(tiny_hf_model, token_ids=ids, n_ctx=128, progress=False)
    q8 = Q.quantize_gguf(exports["f16"], tmp_path / "q8_0.gguf", "q8_0")
    for q, path, tol in (("f16", exports["f16"], 0.005), ("q8_0", q8, 0.01)):
        got = perplexity(path, token_ids=ids, n_ctx=128, n_threads=2, progress=False)
        rel = got["ppl"] / ref["ppl"] - 1
        print(f"tiny {q}: PPL {got['ppl']:.4f} vs HF {ref['ppl']:.4f} ({rel:+.4%}), "
              f"{got['n_scored']} scored tokens")
        assert got["n_scored"] == ref["n_scored"]
        assert abs(rel) < tol, f"{q}: PPL {got['ppl']} vs HF {ref['ppl']} ({rel:+.3%})"


@pytest.fixture(scope="module")
def stories260k(shared_data, tmp_path_factory) -> Path:
    """Karpathy's trained stories260K (dim 64, 5 layers, GQA 8/4, vocab 512) as an fp32 HF model."""
    from steps.convert import convert_meta_to_hf
    from steps.llama2c import import_llama2c

    d = shared_data / "models" / "stories260K"
    tmp = tmp_path_factory.mktemp("stories260K")
    meta = import_llama2c(d / "stories260K.bin", d / "tok512.model", tmp / "meta")
    return convert_meta_to_hf(meta, tmp / "hf", dtype="float32")


# Every type but the 3-bit ones falls back to a legacy type at dim 64 (K-quants need 256-wide rows,
# and ffn_down's 172-wide rows are F16 in every type), so only these orderings are asserted: they
# follow from the bits the tensors actually get (printed), not from the type names.
_STORIES_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0", "q3_k_m", "q2_k")


@pytest.mark.slow
def test_perplexity_on_trained_stories260k(stories260k, shared_data, tmp_path):
    from steps.evaluate import perplexity

    text = (shared_data / "eval" / "tinystories" / "tinystories_sample.txt").read_text(encoding="utf-8")
    ids = _sp_ids(stories260k, text)
    ref = perplexity(stories260k, token_ids=ids, n_ctx=256, progress=False)["ppl"]
    f16 = Q.export_gguf(stories260k, tmp_path / "f16.gguf", "f16")
    paths = {"f16": f16, "bf16": Q.export_gguf(stories260k, tmp_path / "bf16.gguf", "bf16")}
    paths |= {q: Q.quantize_gguf(f16, tmp_path / f"{q}.gguf", q) for q in _STORIES_TYPES}
    d = {}
    for q, p in paths.items():
        d[q] = perplexity(p, token_ids=ids, n_ctx=256, n_threads=2, progress=False)["ppl"] / ref - 1
        print(f"stories260K {q:7s} ΔPPL {d[q]:+.3%}  {Q.gguf_info(p)['tensor_types']}")
    print(f"HF fp32 PPL {ref:.4f} on {len(ids)} tokens (n_ctx 256, llama.cpp protocol)")
    assert abs(d["f16"]) < 0.005 and abs(d["bf16"]) < 0.005, d
    assert abs(d["q8_0"]) < 0.01, d
    lower = [q for q in _STORIES_TYPES if q not in ("q8_0", "q6_k")]
    assert max(d["q8_0"], d["q6_k"]) < min(d[q] for q in lower), d
    five_bit = ("q5_k_m", "q5_1", "q5_0", "q4_k_m")   # all Q5_0/Q5_1 (+ some Q8_0) at dim 64
    assert max(d[q] for q in five_bit) < d["q3_k_m"] < d["q2_k"], d
    assert d["q4_1"] < d["q4_0"] <= d["q2_k"], d


# ---------------------------------------------------------------------------------------------
# odd vocabularies: K-quants, added tokens and padding, the wrong tokenizer (docs/recipe.md)


def test_odd_vocab_quantizes_to_every_type(odd_model, tmp_path):
    """321 rows (320 pieces + [PAD]): every llama.cpp type is made, loads, has n_vocab == 321 and
    finite logits; K-quants really apply to the 256-wide rows (vocabulary size does not matter)."""
    import gguf

    f16 = Q.export_gguf(odd_model, tmp_path / "f16.gguf", "f16")
    r = gguf.GGUFReader(f16)
    assert r.fields["tokenizer.ggml.tokens"].contents()[320] == "[PAD]"
    assert r.fields["tokenizer.ggml.token_type"].contents()[320] == 4  # USER_DEFINED
    assert r.fields["tokenizer.ggml.padding_token_id"].contents() == 320
    ids = _sp_ids(odd_model, PROMPT)
    kinds = {}
    for q in (q for q in Q.LLAMA_CPP_TYPES if q not in Q.ALWAYS_IMATRIX):  # IQ: test_imatrix.py
        p = Q.quantize_gguf(f16, tmp_path / f"{q}.gguf", q)
        info = Q.gguf_info(p)
        kinds[q] = info["tensor_types"]
        llm = _llama(p)
        assert llm.n_vocab() == 321 == info["n_vocab"], q
        llm.eval(ids)
        assert np.isfinite(np.array(llm.scores[:len(ids)])).all(), q
        # llama.cpp gives "[...]" user-defined tokens the CONTROL attribute too: parsed only as
        # special text, like <s>, never produced from plain text
        assert llm.tokenize(b"[PAD]", add_bos=False, special=True) == [320], q
    print("tensor types per qtype (hidden 256, vocab 321):", json.dumps(kinds))
    assert kinds["q4_k_m"].get("Q4_K", 0) > 0 and kinds["q4_k_m"].get("Q6_K", 0) > 0
    assert kinds["q2_k"].get("Q2_K", 0) > 0 and kinds["q6_k"].get("Q6_K", 0) > 0
    assert kinds["q8_0"] == {"F32": 5, "Q8_0": 16}


def test_token_list_padded_to_embedding_rows(tmp_path, tiny_sp_model):
    """config vocab_size 323 for 320 pieces (a padded vocabulary): [PAD320]... UNUSED entries."""
    import gguf

    m = _make_model(tmp_path / "hf", tiny_sp_model, vocab=323)
    r = gguf.GGUFReader(Q.export_gguf(m, tmp_path / "m.gguf", "f16"))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 323 == r.fields["llama.vocab_size"].contents()
    assert tokens[320:] == ["[PAD320]", "[PAD321]", "[PAD322]"]
    assert r.fields["tokenizer.ggml.token_type"].contents()[320:] == [5, 5, 5]
    assert _llama(tmp_path / "m.gguf").n_vocab() == 323


def test_wrong_tokenizer_is_refused_before_writing(tmp_path, tiny_sp_model):
    """The LLaMA-tokenizer-next-to-a-Chinese-model mistake in both directions (docs/recipe.md,
    "The tokenizer must be the one the model was trained with")."""
    too_many = _make_model(tmp_path / "a", tiny_sp_model, vocab=320)
    from steps.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(tiny_sp_model, too_many, pad_token="[PAD]")   # 321 tokens, 320 rows
    with pytest.raises(VocabMismatch, match="321 tokens"):
        Q.export_gguf(too_many, tmp_path / "a.gguf")
    too_few = _make_model(tmp_path / "b", tiny_sp_model, vocab=320 + 600)  # 600 ids without tokens
    with pytest.raises(ValueError, match="P9"):
        Q.export_gguf(too_few, tmp_path / "b.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_missing_tokenizer_model_is_a_clear_error(tiny_hf_model, tmp_path):
    d = tmp_path / "no_sp"
    shutil.copytree(tiny_hf_model, d)
    (d / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Q.export_gguf(d, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_quantize_input_errors(exports, tmp_path):
    with pytest.raises(ValueError, match="valid types: q8_0, q6_k"):
        Q.quantize_gguf(exports["f16"], tmp_path / "x.gguf", "q4_k_x")
    with pytest.raises(ValueError, match="never requantize"):
        Q.quantize_gguf(exports["q4_0"], tmp_path / "x.gguf", "q2_k")
    with pytest.raises(FileNotFoundError, match="source GGUF not found"):
        Q.quantize_gguf(tmp_path / "nope.gguf", tmp_path / "x.gguf", "q4_0")
    with pytest.raises(ValueError, match="needs llama.cpp"):
        Q.export_gguf(tmp_path, tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(ValueError, match="unknown quantization type"):
        Q.Config(qtype="q9")
    assert Q.Config(qtype="Q4_K_M").qtype == "q4_k_m"


# ---------------------------------------------------------------------------------------------
# stage protocol


def test_run_writes_gguf_and_quant_info(tiny_hf_model, tmp_path):
    seen = []
    f16_dir, q_dir = tmp_path / "f16", tmp_path / "q4km"
    f16_dir.mkdir(), q_dir.mkdir()
    m = Q.run(Q.Config(qtype="f16"), f16_dir, model=tiny_hf_model)
    assert sorted(p.name for p in f16_dir.iterdir()) == ["model-f16.gguf", "quant_info.json"]
    size = (f16_dir / "model-f16.gguf").stat().st_size
    assert m["file_size"] == size and m["tensors_F16"] == 16 and m["tensors_F32"] == 5
    n_params = 320 * 64 * 2 + 64 + 2 * (2 * 64 + 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert m["n_params"] == n_params and m["bpw"] == pytest.approx(size * 8 / n_params)

    mq = Q.run(Q.Config(qtype="q4_k_m"), q_dir, on_metrics=lambda d, s: seen.append((d, s)),
               gguf=f16_dir)
    info = json.loads((q_dir / "quant_info.json").read_text())
    assert info["qtype"] == "q4_k_m" and info["method"] == "llama.cpp"
    assert info["source"] == "model-f16.gguf" and info["file_type"] == "MOSTLY_Q4_K_M"
    assert sum(info["tensor_types"].values()) == 21 == len(info["tensor_type_by_name"])
    assert mq["bpw"] < m["bpw"] and seen and seen[0][0]["file_size"] == mq["file_size"]
    assert all(isinstance(v, (int, float, str)) for v in mq.values())

    with pytest.raises(ValueError, match="exactly one input"):
        Q.run(Q.Config(qtype="q4_0"), tmp_path, model=tiny_hf_model, gguf=f16_dir)
    with pytest.raises(ValueError, match="pass gguf="):
        Q.run(Q.Config(qtype="q4_k_m"), tmp_path, model=tiny_hf_model)


def test_llama_cpp_log_is_quiet_unless_asked(exports, tmp_path, capfd, caplog, monkeypatch):
    """llama.cpp's loader dump and per-tensor lines are INFO: not on the console by default,
    in the `steps.llama_cpp` log at INFO when LLAMAFLOW_LLAMA_CPP_LOG=info."""
    import logging

    from steps.evaluate import load
    from steps.quantize import quantize_gguf

    monkeypatch.delenv("LLAMAFLOW_LLAMA_CPP_LOG", raising=False)
    with caplog.at_level(logging.WARNING, logger="steps.llama_cpp"):
        quantize_gguf(exports["f16"], tmp_path / "quiet.gguf", "q8_0")
        load(tmp_path / "quiet.gguf", n_ctx=64).close()
    assert "llama_model_loader" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name == "steps.llama_cpp"]
    monkeypatch.setenv("LLAMAFLOW_LLAMA_CPP_LOG", "info")
    with caplog.at_level(logging.INFO, logger="steps.llama_cpp"):
        quantize_gguf(exports["f16"], tmp_path / "loud.gguf", "q8_0")
    lines = [r for r in caplog.records if r.name == "steps.llama_cpp"]
    assert any("llama_model_loader" in r.getMessage() and r.levelno == logging.INFO
               for r in lines)
    assert all("\n" not in r.getMessage() for r in lines)   # whole lines, one record each


def test_llama_cpp_log_levels(caplog, monkeypatch):
    """ggml's levels (DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 continues the previous line) map
    to logging's; per-tensor fallback notes are detail, their total stays a warning."""
    import logging

    from steps import llamacpp_log

    monkeypatch.setenv("LLAMAFLOW_LLAMA_CPP_LOG", "debug")
    llamacpp_log.route_llama_cpp_log()
    cb = llamacpp_log._state["callback"]
    with caplog.at_level(logging.DEBUG, logger="steps.llama_cpp"):
        cb(2, b"loaded meta data with 25 key-value ", None)
        cb(5, b"pairs\n", None)
        cb(3, b"warning: blk.0.ffn_down.weight   - ncols   172 not divisible by  32 (q8_0)\n", None)
        cb(3, b"llama_model_quantize_impl: WARNING: 5 of 48 tensor(s) required fallback\n", None)
        cb(4, b"failed to open\n", None)
    got = [(r.levelno, r.getMessage()[:20]) for r in caplog.records if r.name == "steps.llama_cpp"]
    assert got == [(logging.INFO, "loaded meta data wit"), (logging.INFO, "warning: blk.0.ffn_d"),
                   (logging.WARNING, "llama_model_quantize"), (logging.ERROR, "failed to open")]
