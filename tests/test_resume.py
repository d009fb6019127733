"""A training run SIGKILLed mid-way resumes from its last checkpoint and ends bit-identical to an
uninterrupted run (CPU, fp32, LoRA dropout on, gradient accumulation); docs/recipe.md, "Training
must resume where it stopped"."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steps import pretrain
from tests.tiny import DEMO_DATA

REPO = Path(__file__).resolve().parents[1]

# Runs the stage and SIGKILLs itself from inside the metrics callback once step 7 is logged:
# checkpoints exist for steps 3 and 6, so the resumed run must redo step 7 onwards.
DRIVER = """
import os, signal, sys
from pathlib import Path
from steps import pretrain

def on_metrics(values, step):
    if step == 7 and "loss" in values:
        os.kill(os.getpid(), signal.SIGKILL)

cfg = pretrain.Config.model_validate_json(sys.argv[1])
pretrain.run(cfg, Path(sys.argv[2]), model=Path(sys.argv[3]), resume_dir=Path(sys.argv[4]),
             on_metrics=on_metrics)
"""


def _cfg() -> pretrain.Config:
    return pretrain.Config(data=[str(DEMO_DATA / "corpus_en.txt")], block_size=64,
                           per_device_batch_size=2, gradient_accumulation_steps=2, max_steps=10,
                           log_every=1, eval_every=4, save_every=3, save_total_limit=2,
                           validation_split=0.1, learning_rate=5e-3, seed=3)


def _log(out: Path) -> list[dict]:
    recs = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("tokens_per_s", None)       # wall-clock, the only field allowed to differ
    return recs


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_run(tiny_hf_model, tmp_path):
    cfg = _cfg()
    ref_out = tmp_path / "ref"
    ref = pretrain.run(cfg, ref_out, model=tiny_hf_model, resume_dir=tmp_path / "ref_ckpt")
    assert ref["resumed_from_step"] == 0

    ckpt, killed_out = tmp_path / "ckpt", tmp_path / "killed"
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), cfg.model_dump_json(),
                           str(killed_out), str(tiny_hf_model), str(ckpt)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000003", "step-00000006"]
    assert not (killed_out / "adapter_model.safetensors").exists()
    assert max(r["step"] for r in _log(killed_out)) == 7

    resumed_out = tmp_path / "resumed"
    res = pretrain.run(cfg, resumed_out, model=tiny_hf_model, resume_dir=ckpt)
    assert res["resumed_from_step"] == 6 and res["steps"] == 10

    # the adapter (LoRA A/B and the embed_tokens / lm_head copies) is bit-identical
    a = load_file(str(ref_out / "adapter_model.safetensors"))
    b = load_file(str(resumed_out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2 + 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    a_best = load_file(str(ref_out / "best" / "adapter_model.safetensors"))
    b_best = load_file(str(resumed_out / "best" / "adapter_model.safetensors"))
    assert all(torch.equal(a_best[k], b_best[k]) for k in a_best)
    # and so is the whole curve: steps 1-6 restored from the checkpoint, 7-10 recomputed
    ref_log, res_log = _log(ref_out), _log(resumed_out)
    assert [r["step"] for r in res_log if "loss" in r] == list(range(1, 11))
    assert res_log == ref_log
    assert ref["train_loss"] == res["train_loss"] and ref["eval_loss"] == res["eval_loss"]
    # the lost step 7 of the killed run was the same step too (same data position and RNG)
    assert [r for r in _log(killed_out) if r["step"] == 7] == [r for r in ref_log if r["step"] == 7]


def test_resume_dir_of_another_config_is_refused(tiny_hf_model, tmp_path):
    cfg = _cfg().model_copy(update={"max_steps": 4})
    pretrain.run(cfg, tmp_path / "a", model=tiny_hf_model, resume_dir=tmp_path / "ckpt")
    with pytest.raises(ValueError, match="another config"):
        pretrain.run(cfg.model_copy(update={"learning_rate": 1e-3}), tmp_path / "b",
                     model=tiny_hf_model, resume_dir=tmp_path / "ckpt")


class _Crash(RuntimeError):
    pass


def test_crash_and_resume_in_process_equals_uninterrupted_run(tiny_hf_model, tmp_path):
    """The fast variant (not slow): an exception at step 5, resume from the step-4 checkpoint."""
    cfg = _cfg().model_copy(update={"max_steps": 6, "save_every": 2, "eval_every": 3})
    pretrain.run(cfg, tmp_path / "ref", model=tiny_hf_model)

    def crash(values, step):
        if step == 5 and "loss" in values:
            raise _Crash()
    with pytest.raises(_Crash):
        pretrain.run(cfg, tmp_path / "crashed", model=tiny_hf_model, resume_dir=tmp_path / "ckpt",
                     on_metrics=crash)
    res = pretrain.run(cfg, tmp_path / "resumed", model=tiny_hf_model, resume_dir=tmp_path / "ckpt")
    assert res["resumed_from_step"] == 4
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(tmp_path / "ref") == _log(tmp_path / "resumed")
