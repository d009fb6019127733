"""Evaluate stage: perplexity protocols against brute-force references, GGUF↔HF parity,
adapters, bits-per-byte by hand, generations, the stage run
(the judge: tests/test_judge.py; multiple choice: tests/test_mc.py)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from steps import evaluate as ev
from tests.tiny import DEMO_DATA

CORPUS = DEMO_DATA / "corpus_en.txt"
N_CTX = 64


@pytest.fixture(scope="module")
def hf(tiny_hf_model):
    return ev.load(tiny_hf_model, device="cpu")   # the brute-force references below run on CPU


@pytest.fixture(scope="module")
def gguf_f32(tiny_hf_model, tmp_path_factory):
    import llama_cpp  # noqa: F401  (a dev dependency: must be installed)
    from steps.quantize import export_gguf

    return export_gguf(tiny_hf_model, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32")


def _brute_llama_cpp(model, ids, n_ctx, bos, n_chunk):
    """One forward per scored position, full context up to it, float64 log-softmax."""
    nll = []
    with torch.no_grad():
        for i in range(n_chunk):
            x = list(ids[i * n_ctx:(i + 1) * n_ctx])
            x[0] = bos
            for j in range(n_ctx // 2, n_ctx - 1):
                logits = model(torch.tensor([x[:j + 1]])).logits[0, -1].double()
                nll.append(-torch.log_softmax(logits, -1)[x[j + 1]].item())
    return np.array(nll)


def test_llama_cpp_protocol_equals_per_token_brute_force(hf):
    ids = hf.tokenize(CORPUS.read_text(encoding="utf-8"))
    r = ev.perplexity(hf, token_ids=ids, n_ctx=N_CTX, max_tokens=3 * N_CTX, progress=False)
    nll = _brute_llama_cpp(hf.model, ids, N_CTX, hf.bos_id, 3)
    assert r["n_chunks"] == 3 and r["n_scored"] == 3 * (N_CTX // 2 - 1) == len(nll)
    assert r["n_tokens"] == 3 * N_CTX
    assert r["nll_sum"] == pytest.approx(nll.sum(), rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    # llama.cpp's error: PPL * sqrt((E[nll^2] - E[nll]^2) / (count - 1))
    err = math.exp(nll.mean()) * math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1))
    assert r["ppl_err"] == pytest.approx(err, rel=1e-5)


def test_strided_protocol_equals_hf_docs_loop(hf):
    """The transformers docs' loop (labels masked to -100, HF's own shifted loss), counting the
    scored tokens exactly."""
    ids = hf.tokenize(CORPUS.read_text(encoding="utf-8"))[:300]
    stride = 24
    r = ev.perplexity(hf, token_ids=ids, n_ctx=N_CTX, protocol="strided", stride=stride,
                      progress=False)
    seq = torch.tensor([ids])
    nll_sum, n, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, seq.size(1), stride):
            end = min(begin + N_CTX, seq.size(1))
            trg_len = end - prev_end
            x = seq[:, begin:end]
            labels = x.clone()
            labels[:, :-trg_len] = -100
            logits = hf.model(x).logits[0, :-1].double()
            tgt = labels[0, 1:]
            keep = tgt != -100
            nll_sum += -torch.log_softmax(logits, -1)[keep].gather(-1, tgt[keep, None]).sum().item()
            n += int(keep.sum())
            prev_end = end
            if end == seq.size(1):
                break
    assert r["n_scored"] == n == len(ids) - 1   # every token but BOS, exactly once
    assert r["nll_sum"] == pytest.approx(nll_sum, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(nll_sum / n), rel=1e-6)


@pytest.mark.gpu
def test_cuda_batched_equals_cpu(tiny_hf_model, hf):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    text = CORPUS.read_text(encoding="utf-8")
    for protocol in ("llama.cpp", "strided"):
        kw = dict(text=text, n_ctx=N_CTX, protocol=protocol, progress=False)
        gpu = ev.perplexity(ev.load(tiny_hf_model, device="cuda"), batch_size=16, **kw)
        cpu = ev.perplexity(hf, batch_size=1, **kw)
        assert gpu["n_scored"] == cpu["n_scored"]
        assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-5)


def test_windows_protocol_details():
    ids = list(range(10, 10 + 1000))
    w = ev.windows_for(ids, n_ctx=128, protocol="llama.cpp", stride=None, bos_id=1, max_tokens=None)
    assert len(w) == 1000 // 128
    for i, (x, s) in enumerate(w):
        assert x[0] == 1 and x[1:] == ids[i * 128 + 1:(i + 1) * 128]   # BOS replaces token 0
        assert s == 64 and len(x[s + 1:]) == 63                         # n_ctx/2 - 1 scored
    assert ids[128] == 138   # the caller's ids are not modified
    w = ev.windows_for(ids, n_ctx=128, protocol="llama.cpp", stride=None, bos_id=1, max_tokens=300)
    assert len(w) == 2
    with pytest.raises(ValueError, match="2\\*n_ctx = 2048"):
        ev.windows_for(ids, n_ctx=1024, protocol="llama.cpp", stride=None, bos_id=1, max_tokens=None)
    with pytest.raises(ValueError, match="max_tokens=100 < n_ctx=128"):
        ev.windows_for(ids, n_ctx=128, protocol="llama.cpp", stride=None, bos_id=1, max_tokens=100)
    # strided: every position 1..L-1 is a target exactly once, with <= n_ctx tokens of window
    w = ev.windows_for(ids[:500], n_ctx=128, protocol="strided", stride=50, bos_id=1, max_tokens=None)
    targets = [t for x, s in w for t in x[s + 1:]]
    assert targets == ids[1:500] and all(len(x) <= 128 for x, _ in w)
    with pytest.raises(ValueError, match="protocol"):
        ev.windows_for(ids, n_ctx=128, protocol="lm-eval", stride=None, bos_id=1, max_tokens=None)


def test_short_text_is_a_clear_error_before_loading(tmp_path, hf):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.", encoding="utf-8")
    with pytest.raises(ValueError, match="needs at least 2\\*n_ctx"):
        ev.perplexity(hf, short, n_ctx=N_CTX, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ev.perplexity(hf, tmp_path / "missing.txt", n_ctx=N_CTX, progress=False)


def test_max_tokens_budget(hf):
    text = CORPUS.read_text(encoding="utf-8")
    full = ev.perplexity(hf, text=text, n_ctx=N_CTX, progress=False)
    part = ev.perplexity(hf, text=text, n_ctx=N_CTX, max_tokens=5 * N_CTX + 7, progress=False)
    assert full["n_chunks"] == full["n_text_tokens"] // N_CTX > 5
    assert part["n_chunks"] == 5 and part["n_tokens"] == 5 * N_CTX
    s = ev.perplexity(hf, text=text, n_ctx=N_CTX, protocol="strided", max_tokens=200, progress=False)
    assert s["n_tokens"] <= 2 * 200 and s["n_scored"] == 199


def test_bits_per_byte_and_char_ppl_by_hand(hf):
    # Chinese characters are byte-fallback pieces for this English-trained tokenizer: 3 tokens,
    # 3 bytes, 1 character each. The tokenizer adds a dummy-prefix space ("▁").
    text = "渔夫在海滩上修补渔网。The fisherman repaired his net."
    r = ev.perplexity(hf, text=text, n_ctx=N_CTX, protocol="strided", progress=False)
    surface = " " + text
    assert r["n_scored"] == r["n_text_tokens"] - 1
    assert r["n_bytes"] == len(surface.encode("utf-8")) == 1 + 11 * 3 + 31
    assert r["n_chars"] == len(surface) == 1 + 11 + 31
    assert r["bits_per_byte"] == pytest.approx(r["nll_sum"] / r["n_bytes"] / math.log(2), rel=1e-12)
    assert r["char_ppl"] == pytest.approx(math.exp(r["nll_sum"] / r["n_chars"]), rel=1e-12)
    pieces = hf.tokenizer.convert_ids_to_tokens(hf.tokenize(text))
    assert pieces[1:4] == ["▁", "<0xE6>", "<0xB8>"]   # "▁" then the bytes of 渔 (e6 b8 94)


def _random_lora(model_dir: Path, out: Path, seed: int, targets) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                           init_lora_weights=False))
    with torch.no_grad():  # make the update large enough to move the perplexity visibly
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(out)
    return out


def test_adapters_unmerged_change_ppl_and_equal_the_peft_merge(tiny_hf_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a1 = _random_lora(tiny_hf_model, tmp_path / "a1", 1, ["q_proj", "v_proj"])
    a2 = _random_lora(tiny_hf_model, tmp_path / "a2", 2, ["o_proj", "up_proj"])
    text = CORPUS.read_text(encoding="utf-8")
    kw = dict(text=text, n_ctx=N_CTX, max_tokens=4 * N_CTX, progress=False)
    base = ev.perplexity(tiny_hf_model, **kw)
    stacked = ev.perplexity(tiny_hf_model, adapters=[a1, a2], **kw)
    assert stacked["adapters"] == [str(a1), str(a2)]
    assert abs(stacked["ppl"] / base["ppl"] - 1) > 1e-3

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    for a in (a1, a2):  # the recipe's sequential merge
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    model.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_hf_model).save_pretrained(tmp_path / "merged")
    merged = ev.perplexity(tmp_path / "merged", **kw)
    assert stacked["ppl"] == pytest.approx(merged["ppl"], rel=1e-5)
    assert stacked["n_scored"] == merged["n_scored"] == base["n_scored"]


@pytest.mark.parametrize("protocol", ["llama.cpp", "strided"])
def test_gguf_equals_hf_on_identical_ids(hf, gguf_f32, protocol):
    g = ev.load(gguf_f32, n_ctx=N_CTX, n_threads=1)
    ids = g.tokenize(CORPUS.read_text(encoding="utf-8"))
    kw = dict(token_ids=ids, n_ctx=N_CTX, protocol=protocol, max_tokens=8 * N_CTX, progress=False)
    rg, rh = ev.perplexity(g, **kw), ev.perplexity(hf, **kw)
    assert rg["backend"] == "gguf" and rh["backend"] == "hf"
    assert rg["n_scored"] == rh["n_scored"] and rg["n_bytes"] == rh["n_bytes"]
    assert rg["n_chars"] == rh["n_chars"]
    assert abs(rg["ppl"] / rh["ppl"] - 1) < 5e-3      # the contract; measured ~4e-7 with f32
    assert abs(rg["ppl"] / rh["ppl"] - 1) < 1e-5
    # one definition of a token's bytes in both runtimes, over the whole vocabulary
    vocab = range(hf.model.config.vocab_size)
    assert g.token_bytes(vocab) == hf.token_bytes(vocab)


def test_gguf_protocol_equals_independent_llama_cpp_loop(gguf_f32):
    """llama-perplexity's loop written out on llama-cpp-python's own per-chunk logits."""
    from llama_cpp import Llama

    g = ev.load(gguf_f32, n_ctx=N_CTX, n_threads=1)
    text = CORPUS.read_text(encoding="utf-8")
    r = ev.perplexity(g, text=text, n_ctx=N_CTX, max_tokens=6 * N_CTX, progress=False)

    llm = Llama(model_path=str(gguf_f32), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=1,
                verbose=False)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
    first, nll, nll2, count = N_CTX // 2, 0.0, 0.0, 0
    for i in range(6):
        chunk = tokens[i * N_CTX:(i + 1) * N_CTX]
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        for j in range(first, N_CTX - 1):
            logits = np.array(llm.scores[j], dtype=np.float32)
            mx = logits.max()
            sum_exp = float(np.sum(np.exp(logits - mx), dtype=np.float64))
            v = -(float(logits[chunk[j + 1]] - mx) - math.log(sum_exp))
            nll, nll2, count = nll + v, nll2 + v * v, count + 1
    nll, nll2 = nll / count, nll2 / count
    ppl = math.exp(nll)
    assert r["n_scored"] == count == 6 * (N_CTX // 2 - 1)
    assert r["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert r["ppl_err"] == pytest.approx(ppl * math.sqrt((nll2 - nll * nll) / (count - 1)), rel=1e-4)


def test_gguf_flash_attention_is_a_close_variant(gguf_f32):
    kw = dict(text=CORPUS.read_text(encoding="utf-8"), n_ctx=N_CTX, max_tokens=6 * N_CTX,
              progress=False)
    plain = ev.perplexity(ev.load(gguf_f32, n_ctx=N_CTX, n_threads=1), **kw)
    fa = ev.perplexity(ev.load(gguf_f32, n_ctx=N_CTX, n_threads=1, flash_attn=True), **kw)
    assert fa["n_scored"] == plain["n_scored"]
    assert fa["ppl"] != plain["ppl"] and abs(fa["ppl"] / plain["ppl"] - 1) < 1e-3


def test_gguf_dir_and_errors(gguf_f32, tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    (d / "m.gguf").symlink_to(gguf_f32)
    assert isinstance(ev.load(d, n_ctx=N_CTX, n_threads=1), ev.GGUFModel)
    (d / "n.gguf").symlink_to(gguf_f32)
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        ev.load(d)
    with pytest.raises(ValueError, match="adapters apply to HF models only"):
        ev.load(gguf_f32, [tmp_path])
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        ev.load(tmp_path)


def test_generate_greedy_follows_argmax_and_template(hf):
    prompts = ev.load_prompts(DEMO_DATA / "prompts.json")
    assert len(prompts) == 4 and prompts[2]["input"] == "图书馆九点开门。"
    p = ev.format_prompt(prompts[2]["instruction"], prompts[2]["input"])
    assert p.endswith("### Instruction:\n把下面的句子翻译成英文。\n图书馆九点开门。\n\n### Response: ")
    a = ev.generate(hf, prompts, max_new_tokens=6)
    b = ev.generate(hf, prompts, max_new_tokens=6)
    assert [x["output"] for x in a] == [x["output"] for x in b]
    assert all(x["mode"] == "greedy" and 1 <= x["n_new_tokens"] <= 6 for x in a)
    # the first generated token is the argmax of the model's next-token logits
    enc = hf.tokenizer(a[0]["prompt"], return_tensors="pt")
    with torch.no_grad():
        nxt = int(hf.model(**enc).logits[0, -1].argmax())
    assert a[0]["output_ids"][0] == nxt
    assert a[0]["output"] == hf.tokenizer.decode(a[0]["output_ids"], skip_special_tokens=True)
    s1 = ev.generate(hf, prompts[:2], max_new_tokens=6, greedy=False, seed=3)
    s2 = ev.generate(hf, prompts[:2], max_new_tokens=6, greedy=False, seed=3)
    assert [x["output"] for x in s1] == [x["output"] for x in s2]   # seeded sampling repeats
    assert s1[0]["mode"] == "sampled"


def test_generate_gguf(gguf_f32, hf):
    g = ev.load(gguf_f32, n_ctx=256, n_threads=1)
    # same weights, same prompt ids -> the same greedy continuation in both runtimes (a template
    # without the trailing space: this tiny tokenizer's HF normalizer strips it, llama.cpp's not)
    kw = dict(template="{instruction}", max_new_tokens=8)
    prompt = ["The fisherman repaired his net on the beach while"]
    assert g.tokenize(prompt[0]) == hf.tokenize(prompt[0])
    assert ev.generate(g, prompt, **kw)[0]["output_ids"] == ev.generate(hf, prompt, **kw)[0]["output_ids"]
    out = ev.generate(g, ["What is a checksum?"], max_new_tokens=5)
    prompt_ids = g.tokenize(out[0]["prompt"])
    g.llm.reset()
    g.llm.eval(prompt_ids)
    nxt = int(np.argmax(g.llm.scores[len(prompt_ids) - 1]))
    assert 1 <= out[0]["n_new_tokens"] == len(out[0]["output_ids"]) <= 5
    assert out[0]["output_ids"][0] == nxt


def _cfg(**kw):
    base = dict(eval_sets={"en": {"path": str(DEMO_DATA / "eval_en.txt")},
                           "corpus": {"path": str(CORPUS), "max_tokens": 4 * N_CTX}},
                n_ctx=N_CTX, prompts=str(DEMO_DATA / "prompts.json"), max_new_tokens=4)
    return ev.Config(**(base | kw))


def test_run_writes_results_and_generations(tiny_hf_model, tmp_path):
    seen = []
    m = ev.run(_cfg(), tmp_path, model=tiny_hf_model, on_metrics=lambda d, s: seen.append(s))
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    gens = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(res["sets"]) == {"en", "corpus"} and "judge" not in res and "mc" not in res
    assert res["sets"]["corpus"]["n_chunks"] == 4 and m["corpus.n_scored"] == 4 * 31
    assert m["en.ppl"] == res["sets"]["en"]["ppl"] and m["en.bits_per_byte"] > 0
    assert seen == [0, 1] and m["generations"] == 8 == len(gens)
    assert [g["mode"] for g in gens] == ["greedy"] * 4 + ["sampled"] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generations.jsonl", "results.json",
                                                          "timings.json"]
    # timings only in timings.json (DIGEST_EXCLUDE); no path anywhere: the same bytes elsewhere
    t = json.loads((tmp_path / "timings.json").read_text(encoding="utf-8"))
    assert set(t["sets"]) == {"en", "corpus"} and t["sets"]["en"]["seconds"] > 0
    assert len(t["generations"]) == 8 and ev.DIGEST_EXCLUDE == ("timings.json",)
    assert m["en.tokens_per_s"] == t["sets"]["en"]["tokens_per_s"]
    written = (tmp_path / "results.json").read_text() + (tmp_path / "generations.jsonl").read_text()
    assert "seconds" not in written and "tokens_per_s" not in written
    assert str(tiny_hf_model) not in written and str(DEMO_DATA) not in written
    assert res["model"] == tiny_hf_model.name and res["sets"]["en"]["path"] == "eval_en.txt"


def test_run_checks_inputs_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ev.run(_cfg(eval_sets={"x": {"path": str(tmp_path / "nope.txt")}}), tmp_path,
               model=tmp_path)   # an empty dir: loading it would fail differently
    bad = tmp_path / "p.json"
    bad.write_text('{"instruction": "not a list"}')
    with pytest.raises(ValueError, match="p.json"):
        ev.run(_cfg(prompts=str(bad)), tmp_path, model=tmp_path)
    with pytest.raises(Exception, match="extra"):
        ev.Config(n_ctxx=3)


def test_run_rejects_a_short_set_before_scoring_any(tiny_hf_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short for two chunks.", encoding="utf-8")
    cfg = _cfg(eval_sets={"corpus": {"path": str(CORPUS)}, "tiny": {"path": str(short)}}, prompts=None)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="eval set `tiny` .*short.txt.*2\\*n_ctx"):
        ev.run(cfg, out, model=tiny_hf_model)
    assert list(out.iterdir()) == []


@pytest.mark.shared_data
def test_wikitext_kind_rebuilds_canonical_wiki_test_raw(shared_data, llama_tokenizer):
    import sentencepiece as spm

    text = ev.read_text(shared_data / "eval/wikitext-2-raw/wikitext-test.hf-joined.txt", "wikitext")
    data = text.encode("utf-8")
    assert len(data) == 1_290_590
    assert hashlib.sha256(data).hexdigest() == \
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    n = 1 + len(spm.SentencePieceProcessor(model_file=str(llama_tokenizer)).encode(text))
    assert n == 335_688 and n // 512 == 655     # llama-perplexity's 655 chunks at n_ctx 512
    with pytest.raises(ValueError, match="kind: text"):
        ev.read_text(shared_data / "eval/zh/libai_doc.txt", "wikitext")
