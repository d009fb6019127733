"""Multi-process training: torchrun (2 CPU ranks, gloo) as a subprocess, and the launcher's
process-group handling (timeout and failure kill every descendant, output streamed)."""
from __future__ import annotations

import logging
import os
import sys
import time

import pytest
from safetensors.torch import load_file

from steps import pretrain
from steps.train.launch import LaunchError, launch
from tests.tiny import DEMO_DATA


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_launch_streams_output_and_raises_on_failure(caplog):
    lg = logging.getLogger("test.launch")
    with caplog.at_level(logging.INFO, logger="test.launch"):
        with pytest.raises(LaunchError, match="(?s)exited with code 3.*boom"):
            launch([sys.executable, "-c", "print('hello', flush=True); print('boom'); exit(3)"],
                   logger=lg)
    assert "hello" in caplog.messages and "boom" in caplog.messages


def test_launch_timeout_kills_the_whole_process_group(tmp_path):
    # the child starts a grandchild (as torchrun starts ranks) and hangs
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '120']); "
            "print(p.pid, flush=True); time.sleep(120)")
    pids = []
    lg = logging.getLogger("test.launch.timeout")
    handler = logging.Handler()
    handler.emit = lambda rec: pids.append(rec.getMessage())
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    t = time.monotonic()
    with pytest.raises(LaunchError, match="timed out"):
        launch([sys.executable, "-c", code], timeout_s=3, logger=lg)
    assert time.monotonic() - t < 30
    grandchild = int([m for m in pids if m.strip().isdigit()][0])
    time.sleep(0.5)
    assert not _alive(grandchild)


def _cfg(**kw) -> pretrain.Config:
    base = dict(data=[str(DEMO_DATA / "corpus_en.txt")], block_size=64, max_steps=3,
                gradient_accumulation_steps=2, log_every=1, eval_every=3, save_every=0,
                validation_split=0.1, learning_rate=1e-2, seed=1,
                lora={"dropout": 0.0})           # dropout off: ranks' RNG streams differ
    base.update(kw)
    return pretrain.Config(**base)


@pytest.mark.slow
def test_two_ranks_gloo_equal_one_process_with_twice_the_batch(tiny_hf_model, tmp_path, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="steps.pretrain"):
        ddp = pretrain.run(_cfg(per_device_batch_size=1, launcher={"nproc": 2, "backend": "gloo",
                                                                   "timeout_s": 600}),
                           tmp_path / "ddp", model=tiny_hf_model,
                           on_metrics=lambda d, s: seen.append((s, d)))
    single = pretrain.run(_cfg(per_device_batch_size=2), tmp_path / "one", model=tiny_hf_model)

    assert ddp["world_size"] == 2
    # both ranks trained on their own half of every global batch: 3 steps x 2 micro x 1 x 64
    assert ddp["tokens_rank0"] == ddp["tokens_rank1"] == 3 * 2 * 64
    assert any(m.startswith("[rank 1]") for m in caplog.messages)
    assert any("rank 1/2" in m for m in caplog.messages)
    # the parent forwarded rank 0's metrics while the subprocess ran
    assert [s for s, d in seen if "loss" in d] == [1, 2, 3] and any("eval_loss" in d for s, d in seen)
    # same samples, gradients all-reduced: the same adapter as one process with batch 2
    a = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any((a[k] != 0).any() and "lora_B" in k for k in a)     # B left zero-init = no training
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_two_ranks_match_ddp_and_resume_exactly(tiny_hf_model, tmp_path):
    """launcher.strategy=fsdp (FSDP2, 2 CPU ranks): the same adapter as DDP, and a checkpoint
    (gathered trainable tensors + optimizer state, re-sharded on load) resumes bit-exactly."""
    fsdp = {"nproc": 2, "backend": "gloo", "strategy": "fsdp", "timeout_s": 600}
    cfg = dict(per_device_batch_size=1, max_steps=4, eval_every=2, save_every=2)
    a_sum = pretrain.run(_cfg(**cfg, launcher=fsdp), tmp_path / "fsdp", model=tiny_hf_model,
                         resume_dir=tmp_path / "resume")
    d_sum = pretrain.run(_cfg(**cfg, launcher={**fsdp, "strategy": "ddp"}), tmp_path / "ddp",
                         model=tiny_hf_model)
    a = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    d = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert a.keys() == d.keys()
    # whole tensors (gathered from the shards), not rank 0's half
    emb = [k for k in a if "embed_tokens" in k]
    assert emb and all(a[k].shape == d[k].shape for k in a)
    assert max((a[k] - d[k]).abs().max().item() for k in a) < 1e-5
    assert any("lora_B" in k and (a[k] != 0).any() for k in a)
    assert a_sum["eval_loss"] == pytest.approx(d_sum["eval_loss"], rel=1e-5)
    assert (tmp_path / "fsdp" / "best" / "adapter_model.safetensors").is_file()

    # the step-2 checkpoint is still in resume/: a rerun continues from it, to the same adapter
    again = pretrain.run(_cfg(**cfg, launcher=fsdp), tmp_path / "again", model=tiny_hf_model,
                         resume_dir=tmp_path / "resume")
    assert again["resumed_from_step"] == 2
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(bool((a[k] == b[k]).all()) for k in a)

    # a checkpoint is specific to its strategy: DDP refuses the FSDP one
    from steps.train.launch import LaunchError
    with pytest.raises(LaunchError, match="launcher strategy"):
        pretrain.run(_cfg(**cfg, launcher={**fsdp, "strategy": "ddp"}), tmp_path / "x",
                     model=tiny_hf_model, resume_dir=tmp_path / "resume")


def test_fsdp_refuses_fp16_before_any_work():
    with pytest.raises(ValueError, match="launcher.strategy=fsdp trains in bf16 or fp32"):
        _cfg(precision="fp16", launcher={"nproc": 2, "strategy": "fsdp"})
