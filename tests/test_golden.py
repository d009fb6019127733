"""Golden numbers on the real tiny model, stories260K, on a CPU in fp32.

Each figure is pinned; a change that moves one must change the pinned value in the same commit,
with the reason in its message. The greedy continuation is also an outside reference: llama2.c's
own `run.c` (`-t 0 -i "Once upon a time"`) prints exactly these ids for this checkpoint.
"""
from __future__ import annotations

import pytest
import torch

from steps.convert import convert_meta_to_hf
from steps.llama2c import import_llama2c

pytestmark = pytest.mark.shared_data

PROMPT = "Once upon a time"
PROMPT_IDS = [1, 403, 407, 261, 378]
# llama2.c run.c, temperature 0, on stories260K.bin + tok512.bin: the 30 ids after the prompt
# ("..., there was a little girl named Lily. She loved to play outside in the park.").
GREEDY_30 = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
             410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432]


@pytest.fixture(scope="module")
def stories_hf(shared_data, tmp_path_factory):
    s = shared_data / "models" / "stories260K"
    tmp = tmp_path_factory.mktemp("golden")
    meta = import_llama2c(s / "stories260K.bin", s / "tok512.model", tmp / "meta")
    return convert_meta_to_hf(meta, tmp / "hf", dtype="float32", context_length=512)


def test_greedy_continuation_is_llama2c_s(stories_hf):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(stories_hf)
    ids = tok(PROMPT, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == PROMPT_IDS
    model = LlamaForCausalLM.from_pretrained(stories_hf, dtype=torch.float32)
    out = model.generate(**ids, max_new_tokens=30, do_sample=False)
    assert out[0, len(PROMPT_IDS):].tolist() == GREEDY_30
    assert tok.decode(GREEDY_30).startswith(", there was a little girl named Lily.")


def test_tinystories_perplexity_llama_cpp_protocol(stories_hf, shared_data, tmp_path):
    """The TinyStories sample under llama-perplexity's protocol at n_ctx 256: 1883 text ids
    (SentencePiece's count, leading/trailing newlines kept), 7 chunks, PPL pinned to 4 decimals;
    an f32 GGUF on llama.cpp scores the same ids to within its float accumulation."""
    import sentencepiece as spm

    from steps.evaluate import perplexity
    from steps.quantize import export_gguf

    text = shared_data / "eval" / "tinystories" / "tinystories_sample.txt"
    sp = spm.SentencePieceProcessor(model_file=str(stories_hf / "tokenizer.model"))
    hf = perplexity(stories_hf, text, n_ctx=256, protocol="llama.cpp", progress=False)
    assert hf["n_text_tokens"] == 1 + len(sp.encode(text.read_text(encoding="utf-8"))) == 1883
    assert (hf["n_chunks"], hf["n_scored"]) == (7, 889)
    assert hf["ppl"] == pytest.approx(6.897861, abs=1e-4)   # HF fp32, torch on the CPU
    gguf = perplexity(export_gguf(stories_hf, tmp_path / "f32.gguf", "f32"), text, n_ctx=256,
                      protocol="llama.cpp", progress=False)
    assert gguf["n_text_tokens"] == hf["n_text_tokens"]
    assert gguf["ppl"] == pytest.approx(hf["ppl"], rel=1e-4)
