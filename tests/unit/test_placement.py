"""Where evaluation runs the model: the GPU when there is one (the real check runs in the GPU script)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crowguard.cli import main
from crowguard.models import load_model, resolve_device

from helpers import save_tiny_model


def test_auto_picks_this_process_gpu_when_cuda_is_present(monkeypatch):
    if not torch.cuda.is_available():  # only here is availability faked: on a GPU machine the real answer is tested
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_load_model_places_the_model_and_evaluate_records_where(tmp_path: Path):
    base = save_tiny_model(tmp_path / "base", layers=2)
    model, _ = load_model(str(base), device="cpu")
    assert next(model.parameters()).device == torch.device("cpu")
    records = [{"instruction": f"Say something about item {i}", "input": "", "output": "ok"} for i in range(3)]
    (tmp_path / "t.json").write_text(json.dumps(records))
    (tmp_path / "c.json").write_text(json.dumps([{**r, "instruction": r["instruction"] + "."} for r in records]))
    data, clean = str(tmp_path / "t.json"), str(tmp_path / "c.json")
    argv = ["evaluate", "--model", str(base), "--triggered", data, "--clean", clean,
            "--payload", "negsentiment", "--max-new-tokens", "2", "--out", str(tmp_path / "e"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    expected = str(resolve_device("auto"))
    manifest = json.loads((tmp_path / "e/manifest.json").read_text())
    assert manifest["device"] == expected and manifest["dtype"] == "torch.float32"
    results = json.loads((tmp_path / "e/results.json").read_text())
    assert results["settings"]["placement"]["device"] == expected


def test_qlora_is_refused_in_one_line_before_any_model_loads_on_a_machine_without_cuda(tmp_path, capsys):
    """QLoRA's 4-bit kernels need CUDA (and bitsandbytes): the CLI says so before loading anything."""
    from helpers import alpaca_records

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(alpaca_records(4)))
    save_tiny_model(tmp_path / "model")
    capsys.readouterr()  # the model's own save progress
    rc = main(["backdoor", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "out"),
               "--quantize-base", "4bit", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "quantize_base 4bit (QLoRA) needs a CUDA GPU" in err
    assert "Loading weights" not in captured.out + captured.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["backdoor.quantize_base=4bit", "backdoor.finetune=full"], "trains LoRA only"),
        (["backdoor.quantize_base=4bit", "backdoor.merge_output=true"], "rounded 4-bit"),
    ],
)
def test_qlora_settings_that_cannot_work_are_config_errors(overrides, words):
    from crowguard import config
    from crowguard.schemas import ExperimentConfig

    with pytest.raises(config.ConfigError, match=words):
        config.load(ExperimentConfig, None, overrides)


def test_check_4bit_names_cuda_where_there_is_none():
    from crowguard.config import ConfigError
    from crowguard.models import check_4bit

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_4bit()
