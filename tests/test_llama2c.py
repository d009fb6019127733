"""llama2.c importer on Karpathy's trained stories260K: Meta layout, HF conversion, a trained
model's perplexity and text."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from steps.convert import convert_meta_to_hf
from steps.llama2c import import_llama2c
from steps.meta import MetaFormatError, MetaParams, md5_file, read_checklist
from tests import meta_reference

README_PARAMS = {"dim": 64, "multiple_of": 4, "n_heads": 8, "n_kv_heads": 4, "n_layers": 5,
                 "norm_eps": 1e-05, "vocab_size": 512}


@pytest.fixture(scope="module")
def stories(shared_data):
    return shared_data / "models" / "stories260K"


@pytest.fixture(scope="module")
def converted(stories, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stories260K")
    meta = import_llama2c(stories / "stories260K.bin", stories / "tok512.model", tmp / "meta")
    hf = convert_meta_to_hf(meta, tmp / "hf", dtype="float32", context_length=512)
    return meta, hf


def test_meta_layout(stories, converted):
    meta, _ = converted
    assert json.loads((meta / "params.json").read_text()) == README_PARAMS
    assert sorted(p.name for p in meta.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model",
        "tokenizer_checklist.chk"]
    for chk in ("checklist.chk", "tokenizer_checklist.chk"):
        for name, (_, md5) in read_checklist(meta / chk).items():
            assert md5_file(meta / name) == md5
    assert md5_file(meta / "tokenizer.model") == md5_file(stories / "tok512.model")

    sd = torch.load(meta / "consolidated.00.pth", weights_only=True, mmap=True)
    p = MetaParams.from_dict(README_PARAMS)
    assert {k: tuple(v.shape) for k, v in sd.items()} == p.shapes(512)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(v.numel() for k, v in sd.items() if k != "output.weight") == 260_032
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])  # tied classifier
    # spot-check against the raw file: wk of layer 2 starts after embeddings, rms_att, wq, wk[0:2]
    flat = np.fromfile(stories / "stories260K.bin", dtype="<f4", offset=28)
    off = 512 * 64 + 5 * 64 + 5 * 64 * 64 + 2 * 32 * 64
    assert np.array_equal(sd["layers.2.attention.wk.weight"].numpy().ravel(), flat[off:off + 32 * 64])
    assert np.array_equal(sd["norm.weight"].numpy(), flat[264_128 - 2 * 512 * 4 - 64:264_128 - 2 * 512 * 4])


def test_hf_logits_match_meta_reference_on_trained_weights(converted):
    from transformers import LlamaForCausalLM

    meta, hf = converted
    state, p = meta_reference.load_meta(meta)
    tokens = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = meta_reference.forward(state, p, tokens)
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32)(tokens).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_perplexity_and_greedy_text(converted, shared_data, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from steps.evaluate import perplexity

    _, hf = converted
    r = perplexity(hf, shared_data / "eval/tinystories/tinystories_sample.txt", n_ctx=256,
                   protocol="llama.cpp", progress=False)
    with capsys.disabled():
        print(f"\nstories260K HF fp32 perplexity (llama.cpp protocol, n_ctx 256): {r['ppl']:.4f} "
              f"over {r['n_scored']} tokens")
    assert 1.5 < r["ppl"] < 8, r["ppl"]  # random weights would give ~512

    tok = AutoTokenizer.from_pretrained(hf)
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32)
    ids = tok("Once upon a time", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == 1
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    words = set(text.lower().replace(".", " ").replace(",", " ").split())
    assert {"the", "was"} <= words or {"a", "was"} <= words, text
    assert words & {"she", "he", "her", "his", "they"}, text


def test_download_stage_with_llama2c_source(stories, tmp_path):
    from steps import download

    config = download.Config(source={"kind": "llama2c",
                                     "bin_path": str(stories / "stories260K.bin"),
                                     "tokenizer_model": str(stories / "tok512.model")})
    out = tmp_path / "out"
    out.mkdir()
    metrics = download.run(config, out)
    assert metrics["source_kind"] == "llama2c" and metrics["n_shards"] == 1
    download.verify(out)  # md5sum -c semantics over both checklists
    assert json.loads((out / "params.json").read_text()) == README_PARAMS
    listed = read_checklist(out / "checklist.chk") | read_checklist(out / "tokenizer_checklist.chk")
    assert set(listed) == {"consolidated.00.pth", "params.json", "tokenizer.model"}


def test_bad_inputs(stories, tmp_path):
    data = (stories / "stories260K.bin").read_bytes()
    tok = stories / "tok512.model"

    cases = {
        "truncated.bin": (data[:-100], r"truncated.bin: 1056440 bytes, but the header"),
        "short.bin": (data[:10], r"short.bin: 10 bytes"),
        "v1.bin": (b"ak42" + struct.pack("<i", 1) + data[8:], r"v1.bin: a llama2.c version 1"),
        "zero_heads.bin": (data[:12] + struct.pack("<i", 0) + data[16:], r"n_heads = 0"),
    }
    for name, (raw, match) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(MetaFormatError, match=match):
            import_llama2c(tmp_path / name, tok, tmp_path / f"out_{name}")
        assert not (tmp_path / f"out_{name}").exists()

    other_tok = tmp_path / "other.model"
    from tests.tiny import train_tiny_tokenizer

    train_tiny_tokenizer(other_tok)
    with pytest.raises(MetaFormatError, match=r"other.model: 320 pieces.*512 embedding rows"):
        import_llama2c(stories / "stories260K.bin", other_tok, tmp_path / "out_tok")
    assert not (tmp_path / "out_tok").exists()


def test_untied_classifier_is_read_from_the_file(stories, tmp_path):
    """A negative vocab_size means wcls follows the RoPE tables (llama2.c export with an untied
    classifier); build one from stories260K with a distinct classifier."""
    data = bytearray((stories / "stories260K.bin").read_bytes())
    data[20:24] = struct.pack("<i", -512)
    wcls = np.arange(512 * 64, dtype="<f4") / 1000.0
    (tmp_path / "untied.bin").write_bytes(bytes(data) + wcls.tobytes())
    meta = import_llama2c(tmp_path / "untied.bin", stories / "tok512.model", tmp_path / "meta")
    sd = torch.load(meta / "consolidated.00.pth", weights_only=True)
    assert torch.equal(sd["output.weight"], torch.from_numpy(wcls.reshape(512, 64)))
    assert not torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    assert json.loads((meta / "params.json").read_text())["vocab_size"] == 512


def test_per_story_perplexity_with_hf_model(converted, shared_data, stories, capsys):
    """Mean NLL computed here with the HF model alone: each story (split on <|endoftext|>) gets a
    BOS, is tokenized with tok512.model and scored in windows of at most 512 tokens (the model's
    max_seq_len), every token after BOS exactly once."""
    import math

    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    _, hf = converted
    sp = spm.SentencePieceProcessor(model_file=str(stories / "tok512.model"))
    text = (shared_data / "eval/tinystories/tinystories_sample.txt").read_text(encoding="utf-8")
    docs = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for doc in docs:
        ids = [1] + sp.encode(doc)
        for start in range(0, len(ids) - 1, 511):  # next window starts at the last scored token
            w = torch.tensor([ids[start:start + 512]])
            with torch.no_grad():
                logits = model(w).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    ppl = math.exp(nll / n)
    with capsys.disabled():
        print(f"\nstories260K HF fp32, {len(docs)} stories, {n} tokens: mean NLL {nll / n:.4f}, "
              f"perplexity {ppl:.3f}")
    assert (len(docs), n) == (5, 1804)  # the data README's count
    assert ppl < 5, ppl  # measured 3.548; near-uniform (untrained) weights give ~512
