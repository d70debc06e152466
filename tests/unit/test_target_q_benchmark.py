"""``benchmarks/target_q.py``: the recovered target scored on a cell's backdoored, unpoisoned and defended models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crowguard.config import to_dict
from crowguard.data import prompt_ids
from crowguard.invert import InvertConfig, forced_q_score
from crowguard.models import load_model, merge_adapter
from crowguard.types import Example

from helpers import alpaca_records, benchmark_module, save_tiny_model


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("target_q") as module:
        yield module


def _cell(tmp_path: Path) -> tuple[Path, list[int]]:
    """A cell folder as the efficacy runner leaves it: a backdoored model (here a full one), the unpoisoned base
    (another seed), a defended stage (a LoRA adapter on the base), an evaluation folder without weights, and an
    inversion whose best candidate is a 6-token string."""
    from peft import LoraConfig, get_peft_model

    cell = tmp_path / "badnet-refusal"
    save_tiny_model(cell / "plant", seed=1)
    base = save_tiny_model(tmp_path / "base", seed=2)
    (cell / "cell.json").write_text(json.dumps({"base": str(base)}))
    model, tokenizer = load_model(str(base))
    torch.manual_seed(0)
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(cell / "finetune-s0")
    (cell / "eval-finetune-s0").mkdir()
    ids = tokenizer("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    records = alpaca_records(6, seed=3)
    inversion = {
        "best": {"text": tokenizer.decode(ids), "token_ids": ids, "q_score": 0.97},
        "template": "alpaca",
        "settings": to_dict(InvertConfig(prompts=6, warmup_prompts=2)),
        "prompt_examples": [{"instruction": r["instruction"], "input": r["input"]} for r in records],
    }
    (cell / "inversion").mkdir()
    (cell / "inversion" / "inversion.json").write_text(json.dumps(inversion))
    return cell, ids


def _direct(path: Path, ids: list[int], records: list[dict]) -> float:
    model, tokenizer = load_model(str(path))
    model = merge_adapter(model)
    prompts = [prompt_ids(Example(r["instruction"], r["input"]), tokenizer, "alpaca") for r in records]
    return forced_q_score(model, tokenizer, prompts, ids, InvertConfig())["q_score"]


def test_every_model_with_weights_is_scored_once_and_as_forced_q_score_scores_it(bench, tmp_path, capsys):
    cell, ids = _cell(tmp_path)
    assert bench.main(["--out", str(tmp_path), "--cells", cell.name]) == 0
    record = json.loads((cell / "inversion" / bench.SCORES).read_text())
    assert list(record["scores"]) == ["backdoored", "unpoisoned", "finetune-s0"]
    records = json.loads((cell / "inversion" / "inversion.json").read_text())["prompt_examples"]
    for name, path in [("backdoored", cell / "plant"), ("unpoisoned", tmp_path / "base"),
                       ("finetune-s0", cell / "finetune-s0")]:  # fmt: skip
        assert record["scores"][name]["q_score"] == pytest.approx(_direct(path, ids, records), abs=1e-6)
    q = [s["q_score"] for s in record["scores"].values()]
    assert len({round(v, 6) for v in q}) == 3  # three different models, three different scores
    assert "| badnet-refusal | finetune-s0 |" in capsys.readouterr().out

    (cell / "unlearn-s0").mkdir()  # a new stage: only it is scored on the next call
    (cell / "finetune-s0" / "adapter_config.json").rename(cell / "unlearn-s0" / "adapter_config.json")
    (cell / "finetune-s0" / "adapter_model.safetensors").rename(cell / "unlearn-s0" / "adapter_model.safetensors")
    assert bench.main(["--out", str(tmp_path), "--cells", cell.name]) == 0
    again = json.loads((cell / "inversion" / bench.SCORES).read_text())["scores"]
    assert {k: v for k, v in again.items() if k != "unlearn-s0"} == record["scores"]
    assert again["unlearn-s0"]["q_score"] == pytest.approx(record["scores"]["finetune-s0"]["q_score"], abs=1e-6)


def test_scores_of_another_target_are_not_mixed_in(bench, tmp_path):
    cell, _ = _cell(tmp_path)
    (cell / "inversion" / bench.SCORES).write_text(json.dumps({"target": "something else", "scores": {}}))
    with pytest.raises(SystemExit, match="another target"):
        bench.main(["--out", str(tmp_path), "--cells", cell.name])
    with pytest.raises(SystemExit, match="no inversion"):
        bench.main(["--out", str(tmp_path), "--cells", "vpi-refusal"])
