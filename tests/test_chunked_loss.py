"""loss_chunk_size: the loss without the full logits gives transformers' loss and gradients
(fp32, the tiny model with the recipe's LoRA: embed_tokens/lm_head trained in full), and the
pretrain and SFT stages train the same adapters with it."""
from __future__ import annotations

import copy

import pytest
import torch

from steps.train.chunked_loss import chunked_causal_lm_loss, use_chunked_loss
from steps.train.config import LoraSettings, result_settings
from steps.train.model import add_lora


@pytest.fixture(scope="module")
def peft_model(tiny_hf_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    model = add_lora(base, LoraSettings(dropout=0.0))
    # non-zero B, so every LoRA pair gets a gradient through both factors
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    labels = ids.clone()
    labels[0, :17] = -100        # an SFT prompt: not supervised
    labels[2, 30:] = -100        # padding
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_same_loss_and_gradients_as_transformers(peft_model, chunk):
    batch = _batch(peft_model.config.vocab_size)
    ref_loss, ref = _loss_and_grads(peft_model, batch)
    chunked = copy.deepcopy(peft_model)
    use_chunked_loss(chunked, chunk)
    loss, got = _loss_and_grads(chunked, batch)
    assert abs(float(loss) - float(ref_loss)) < 1e-6 * float(ref_loss)
    assert got.keys() == ref.keys() and any("modules_to_save" in n for n in got)
    for n in ref:
        scale = float(ref[n].abs().max()) or 1.0
        assert float((got[n] - ref[n]).abs().max()) <= 1e-5 * scale, n
    # what it is for: no batch x seq x vocab logits come back
    assert chunked(**batch).logits is None
    # without labels the model is its own (generation, evaluation by logits)
    with torch.no_grad():
        assert torch.equal(chunked(input_ids=batch["input_ids"]).logits,
                           peft_model(input_ids=batch["input_ids"]).logits)


def test_no_supervised_token_is_a_zero_with_a_graph(peft_model):
    h = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    loss = chunked_causal_lm_loss(h, head, torch.full((2, 5), -100), 4)
    loss.backward()
    assert float(loss) == 0.0 and h.grad is not None


def test_pretrain_and_sft_train_the_same_adapters_with_it(tiny_hf_model, tmp_path):
    from safetensors.torch import load_file

    from steps import pretrain, sft
    from tests.tiny import DEMO_DATA

    common = dict(max_steps=3, eval_every=0, validation_split=0.0, save_every=0, log_every=1,
                  per_device_batch_size=2, gradient_accumulation_steps=1, lora={"dropout": 0.0},
                  learning_rate=1e-2)
    pt = pretrain.Config(data=[str(DEMO_DATA / "corpus_zh.txt")], block_size=64, **common)
    sf = sft.Config(data=[str(DEMO_DATA / "instructions.json")], max_seq_length=256, **common)
    for name, stage, cfg in (("pt", pretrain, pt), ("sft", sft, sf)):
        stage.run(cfg, tmp_path / f"{name}-plain", model=tiny_hf_model)
        stage.run(cfg.model_copy(update={"loss_chunk_size": 16}), tmp_path / f"{name}-chunked",
                  model=tiny_hf_model)
        a = load_file(str(tmp_path / f"{name}-plain" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / f"{name}-chunked" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name


def test_off_leaves_the_cache_key_and_fingerprint_as_before():
    from steps import pretrain, sft

    assert "loss_chunk_size" not in result_settings(pretrain.Config())
    assert result_settings(pretrain.Config(loss_chunk_size=8))["loss_chunk_size"] == 8
    for stage in (pretrain, sft):
        assert stage.CACHE_OMIT_AT_DEFAULT == {"loss_chunk_size": 0}
