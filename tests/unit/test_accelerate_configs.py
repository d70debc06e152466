"""The shipped accelerate launch files load with accelerate's own reader and say what their names promise."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from crowguard.config import ConfigError
from crowguard.registry import ACCELERATE_CONFIGS, accelerate_config, presets


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_configs_load(name: str):
    config = load_config_from_file(accelerate_config(name))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert str(config.distributed_type).rsplit(".", 1)[-1] == expected
    assert config.mixed_precision == "no"  # crowguard's train.precision decides, not the launcher
    if name == "fsdp":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert config.fsdp_config["fsdp_use_orig_params"] is True
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_accelerate_configs_are_not_crowguard_presets():
    assert "accelerate" not in presets()
    with pytest.raises(ConfigError, match="did you mean 'fsdp'"):
        accelerate_config("fsdpp")
