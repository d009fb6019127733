"""The pretrain stage on a CUDA GPU, end to end (marker gpu; skipped without CUDA): precision
auto = bf16, one process (DDP path, autocast) and FSDP2 under torchrun over NCCL (the base is
loaded on the CPU and each rank's shards are moved to its GPU as they are made); the FSDP run's
checkpoint resumes; the adapters load with peft."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from steps import pretrain
from tests.tiny import DEMO_DATA

pytestmark = pytest.mark.gpu


def _cfg(**kw) -> pretrain.Config:
    base = dict(data=[str(DEMO_DATA / "corpus_en.txt")], block_size=64, max_steps=4,
                per_device_batch_size=2, gradient_accumulation_steps=2, log_every=1,
                eval_every=2, save_every=2, validation_split=0.1, learning_rate=1e-2, seed=1,
                lora={"dropout": 0.0})
    base.update(kw)
    return pretrain.Config(**base)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_pretrain_on_gpu_single_process_and_fsdp(tiny_hf_model, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    single = pretrain.run(_cfg(), tmp_path / "single", model=tiny_hf_model)
    assert single["precision"] == "bf16"
    fsdp_launcher = {"nproc": 1, "backend": "nccl", "strategy": "fsdp", "timeout_s": 300}
    fsdp = pretrain.run(_cfg(launcher=fsdp_launcher), tmp_path / "fsdp", model=tiny_hf_model,
                        resume_dir=tmp_path / "resume")
    assert fsdp["precision"] == "bf16" and fsdp["world_size"] == 1

    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == torch.float32 for k in a)
    # the same training up to bf16 rounding: FSDP casts the parameters to bf16 for the forward,
    # autocast casts per op; both train fp32 masters
    assert fsdp["train_loss"] == pytest.approx(single["train_loss"], rel=2e-2)
    assert fsdp["eval_loss"] == pytest.approx(single["eval_loss"], rel=2e-2)
    assert max(_rel(b[k], a[k]) for k in a if "lora_B" in k) < 0.1
    assert fsdp["train_loss"] < fsdp["first_train_loss"]

    # resume from the step-2 checkpoint (gathered on save, re-sharded onto the GPU on load)
    again = pretrain.run(_cfg(launcher=fsdp_launcher), tmp_path / "again", model=tiny_hf_model,
                         resume_dir=tmp_path / "resume")
    assert again["resumed_from_step"] == 2
    c = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    # GPU kernels (embedding backward's atomics) are not bit-deterministic: close, not equal
    assert max(_rel(c[k], b[k]) for k in b) < 1e-2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    for out in ("single", "fsdp"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf_model),
                                          tmp_path / out)
        assert model.get_input_embeddings().weight.shape[0] == a[
            "base_model.model.model.embed_tokens.weight"].shape[0]
