"""The pretrain and sft Configs keep TrainConfig's bounds on the knobs they re-declare with their
recipe's defaults, and the Trainer's FSDP/fp16 refusal says all of what to do."""
import pydantic
import pytest

from steps import pretrain, sft
from steps.train.config import TrainConfig
from steps.train.loop import Trainer


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
@pytest.mark.parametrize("field,value", [("learning_rate", -1), ("learning_rate", 0),
                                         ("warmup_ratio", 5), ("weight_decay", -0.1)])
def test_pretrain_and_sft_keep_the_training_bounds(stage, field, value):
    config = {"pretrain": pretrain.Config, "sft": sft.Config}[stage]
    with pytest.raises(pydantic.ValidationError, match=field):
        config(**{field: value})
    assert config.model_fields[field].metadata == TrainConfig.model_fields[field].metadata
    assert config().learning_rate == {"pretrain": 2e-4, "sft": 1e-4}[stage]  # recipe defaults stay


def test_the_trainers_fsdp_fp16_message_is_whole(tmp_path):
    cfg = TrainConfig(launcher={"strategy": "fsdp"})
    with pytest.raises(ValueError) as e:
        Trainer(object(), cfg, [], None, None, dist=None, out_dir=tmp_path, ckpt_dir=None,
                fingerprint="", precision="fp16")
    assert str(e.value).startswith("launcher.strategy=fsdp trains in bf16 or fp32, and precision "
                                   "auto chose fp16"), str(e.value)
    assert "set precision fp32, or use strategy ddp" in str(e.value)
