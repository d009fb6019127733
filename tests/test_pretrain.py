"""pretrain stage: data preprocessing (BOS per line, group_texts, formats, cache), training
numbers (overfit, logged metrics), the adapter (loads, changes logits, full-vocab embeddings)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steps import pretrain
from steps.digests import base_digest
from tests.tiny import DEMO_DATA


def _cfg(**kw) -> pretrain.Config:
    base = dict(data=[str(DEMO_DATA / "corpus_en.txt")], block_size=64, per_device_batch_size=2,
                gradient_accumulation_steps=1, max_steps=4, log_every=1, eval_every=2,
                save_every=0, validation_split=0.1, seed=0)
    base.update(kw)
    return pretrain.Config(**base)


@pytest.fixture(scope="module")
def trained(tiny_hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt_out")
    seen = []
    summary = pretrain.run(_cfg(), out, model=tiny_hf_model,
                           on_metrics=lambda d, s: seen.append((s, dict(d))))
    return out, summary, seen


def _sp_blocks(sp_model: Path, lines: list[str], block: int) -> list[list[int]]:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = [t for line in lines for t in [1] + sp.encode(line)]
    return [ids[i:i + block] for i in range(0, len(ids) // block * block, block)]


def test_blocks_are_bos_per_line_concatenated_and_cut(tiny_hf_model, tmp_path):
    from transformers import AutoTokenizer
    lines = (DEMO_DATA / "corpus_en.txt").read_text(encoding="utf-8").splitlines()
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    blocks = pretrain.build_blocks([DEMO_DATA / "corpus_en.txt"], tok, 32, "text", tmp_path)
    expected = _sp_blocks(tiny_hf_model / "tokenizer.model", lines, 32)
    assert len(expected) > 20
    assert blocks["input_ids"] == expected     # independent reference: raw sentencepiece + BOS


def test_blocks_do_not_depend_on_the_number_of_tokenizer_processes(tiny_hf_model, tmp_path):
    """A corpus of several GROUP_BATCH batches, cut by 1, 2 and 3 worker processes: the same
    blocks, and those of SentencePiece with the recipe's per-batch remainder dropped."""
    from transformers import AutoTokenizer

    lines = (DEMO_DATA / "corpus_en.txt").read_text(encoding="utf-8").splitlines()
    lines = (lines * (-(-2600 // len(lines))))[:2600]     # 3 batches, the last one short
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    expected = [b for i in range(0, len(lines), pretrain.GROUP_BATCH)
                for b in _sp_blocks(tiny_hf_model / "tokenizer.model",
                                    lines[i:i + pretrain.GROUP_BATCH], 32)]
    for workers in (1, 2, 3):
        blocks = pretrain.build_blocks([corpus], tok, 32, "text", tmp_path / f"w{workers}",
                                       num_proc=workers)
        assert blocks["input_ids"] == expected, workers


def test_jsonl_and_parquet_give_the_same_blocks(tiny_hf_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer
    lines = (DEMO_DATA / "corpus_en.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"content": l}) + "\n" for l in lines))
    pq.write_table(pa.table({"content": lines}), tmp_path / "c.parquet")
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    a = pretrain.build_blocks([tmp_path / "c.jsonl"], tok, 32, "content", tmp_path / "w1")
    b = pretrain.build_blocks([tmp_path / "c.parquet"], tok, 32, "content", tmp_path / "w2")
    assert a["input_ids"] == b["input_ids"] == _sp_blocks(tiny_hf_model / "tokenizer.model", lines, 32)
    with pytest.raises(ValueError, match="c.jsonl.*'text' column"):
        pretrain.build_blocks([tmp_path / "c.jsonl"], tok, 32, "text", tmp_path / "w3")


def test_real_chinese_corpus_tokenizes_like_sentencepiece(shared_data, llama_tokenizer, tmp_path):
    """CLUECorpusSmall lines through the HF tokenizer built from Meta's tokenizer.model give the
    same ids as sentencepiece itself (BOS per line, byte fallback for CJK)."""
    from transformers import AutoTokenizer
    from steps.tokenizer import save_hf_tokenizer
    save_hf_tokenizer(llama_tokenizer, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    with open(shared_data / "corpora" / "CLUECorpusSmall_sampled.txt", encoding="utf-8") as f:
        lines = [next(f).rstrip("\n") for _ in range(40)]
    (tmp_path / "clue40.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    blocks = pretrain.build_blocks([tmp_path / "clue40.txt"], tok, 512, "text", tmp_path / "w")
    expected = _sp_blocks(llama_tokenizer, lines, 512)
    assert len(blocks) == len(expected) > 10
    assert blocks["input_ids"] == expected


def test_run_logs_metrics_and_writes_a_loadable_adapter(trained, tiny_hf_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from steps.checks import check_adapter, tokenizer_size
    out, summary, seen = trained
    assert summary["steps"] == 4 and summary["world_size"] == 1
    assert summary["train_blocks"] + summary["eval_blocks"] == 44 and summary["eval_blocks"] == 5
    train_steps = [s for s, d in seen if "loss" in d]
    assert train_steps == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= d.keys() for s, d in seen if "loss" in d)
    assert [s for s, d in seen if "eval_loss" in d] == [2, 4]
    ev = [d for s, d in seen if "eval_loss" in d][-1]
    assert ev["eval_ppl"] == pytest.approx(torch.exp(torch.tensor(ev["eval_loss"])).item(), rel=1e-6)
    # warmup: ceil(0.05*4) = 1 step at lr 0, then cosine from 2e-4
    lrs = [d["lr"] for s, d in seen if "loss" in d]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(2e-4) and lrs[2] < lrs[1]
    # the JSONL log holds the same records (the report stage plots it)
    records = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [(r.pop("step"), r) for r in records] == seen

    base = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    ids = torch.tensor([[1, 45, 67, 89, 120, 200]])
    with torch.no_grad():
        ref = base(ids).logits
        peft = PeftModel.from_pretrained(base, out)
        got = peft(ids).logits
    assert (got - ref).abs().max() > 1e-4
    # modules_to_save: full embed_tokens / lm_head copies with one row per token
    from safetensors import safe_open
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as st:
        shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}
    emb = [s for k, s in shapes.items() if "embed_tokens" in k and "lora" not in k]
    head = [s for k, s in shapes.items() if "lm_head" in k and "lora" not in k]
    assert emb and head and emb[0][0] == head[0][0] == tokenizer_size(out)[0] == 320
    assert check_adapter(out, 320) == 320
    assert sum("lora_A" in k for k in shapes) == 2 * 7          # 2 layers x 7 projections
    info = json.loads((out / "training_info.json").read_text())
    assert info["base_digest"] == base_digest(tiny_hf_model) and info["stage"] == "pretrain"
    assert (out / "best" / "adapter_config.json").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 32, 0.05)
    assert sorted(cfg["modules_to_save"]) == ["embed_tokens", "lm_head"]


def test_loss_decreases_when_overfitting_a_fixed_batch(tiny_hf_model, tmp_path):
    # 2 blocks, batch 2: every step sees the same batch; LoRA + full embeddings must fit it
    (tmp_path / "two.txt").write_text((DEMO_DATA / "corpus_en.txt").read_text()[:180])
    cfg = _cfg(data=[str(tmp_path / "two.txt")], validation_split=0.0, max_steps=20,
               learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
               log_every=1, eval_every=0)
    summary = pretrain.run(cfg, tmp_path / "out", model=tiny_hf_model)
    assert summary["train_blocks"] == 2
    assert summary["first_train_loss"] > 5.5                       # ~ln(320) at random init
    assert summary["train_loss"] < 0.5 * summary["first_train_loss"]


def test_plain_entry_point_takes_a_dict_config_and_a_data_path(tiny_hf_model, tmp_path):
    """pretrain.train: the notebook-style call; `data` replaces the config's data."""
    cfg = _cfg(data=["/nonexistent.txt"], max_steps=2, eval_every=0).model_dump()
    out = pretrain.train(cfg, tiny_hf_model, DEMO_DATA / "corpus_en.txt", tmp_path / "a")
    summary = json.loads((out / "training_summary.json").read_text())
    # it trained on the given path (the config's own data does not exist)
    assert summary["steps"] == 2 and (out / "adapter_model.safetensors").is_file()


def test_tokenized_data_is_cached_and_keyed(tiny_hf_model, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(max_steps=1, eval_every=0)
    s1 = pretrain.run(cfg, tmp_path / "o1", model=tiny_hf_model, data_cache_dir=cache)
    s2 = pretrain.run(cfg, tmp_path / "o2", model=tiny_hf_model, data_cache_dir=cache)
    assert (s1["data_cache_hit"], s2["data_cache_hit"]) == (0, 1)
    assert s1["train_loss"] == s2["train_loss"]
    k1, _ = pretrain.data_key(cfg, tiny_hf_model)
    assert pretrain.data_key(cfg.model_copy(update={"block_size": 32}), tiny_hf_model)[0] != k1
    # another tokenizer (same files but one more token) is another key
    other = tmp_path / "tok2"
    other.mkdir()
    for f in tiny_hf_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "config.json":
            (other / f.name).write_bytes(f.read_bytes())
    j = json.loads((other / "tokenizer.json").read_text())
    j["added_tokens"].append({**j["added_tokens"][0], "id": 320, "content": "[PAD]"})
    (other / "tokenizer.json").write_text(json.dumps(j))
    assert pretrain.data_key(cfg, other)[0] != k1
    assert len(list(cache.iterdir())) == 1


def test_bad_inputs_fail_before_training(tiny_hf_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        pretrain.run(_cfg(data=[str(tmp_path / "nope.txt")]), tmp_path / "o", model=tiny_hf_model)
    with pytest.raises(ValueError, match="data is empty"):
        pretrain.run(_cfg(data=[]), tmp_path / "o", model=tiny_hf_model)
    (tmp_path / "short.txt").write_text("tea\n")
    with pytest.raises(ValueError, match="no full block of 64 tokens"):
        pretrain.run(_cfg(data=[str(tmp_path / "short.txt")]), tmp_path / "o", model=tiny_hf_model)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        pretrain.run(_cfg(per_device_batch_size=64), tmp_path / "o", model=tiny_hf_model)
    with pytest.raises(Exception, match="extra"):
        pretrain.Config(lerning_rate=1.0)


def test_conf_defaults_mirror_the_configs(tmp_path):
    """conf/pretrain, conf/sft (with their launcher default) compose into exactly Config()."""
    import shutil
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from steps import sft
    conf = Path(__file__).resolve().parents[1] / "conf"
    for g in ("pretrain", "sft", "launcher"):
        shutil.copytree(conf / g, tmp_path / g)
    (tmp_path / "config.yaml").write_text("defaults:\n  - pretrain: default\n  - sft: default\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        c = OmegaConf.to_container(compose("config"), resolve=True)
        ddp = OmegaConf.to_container(compose("config", overrides=[
            "launcher@pretrain.launcher=ddp_cpu", "pretrain.lora.r=64"]), resolve=True)
    assert pretrain.Config.model_validate(c["pretrain"]) == pretrain.Config()
    assert sft.Config.model_validate(c["sft"]) == sft.Config()
    p = pretrain.Config.model_validate(ddp["pretrain"])
    assert (p.launcher.nproc, p.launcher.backend, p.lora.r) == (2, "gloo", 64)


def test_gradient_checkpointing_gives_the_same_adapter(tiny_hf_model, tmp_path):
    from safetensors.torch import load_file
    cfg = _cfg(max_steps=2, eval_every=0, validation_split=0.0, lora={"dropout": 0.0})
    pretrain.run(cfg, tmp_path / "a", model=tiny_hf_model)
    pretrain.run(cfg.model_copy(update={"gradient_checkpointing": True}), tmp_path / "b",
                 model=tiny_hf_model)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any("lora_B" in k and (a[k] != 0).any() for k in a)


def test_data_cache_keeps_the_first_complete_copy_and_clears_dead_temps(tmp_path):
    """Two runs on the same data share its cache key: a copy made while another run may be
    reading the first is dropped, not swapped in under the reader; a killed prep's temp dir goes."""
    from datasets import Dataset

    from steps.train.data import save_splits

    dest = tmp_path / "pt-key"
    save_splits({"train": Dataset.from_dict({"input_ids": [[1, 2, 3]]})}, dest, {"n": 1})
    first = (dest / "train").stat().st_ino
    dead = tmp_path / "pt-key.tmp-4194302"          # beyond the default pid_max: never alive
    dead.mkdir()
    save_splits({"train": Dataset.from_dict({"input_ids": [[1, 2, 3]]})}, dest, {"n": 1})
    assert (dest / "train").stat().st_ino == first and (dest / "COMPLETE").is_file()
    assert not dead.exists() and not list(tmp_path.glob("pt-key.tmp-*"))
