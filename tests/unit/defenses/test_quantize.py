"""Quantization: int4 and int8 of tiny saved models with torchao, stored dequantized (at most 2^bits values per
group, the same values and logits as torchao's own quantized model), a LoRA model merged first, the config errors,
a missing torchao, and the CLI without --data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from crowguard import config
from crowguard.cli import main
from crowguard.config import ConfigError
from crowguard.defenses.quantize import QuantizeConfig, QuantizeDefense, torchao_config
from crowguard.recipes.defend import run_defend
from crowguard.schemas import ExperimentConfig

from helpers import save_tiny_model

pytest.importorskip("torchao")

EDITED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "base")


@pytest.fixture
def lora_model(tiny_model: Path, tmp_path: Path) -> Path:
    """A LoRA adapter (random A and B, so its delta is not zero) on ``tiny_model``, saved by crowguard."""
    from peft import LoraConfig, get_peft_model

    from crowguard.models import load_model, save_model

    model, tokenizer = load_model(str(tiny_model))
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    save_model(get_peft_model(model, config), tokenizer, tmp_path / "adapter", str(tiny_model))
    return tmp_path / "adapter"


@pytest.fixture
def wide_model(tmp_path: Path) -> Path:
    """Hidden 320, MLP 640: rows longer than 256, so "at most 256 values per int8 row" says something."""
    return save_tiny_model(tmp_path / "wide", hidden=320)


def _defend(model: Path, out: Path, *overrides: str):
    cfg = config.load(ExperimentConfig, None, [f"model.name_or_path={model}", "defense.method=quantize", *overrides])
    return run_defend(cfg, out, show_progress=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _edited(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in EDITED)


def _torchao_model(path: Path, settings: QuantizeConfig):
    """The model quantized by torchao itself (low-bit tensors in memory, decoder linears only)."""
    from torchao.quantization import quantize_

    from crowguard.models import load_model

    model, _ = load_model(str(path))
    quantize_(model, torchao_config(settings), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and
              fqn.startswith("model.layers."))  # fmt: skip
    return model.eval()


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, None)])
def test_quantized_weights_have_the_bit_width_and_torchaos_values(wide_model: Path, tmp_path: Path, bits, group):
    out = tmp_path / f"q{bits}"
    overrides = [f"defense.quantize.bits={bits}"] + ([f"defense.quantize.group_size={group}"] if group else [])
    result = _defend(wide_model, out, *overrides)
    before, after = _weights(wide_model), _weights(out)
    for name, weight in after.items():
        if not _edited(name):
            assert torch.equal(weight, before[name]), name  # embeddings (tied LM head) and norms stay float
            continue
        assert weight.dtype == torch.float32 and not torch.equal(weight, before[name])
        groups = weight.reshape(weight.shape[0], -1, group) if group else weight.reshape(weight.shape[0], 1, -1)
        distinct = max(len(torch.unique(g)) for g in groups.reshape(-1, groups.shape[-1]))
        assert groups.shape[-1] > 2**bits  # groups of 32 (int4) and rows of 320 or 640 (int8): more than 2^bits
        assert distinct <= 2**bits, name  # ... yet at most 2^bits distinct values in each
    settings = QuantizeConfig(bits=bits, group_size=group or 32)
    reference = _torchao_model(wide_model, settings)
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            assert torch.equal(module.weight.dequantize(), after[f"{name}.weight"]), name
    from crowguard.models import load_model

    saved, tokenizer = load_model(str(out))
    ids = tokenizer("The quick brown fox jumps", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the saved float model computes what torchao's low-bit model computes
        assert torch.allclose(saved(ids).logits, reference(ids).logits, atol=1e-4)
    generated = saved.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["library"].startswith("torchao ") and summary["bits"] == bits and summary["n_layers"] == 14
    assert summary["tensor_class"] == (["IntxUnpackedToInt8Tensor"] if bits == 4 else ["Int8Tensor"])
    assert summary["group_size"] == group and summary["stored"].startswith("stored dequantized in float32;")
    assert "no low-bit kernel at evaluation" in summary["stored"] and 0 < summary["relative_error"] < 0.2
    assert result.summary["merged_adapter"] is False
    assert set(json.loads((out / "manifest.json").read_text())["inputs"]) == {"model"}  # no data drawn or hashed


def test_a_lora_model_is_merged_then_quantized(lora_model: Path, tmp_path: Path):
    from crowguard.models import load_model, merge_adapter

    out = tmp_path / "q"
    result = _defend(lora_model, out, "defense.quantize.group_size=16")
    assert result.summary["merged_adapter"] is True and (out / "config.json").is_file()
    merged, _ = load_model(str(lora_model))
    merged = copy.deepcopy(merge_adapter(merged))
    from torchao.quantization import quantize_

    quantize_(merged, torchao_config(QuantizeConfig(group_size=16)),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers."))  # fmt: skip
    q = merged.model.layers[0].self_attn.q_proj.weight.dequantize()
    assert torch.equal(q, _weights(out)["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("defense.quantize.bits=3", "3 is not one of 8, 4"),
        ("defense.quantize.group_size=0", "group_size must be at least 1"),
        ("defense.quantize.scheme=asymmetric", "'asymmetric' is not one of 'symmetric'"),
    ],
)
def test_bad_settings_are_config_errors(override: str, words: str):
    with pytest.raises(ConfigError, match=r"defense\.quantize") as error:
        config.load(ExperimentConfig, None, [override])
    assert words in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantizeConfig(bits=3).validate()  # type: ignore[arg-type]


def test_a_group_size_that_does_not_divide_a_layer_is_a_config_error(tiny_model: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"group_size 24 does not divide the 32 input features of model\.layers\.0"):
        _defend(tiny_model, tmp_path / "x", "defense.quantize.group_size=24")
    assert not (tmp_path / "x").exists()


def test_missing_torchao_is_a_one_line_error(tiny_model: Path, tmp_path: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs torchao.*pip install 'crowguard\[quant\]'") as error:
        _defend(tiny_model, tmp_path / "x")
    assert "\n" not in str(error.value)


def test_cli_quantize_needs_no_data(tiny_model: Path, tmp_path: Path, capsys):
    cfg = config.load(ExperimentConfig, None, ["defense.method=quantize"])
    assert QuantizeDefense(cfg.defense).needs_data is False
    out = tmp_path / "cli"
    argv = ["defend", "--method", "quantize", "--model", str(tiny_model), "--out", str(out),
            "--set", "defense.quantize.bits=8", "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "train_summary.json").read_text())["granularity"] == "per output channel"
