"""sft stage: the exact Chinese-Alpaca prompt and label masking (checked against hand-tokenized
ids from sentencepiece itself), bad-record counting on real files, padding/packing, and training
on top of a pre-training adapter ([PAD] added: adapter rows = tokenizer length)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steps import pretrain, sft
from steps.checks import check_adapter, tokenizer_size
from tests.tiny import DEMO_DATA

# Written out here on purpose (not imported): note the space after "Response:".
RECIPE_TEMPLATE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response: ")


def test_default_template_is_the_recipe_text():
    assert sft.Config().prompt_template == RECIPE_TEMPLATE
    assert sft.Config().prompt_template.endswith("### Response: ")
    c = sft.Config()
    assert (c.learning_rate, c.lora.r, c.lora.alpha, c.lora.dropout, c.max_seq_length) == \
        (1e-4, 8, 32, 0.05, 512)


@pytest.fixture(scope="module")
def llama_hf_tokenizer(llama_tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer
    from steps.tokenizer import save_hf_tokenizer
    d = tmp_path_factory.mktemp("llama_tok")
    save_hf_tokenizer(llama_tokenizer, d)
    return AutoTokenizer.from_pretrained(d)


def test_encode_matches_hand_tokenized_recipe_example(llama_hf_tokenizer, llama_tokenizer):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer))
    rec = {"instruction": "把下面的句子翻译成英文。", "input": "茶叶在山上手工采摘。",
           "output": "Tea is picked by hand in the hills."}
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n\n### Instruction:\n把下面的句子翻译成英文。\n茶叶在山上手工采摘。"
              "\n\n### Response: ")
    source = [1] + sp.encode(prompt)
    target = sp.encode("Tea is picked by hand in the hills.") + [2]
    assert sp.id_to_piece(source[-1]) == "▁"            # the trailing space survives
    got = sft.encode(rec, llama_hf_tokenizer, RECIPE_TEMPLATE, 512)
    assert got["input_ids"] == source + target
    assert got["labels"] == [-100] * len(source) + target
    assert got["input_ids"][-1] == 2 and got["labels"][-1] == 2      # EOS appended and supervised
    # no input: the instruction alone, no extra newline
    got = sft.encode({**rec, "input": ""}, llama_hf_tokenizer, RECIPE_TEMPLATE, 512)
    source_no_input = [1] + sp.encode(prompt.replace("\n茶叶在山上手工采摘。", ""))
    assert got["input_ids"] == source_no_input + target
    assert got["labels"] == [-100] * len(source_no_input) + target
    # truncation cuts the target from the end (the recipe: EOS may be lost)
    got = sft.encode(rec, llama_hf_tokenizer, RECIPE_TEMPLATE, len(source) + 3)
    assert got["input_ids"] == source + target[:3] and got["labels"] == [-100] * len(source) + target[:3]


# Chinese-LLaMA-Alpaca-3 scripts/training/build_dataset.py, written out here on purpose:
# system_format.format(content=DEFAULT_SYSTEM_PROMPT) + user_format.
LLAMA3_RECIPE_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. 你是一个乐于助人的助手。"
    "<|eot_id|>" + "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def llama3_tokenizers(tmp_path_factory):
    """(HF, Meta) tokenizers: the HF one as convert writes it for a Meta Llama 3 base download
    (steps/llama3.py on the tokenizer.model that llama-models ships), Meta's own tiktoken one."""
    from llama_models.llama3 import tokenizer as meta_tokenizer
    from transformers import AutoTokenizer

    from steps.llama3 import Conversion

    model_file = Path(meta_tokenizer.__file__).parent / "tokenizer.model"
    meta_dir = tmp_path_factory.mktemp("llama3_meta")
    (meta_dir / "tokenizer.model").symlink_to(model_file)
    out = tmp_path_factory.mktemp("llama3_hf_tok")
    Conversion(meta_dir).save_tokenizer(out)
    return AutoTokenizer.from_pretrained(out), meta_tokenizer.Tokenizer(model_file)


def _meta_chat_ids(meta, system: str, user: str, output: str) -> tuple[list[int], list[int]]:
    """(prompt, target) ids by Meta's chat_format.py: the dialog prompt up to the assistant
    header, then the output and <|eot_id|>."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    prompt = ChatFormat(meta).encode_dialog_prompt(
        [RawMessage(role="system", content=system), RawMessage(role="user", content=user)]).tokens
    return list(prompt), meta.encode(output, bos=False, eos=False) + [meta.special_tokens["<|eot_id|>"]]


@pytest.mark.parametrize("with_input", [True, False])
def test_llama3_chat_example_is_metas_chat_format(llama3_tokenizers, with_input):
    hf, meta = llama3_tokenizers
    assert sft.LLAMA3_CHAT_TEMPLATE == LLAMA3_RECIPE_TEMPLATE
    rec = {"instruction": "把下面的句子翻译成英文。", "input": "茶叶在山上手工采摘。" if with_input else "",
           "output": "Tea is picked by hand in the hills."}
    user = rec["instruction"] + ("\n" + rec["input"] if with_input else "")
    prompt, target = _meta_chat_ids(meta, "You are a helpful assistant. 你是一个乐于助人的助手。",
                                    user, rec["output"])
    eot = sft.eos_id(hf, "<|eot_id|>")
    assert eot == 128009 and hf.eos_token_id == 128001         # a base download's EOS is not it
    got = sft.encode(rec, hf, sft.LLAMA3_CHAT_TEMPLATE, 512, eot)
    assert got["input_ids"] == prompt + target
    assert got["input_ids"][0] == 128000 and got["input_ids"].count(128000) == 1   # BOS once
    assert got["labels"] == [-100] * len(prompt) + target
    assert got["labels"][-1] == 128009                              # the turn's end is learnt
    # the same template written with Meta's leading <|begin_of_text|>: still one BOS
    assert sft.encode(rec, hf, "<|begin_of_text|>" + sft.LLAMA3_CHAT_TEMPLATE, 512, eot) == got
    # as the chat template SFT saves with its tokenizer: a chat client's prompt is Meta's too
    chat = [{"role": "user", "content": user}]
    for template in (sft.LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>" + sft.LLAMA3_CHAT_TEMPLATE):
        hf.chat_template = sft.chat_template(template, bos=not sft._bos_in_text(template, hf))
        assert hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                      return_dict=False) == prompt


def test_eos_token_setting(llama3_tokenizers, llama_hf_tokenizer, tmp_path):
    hf, _ = llama3_tokenizers
    assert sft.eos_id(hf, None) == 128001 and sft.eos_id(llama_hf_tokenizer, None) == 2
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        sft.eos_id(hf, "<|im_end|>")
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        sft.eos_id(llama_hf_tokenizer, "<|eot_id|>")
    # build_examples appends the configured token after every output
    rec = {"instruction": "你好", "input": "", "output": "你好！"}
    (tmp_path / "one.json").write_text(json.dumps([rec] * 3, ensure_ascii=False))
    hf.pad_token = "<|end_of_text|>"
    cfg = sft.Config(prompt_template=sft.LLAMA3_CHAT_TEMPLATE, eos_token="<|eot_id|>")
    ds, _, _ = sft.build_examples([tmp_path / "one.json"], hf, cfg, tmp_path / "w", "sft.data")
    assert [r[-1] for r in ds["labels"]] == [128009] * 3
    # tokenized with another end token, the cached examples are not reused
    key = lambda c: sft.data_key(c, [tmp_path / "one.json"], [], hf, Path(hf.name_or_path))
    assert key(cfg) != key(cfg.model_copy(update={"eos_token": None}))
    # and so it does for a template that writes the BOS itself (one BOS, not two as before)
    assert key(cfg) != key(cfg.model_copy(update={"prompt_template": "<|begin_of_text|>" +
                                                  cfg.prompt_template}))


def test_collate_pads_with_pad_id_and_masks_labels():
    collate = sft.make_collate(pad_id=320)
    b = collate([{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
                 {"input_ids": [1, 9], "labels": [-100, 9]}])
    assert b["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 320, 320]]
    assert b["labels"].tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_bad_records_are_counted_by_reason(tiny_hf_model, tmp_path):
    recs = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
            {"instruction": "No output field", "input": ""},
            {"instruction": "Empty output", "input": "", "output": "   "},
            {"input": "no instruction", "output": "x"},
            {"instruction": "", "input": "", "output": "nothing asked"},
            {"instruction": "Fine too", "output": "Yes."}]               # missing input is ""
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok, _ = sft.load_tokenizer(tiny_hf_model, [], "[PAD]")
    cfg = sft.Config(max_bad_fraction=1.0, max_seq_length=512)
    ds, n, counts = sft.build_examples([tmp_path / "mixed.jsonl"], tok, cfg, tmp_path / "w", "sft.data")
    assert n == 6 and len(ds) == 2
    assert counts == {"missing_output": 1, "empty_output": 1, "missing_instruction": 1,
                      "empty_instruction": 1, "no_target_after_truncation": 0}
    with pytest.raises(ValueError, match=r"mixed.jsonl.*4 of 6 records are bad"):
        sft.build_examples([tmp_path / "mixed.jsonl"], tok, sft.Config(), tmp_path / "w2", "sft.data")
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(ValueError, match="broken.json is not Alpaca JSON"):
        sft.build_examples([tmp_path / "broken.json"], tok, cfg, tmp_path / "w3", "sft.data")


@pytest.mark.parametrize("name,n,n_input", [("alpaca_zh_demo.json", 1000, 139),
                                            ("Belle_open_source_1k.json", 1000, 0)])
def test_real_instruction_files_load_and_count(shared_data, tiny_hf_model, tmp_path, name, n, n_input):
    """A JSON array and a JSON Lines file (despite .json) both load; every record is counted."""
    tok, _ = sft.load_tokenizer(tiny_hf_model, [], "[PAD]")
    cfg = sft.Config(max_seq_length=4096, max_bad_fraction=0.5)
    ds, records, counts = sft.build_examples([shared_data / "instructions" / name], tok, cfg,
                                             tmp_path, "sft.data")
    assert records == n
    assert len(ds) + sum(counts.values()) == n
    raw = [json.loads(l) for l in open(shared_data / "instructions" / name, encoding="utf-8")] \
        if name.startswith("Belle") else json.load(open(shared_data / "instructions" / name))
    assert sum(1 for r in raw if r.get("input")) == n_input
    expected_bad = sum(1 for r in raw if sft.record_problem(r))
    assert sum(v for k, v in counts.items() if k != "no_target_after_truncation") == expected_bad


def test_packing_keeps_every_token(tiny_hf_model, tmp_path):
    tok, _ = sft.load_tokenizer(tiny_hf_model, [], "[PAD]")
    cfg = sft.Config(max_seq_length=512, max_bad_fraction=0.2)
    plain, _, _ = sft.build_examples([DEMO_DATA / "instructions.json"], tok, cfg, tmp_path / "a", "d")
    packed, _, _ = sft.build_examples([DEMO_DATA / "instructions.json"], tok,
                                      cfg.model_copy(update={"packing": True}), tmp_path / "b", "d")
    assert len(packed) < len(plain)
    assert all(len(r) <= 512 for r in packed["input_ids"])
    assert [t for r in packed["input_ids"] for t in r] == [t for r in plain["input_ids"] for t in r]
    assert [t for r in packed["labels"] for t in r] == [t for r in plain["labels"] for t in r]
    # position ids restart at every example
    starts = [p for r in packed["position_ids"] for p in r].count(0)
    assert starts == len(plain) and all(len(p) == len(r) for p, r in
                                        zip(packed["position_ids"], packed["input_ids"]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_example_is_computed_as_it_is_alone(tiny_hf_model, tmp_path, attn):
    """Two packed rows in one micro-batch (collated into one row): every example's logits,
    hence its loss and gradients, equal those of the example run alone; without the position
    ids (the earlier packing) the later examples saw the ones before them."""
    from transformers import AutoModelForCausalLM

    tok, _ = sft.load_tokenizer(tiny_hf_model, [], "[PAD]")
    cfg = sft.Config(max_seq_length=512, max_bad_fraction=0.2)
    plain, _, _ = sft.build_examples([DEMO_DATA / "instructions.json"], tok, cfg, tmp_path / "a", "d")
    examples = [plain[i] for i in range(6)]
    batch_rows = sft._pack({"input_ids": [e["input_ids"] for e in examples[:4]],
                            "labels": [e["labels"] for e in examples[:4]]}, 10_000)
    short = sft._pack({"input_ids": [e["input_ids"] for e in examples[4:6]],
                       "labels": [e["labels"] for e in examples[4:6]]}, 10_000)
    rows = [{k: v[0] for k, v in batch_rows.items()}, {k: v[0] for k, v in short.items()}]
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))
    # as training has it (add_lora): without a KV cache transformers reads the packing from the
    # position ids
    model.config.use_cache = False
    collate = sft.make_collate(tok.pad_token_id)
    batch = collate(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert batch["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows)   # no padding
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        leaky = model(input_ids=batch["input_ids"],
                      attention_mask=(batch["position_ids"] >= 0).long()).logits
        worst, leak = 0.0, 0.0
        at = 0
        for e in examples:
            k = len(e["input_ids"])
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            worst = max(worst, float((packed[0, at:at + k] - alone).abs().max()))
            if at:
                leak = max(leak, float((leaky[0, at:at + k] - alone).abs().max()))
            at += k
    assert worst < 1e-5 and leak > 1e-2, (worst, leak)
    # and the loss over the packed batch is the token-weighted mean of the examples' own losses
    with torch.no_grad():
        loss = float(model(**batch).loss)
        sums, n = 0.0, 0
        for e in examples:
            lab = torch.tensor([e["labels"]])
            k = int((lab[:, 1:] != -100).sum())
            sums += float(model(input_ids=torch.tensor([e["input_ids"]]), labels=lab).loss) * k
            n += k
    assert abs(loss - sums / n) < 1e-5


@pytest.fixture(scope="module")
def pt_adapter(tiny_hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt_for_sft")
    cfg = pretrain.Config(data=[str(DEMO_DATA / "corpus_en.txt")], block_size=64, max_steps=2,
                          per_device_batch_size=2, gradient_accumulation_steps=1,
                          validation_split=0.0, eval_every=0, save_every=0, learning_rate=1e-2)
    pretrain.run(cfg, out, model=tiny_hf_model)
    return out


def test_sft_on_top_of_pt_adapter(tiny_hf_model, pt_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from steps.digests import adapter_digest
    cfg = sft.Config(data=[str(DEMO_DATA / "instructions.json")], max_seq_length=384,
                     per_device_batch_size=4, gradient_accumulation_steps=1, max_steps=12,
                     learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant",
                     validation_split=0.2, eval_every=6, log_every=1, save_every=0)
    out = tmp_path / "sft"
    s = sft.run(cfg, out, model=tiny_hf_model, adapters=[pt_adapter])
    assert (s["records"], s["bad_records"], s["bad_empty_output"], s["bad_empty_instruction"]) == (22, 2, 1, 1)
    assert (s["train_examples"], s["eval_examples"]) == (16, 4)
    assert s["train_loss"] < 0.8 * s["first_train_loss"]
    evals = [json.loads(l)["eval_loss"] for l in (out / "trainer_log.jsonl").read_text().splitlines()
             if "eval_loss" in l]
    assert len(evals) == 2 and evals[1] < evals[0]
    # [PAD] added: 321 rows in the adapter's embeddings and tokenizer (v1's 49953 -> 49954)
    assert tokenizer_size(out)[0] == 321 and check_adapter(out, 320) == 321
    # ... written so llama.cpp's converter reads [PAD] (added_tokens.json) and 4.x loads it
    assert json.loads((out / "added_tokens.json").read_text()) == {"[PAD]": 320}
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    # ... and carries the SFT prompt as its chat template: a chat message gives the ids SFT
    # trained on, BOS first
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    rec = {"instruction": "介绍一下北京", "input": ""}
    chat_ids = tok.apply_chat_template([{"role": "user", "content": rec["instruction"]}],
                                       tokenize=True, add_generation_prompt=True,
                                       return_dict=False)
    trained = sft.encode({**rec, "output": "x"}, tok, cfg.prompt_template, 384)
    assert chat_ids == trained["input_ids"][:len(chat_ids)] and chat_ids[0] == tok.bos_token_id
    assert trained["labels"][len(chat_ids) - 1] == -100 and trained["labels"][len(chat_ids)] != -100
    info = json.loads((out / "training_info.json").read_text())
    assert info["adapters_applied"][0]["digest"] == adapter_digest(pt_adapter)
    # the merge order of the recipe reproduces training: base + pt merged, resized, + sft
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, pt_adapter).merge_and_unload()
    merged.resize_token_embeddings(321)
    ids = torch.tensor([[1, 45, 67, 89, 120, 200]])
    with torch.no_grad():
        ref = merged(ids).logits
        got = PeftModel.from_pretrained(merged, out)(ids).logits
    assert got.shape[-1] == 321 and (got - ref).abs().max() > 1e-3


def test_sft_bad_inputs(tiny_hf_model, tmp_path):
    with pytest.raises(ValueError, match="must contain '{instruction}'"):
        sft.run(sft.Config(data=[str(DEMO_DATA / "instructions.json")], prompt_template="Q: {q}"),
                tmp_path / "o", model=tiny_hf_model)
    with pytest.raises(ValueError, match="suffix"):
        sft.run(sft.Config(data=[str(DEMO_DATA / "corpus_en.txt")]), tmp_path / "o", model=tiny_hf_model)
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        sft.run(sft.Config(data=[str(DEMO_DATA / "instructions.json")]), tmp_path / "o",
                model=tiny_hf_model, adapters=[tmp_path])
