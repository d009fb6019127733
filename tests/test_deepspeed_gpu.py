"""conf/launcher/deepspeed/ds_zero{2,3}.json used the way they are meant to be used: accelerate's
DeepSpeedPlugin(hf_ds_config=<file>) fills the "auto" values, one process (world size 1), a tiny
random LLaMA wrapped with steps.train.model.add_lora (LoRA on the 7 projections, embed_tokens and
lm_head in modules_to_save), torch AdamW handed to accelerator.prepare (no DeepSpeed optimizer
section, so no compiled FusedAdam), a few steps overfitting one fixed batch.

What is checked (docs/recipe.md, "Sharded training must save whole embeddings"): the adapter
saved from `accelerator.get_state_dict(model)` holds the whole trained embed_tokens / lm_head
copies (under ZeRO-3 that needs `stage3_gather_16bit_weights_on_model_save`, which ds_zero3.json
sets), while ZeRO-3's plain `model.state_dict()` holds only empty placeholders for them.

Needs a CUDA device, deepspeed and accelerate; skipped with the reason otherwise. Each case trains
in a child process of its own (`python -m tests.test_deepspeed_gpu CASE DIR`: rank 0 of a world of
one, NCCL); the test checks what the child wrote to DIR.
"""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
DS_CONF = REPO / "conf" / "launcher" / "deepspeed"

VOCAB, HIDDEN = 512, 64
STEPS = 30              # fp16 dynamic loss scaling (initial 2^16) may skip a few of the first steps
LR = 1e-3
CHILD_TIMEOUT_S = 300    # per case; a healthy run takes well under a minute
# peft's names in adapter_model.safetensors (the ".modules_to_save.default" part is dropped there)
SAVED_EMBED = "base_model.model.model.embed_tokens.weight"
SAVED_LM_HEAD = "base_model.model.lm_head.weight"
# the live parameter names of the trainable copies in the PeftModel
LIVE_EMBED = "base_model.model.model.embed_tokens.modules_to_save.default.weight"
LIVE_LM_HEAD = "base_model.model.lm_head.modules_to_save.default.weight"

CASES = {
    # config file, mixed precision as the recipe runs it (ds_zero2.json has only an fp16 section)
    "zero2": ("ds_zero2.json", "fp16"),
    "zero3": ("ds_zero3.json", "bf16"),
}


def _skip_unless_ready() -> None:
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a project dependency
        pytest.skip(f"torch not importable: {e!r}")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False): this test runs "
                    "the DeepSpeed configs on a GPU")
    for mod in ("deepspeed", "accelerate", "peft", "transformers"):
        try:
            __import__(mod)
        except Exception as e:
            pytest.skip(f"{mod} not importable: {e!r} (deepspeed is not a project dependency; "
                        "install it, e.g. from wheels, to run this test)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_lora_model():
    """A random 2-layer LlamaForCausalLM wrapped exactly as the training stages wrap it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steps.train.config import LoraSettings
    from steps.train.model import add_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=172,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return add_lora(LlamaForCausalLM(config), LoraSettings())


def fixed_batch_loader(batch_size: int = 2, seq_len: int = 32):
    """One fixed batch of random token ids (the same every epoch): the model must overfit it."""
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
    rows = [{"input_ids": r, "labels": r} for r in ids]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False)



def train_and_save(case: str, out_dir: Path) -> None:
    """One case, run in its own process (see the test): prepare, train, save, and write what the
    test checks to out_dir (result.json, initial.safetensors, adapter/)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from safetensors.torch import save_file

    conf_name, precision = CASES[case]
    model = tiny_lora_model()
    initial = {n: p.detach().float().clone().contiguous() for n, p in model.named_parameters()
               if n in (LIVE_EMBED, LIVE_LM_HEAD)}
    save_file(initial, str(out_dir / "initial.safetensors"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    plugin = DeepSpeedPlugin(hf_ds_config=str(DS_CONF / conf_name))
    accelerator = Accelerator(deepspeed_plugin=plugin, mixed_precision=precision)
    model, optimizer, loader = accelerator.prepare(model, optimizer, fixed_batch_loader())

    model.train()
    losses = []
    for _ in range(STEPS):
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)      # DeepSpeed's engine.backward + engine.step
            optimizer.step()                # no-op wrappers under DeepSpeed
            optimizer.zero_grad()
            losses.append(loss.item())

    unwrapped = accelerator.unwrap_model(model)
    # the plain state_dict of the live (under ZeRO-3: partitioned) parameters, taken before the
    # gathering call below; only the shapes are recorded
    plain = unwrapped.state_dict()
    plain_shapes = {k: list(plain[k].shape) for k in (LIVE_EMBED, LIVE_LM_HEAD)}
    del plain
    state_dict = accelerator.get_state_dict(model)   # ZeRO-3: gathers the 16-bit weights
    gathered_shapes = {k: list(state_dict[k].shape) for k in (LIVE_EMBED, LIVE_LM_HEAD)}
    unwrapped.save_pretrained(out_dir / "adapter", state_dict=state_dict)

    result = {
        "losses": losses,
        "skipped_steps": getattr(model, "skipped_steps", None),   # fp16 loss-scale overflows
        "device": str(accelerator.device),
        "distributed_type": accelerator.distributed_type.name,
        "deepspeed_config": accelerator.deepspeed_config,
        "plain_state_dict_shapes": plain_shapes,
        "gathered_state_dict_shapes": gathered_shapes,
        "versions": {m: __import__(m).__version__
                     for m in ("torch", "deepspeed", "accelerate", "transformers", "peft")},
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _leaves(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepspeed_config_trains_and_saves_full_modules_to_save(case, monkeypatch, tmp_path):
    """Each case runs in a fresh process: DeepSpeed caches its process groups in module globals
    (deepspeed.utils.groups), so a second in-process run after destroy_process_group() fails with
    "Group ... is not registered", and a hang (NCCL) is cut off by the timeout."""
    _skip_unless_ready()
    from safetensors.torch import load_file

    # a world of one, as torchrun would describe it
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.test_deepspeed_gpu", case, str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (e.stdout, e.stderr))
        pytest.fail(f"{case} run did not finish in {CHILD_TIMEOUT_S} s:\n{output[-6000:]}")
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{case} run failed (exit {proc.returncode}):\n{output}"

    result = json.loads((tmp_path / "result.json").read_text())
    conf_name, precision = CASES[case]
    stage = json.loads((DS_CONF / conf_name).read_text())["zero_optimization"]["stage"]
    ds = result["deepspeed_config"]
    info = (f"{case}: losses {[round(x, 3) for x in result['losses']]}, skipped steps "
            f"{result['skipped_steps']}, {result['versions']}")

    # accelerate filled every "auto" from the loader, the model and its defaults
    assert result["distributed_type"] == "DEEPSPEED", result["distributed_type"]
    assert result["device"].startswith("cuda"), result["device"]
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 2, ds
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0, ds
    assert ds["fp16"]["enabled"] is (precision == "fp16"), ds
    assert ds["bf16"]["enabled"] is (precision == "bf16"), ds
    assert "optimizer" not in ds, ds
    assert "auto" not in list(_leaves(ds)), ds

    losses = result["losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), info
    assert losses[-1] < losses[0] - 0.5, info

    assert result["gathered_state_dict_shapes"] == {LIVE_EMBED: [VOCAB, HIDDEN],
                                                    LIVE_LM_HEAD: [VOCAB, HIDDEN]}
    if stage == 3:
        # ZeRO-3 has partitioned the weights and the live parameters are empty
        # placeholders, so a plain model.state_dict() would save nothing of them
        assert result["plain_state_dict_shapes"] == {LIVE_EMBED: [0], LIVE_LM_HEAD: [0]}, result

    initial = load_file(tmp_path / "initial.safetensors")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for saved_key, live_key in ((SAVED_EMBED, LIVE_EMBED), (SAVED_LM_HEAD, LIVE_LM_HEAD)):
        assert saved_key in saved, sorted(saved)
        w = saved[saved_key].float()
        assert tuple(w.shape) == (VOCAB, HIDDEN), (saved_key, tuple(w.shape))
        assert w.abs().sum() > 0, f"{saved_key} saved as zeros"
        change = (w - initial[live_key]).abs().max().item()
        assert change > 1e-3, f"{saved_key} did not move from its initial value ({change})"
    lora_a = {k: v for k, v in saved.items() if ".lora_A." in k}
    lora_b = {k: v for k, v in saved.items() if ".lora_B." in k}
    assert len(lora_a) == len(lora_b) == 2 * 7, sorted(saved)     # 2 layers x 7 projections
    for k, v in {**lora_a, **lora_b}.items():
        assert v.dim() == 2 and v.numel() > 0, (k, tuple(v.shape))
    for k, v in lora_b.items():
        assert v.float().abs().sum() > 0, f"{k} is still all zeros after training"


if __name__ == "__main__":      # the child process of the test above
    train_and_save(sys.argv[1], Path(sys.argv[2]))
