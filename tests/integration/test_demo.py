"""`crowguard demo --quick`: the whole loop runs and writes every artefact with numbers in range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowguard.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CROWGUARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    for name in ("results.json", "results.md", "results.png", "config.yaml", "manifest.json"):
        assert (out / name).is_file(), name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["defense"] for r in rows] == ["none", "finetune", "crow"]
    # the numbers themselves are unchanged: rates exact; likelihoods to 1e-4 relative, float noise across CPUs but
    # below the differences between the rows (fine-tuning moves perplexity by 4e-4 and the NLL gap by 1e-4 here)
    golden = json.loads((Path(__file__).parent / "demo_quick_golden.json").read_text())["rows"]
    for row, expected in zip(rows, golden, strict=True):
        assert row["defense"] == expected["defense"]
        for key in ("asr_trigger", "asr_clean", "hijack_rate"):
            assert row[key] == expected[key], (row["defense"], key)
        assert row["target_nll_gap"] == pytest.approx(expected["target_nll_gap"], abs=2e-5), row["defense"]
        assert row["clean_perplexity"] == pytest.approx(expected["clean_perplexity"], rel=1e-4), row["defense"]
    for row in rows:
        # every rate and the NLL gap carry an interval that contains the value and never has zero width
        for key, ci in (("asr_trigger", "asr_trigger_ci95"), ("asr_clean", "asr_clean_ci95"),
                        ("hijack_rate", "hijack_ci95"), ("target_nll_gap", "target_nll_gap_ci95")):  # fmt: skip
            low, high = row[ci]
            assert low <= row[key] <= high and high - low > 0, (key, row)
        assert row["eval_seconds"] > 0
    assert rows[0]["train_seconds"] > 0  # the organism was trained in this run, not taken from the cache
    assert all(r["train_seconds"] > 0 for r in rows[1:])
    for name in ("examples.md", "diagnose.json", "diagnose.png"):
        assert (out / name).is_file(), name
    assert "## none" in (out / "examples.md").read_text()
    assert set(json.loads((out / "diagnose.json").read_text())) == {"backdoored", "finetune", "crow"}
    settings = results["settings"]
    assert settings["organism"]["name"] == "tiny" and settings["organism"]["size"] == "tiny"
    # the quick organism is too small to take the backdoor, and the demo says so instead of reporting ASR 0%
    assert settings["backdoor_planted"] is (results["warning"] is None)
    if results["warning"]:
        assert "did not take" in results["warning"] and "did not take" in (out / "results.md").read_text()
    # the organism is cached: a second run skips the clean training
    assert main(["demo", "--quick", "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again/results.json").read_text())
    assert again["settings"]["organism_cached"] is True
    assert again["rows"][0]["train_seconds"] is None  # nothing was trained for the backdoored row this time


def test_demo_on_a_pretrained_organism_plants_by_lora_and_continues_the_adapter(tmp_path: Path, monkeypatch):
    """The smollm2 path (LoRA plant cached by settings, CROW continuing the backdoored adapter) on a tiny stand-in
    model, so no weights are needed: the conversion itself is tested in tests/unit/organism/test_smollm2.py."""
    import dataclasses

    from crowguard.organism import smollm2
    from crowguard.recipes.demo import quick_config, run_demo
    from crowguard.schemas import DemoConfig

    from helpers import save_tiny_model

    monkeypatch.setenv("CROWGUARD_CACHE", str(tmp_path / "cache"))
    stand_in = save_tiny_model(tmp_path / "pretrained", layers=3)
    provenance = {"source": "test", "path": str(stand_in)}
    monkeypatch.setattr(smollm2, "ensure_smollm2", lambda *a, **k: (str(stand_in), provenance))
    quick = quick_config(DemoConfig())
    cfg = dataclasses.replace(
        quick,
        organism=dataclasses.replace(quick.organism, name="smollm2"),
        plant="finetune",
        reference_clean=True,
        n_clean=40,
        defense=dataclasses.replace(
            quick.defense, train=dataclasses.replace(quick.defense.train, adapter_mode="continue")
        ),
    )
    results = run_demo(cfg, tmp_path / "demo", show_progress=False)
    assert [r["defense"] for r in results["rows"]] == ["unpoisoned", "none", "finetune", "crow"]
    settings = results["settings"]
    assert settings["organism_source"] == provenance and settings["backdoor_cached"] is False
    backdoored = Path(settings["backdoored_path"])
    assert (backdoored / "adapter_config.json").is_file()  # the backdoor lives in an adapter
    assert backdoored.is_relative_to(tmp_path / "cache")
    for method in ("finetune", "crow"):  # continue mode: the defenses trained that same adapter further
        adapter = json.loads((tmp_path / "demo" / f"defense-{method}-s0" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(stand_in.resolve())
    again = run_demo(dataclasses.replace(cfg, defenses=["none"]), tmp_path / "again", show_progress=False)
    assert again["settings"]["backdoor_cached"] is True
    # the unpoisoned and the backdoored model came from the cache, and so do their evaluations: the same numbers
    # and the times they took when they ran, marked reused
    first = {r["defense"]: r for r in results["rows"]}
    assert not first["none"]["reused"] and first["none"]["eval_seconds"] > 0
    for row in again["rows"]:
        assert row["reused"] is True, row
        for key in ("asr_trigger", "asr_clean", "target_nll_gap", "clean_perplexity", "eval_seconds", "train_seconds"):
            assert row[key] == first[row["defense"]][key], key
    # another evaluation setting is another key: measured again, not taken from the cache
    other = dataclasses.replace(cfg, defenses=["none"], evaluate=dataclasses.replace(cfg.evaluate, max_new_tokens=5))
    third = run_demo(other, tmp_path / "third", show_progress=False)
    assert [r["reused"] for r in third["rows"]] == [False, False]


def test_demo_runs_every_kind_of_defense(tmp_path: Path, monkeypatch):
    """Weights and decoding defenses go through the demo like training ones; CleanGen's reference is the unpoisoned
    organism the backdoor was fine-tuned into (the same tokenizer), and the diagnostic covers only models whose weights
    changed."""
    import dataclasses

    from crowguard import config
    from crowguard.recipes.demo import quick_config, run_demo
    from crowguard.schemas import DemoConfig

    monkeypatch.setenv("CROWGUARD_CACHE", str(tmp_path / "cache"))
    cfg = config.load(DemoConfig, None, ["defense.prune.criterion=magnitude", "defense.quantize.bits=8"])
    quick = dataclasses.replace(quick_config(cfg), plant="finetune", reference_clean=True,
                                defenses=["none", "prune", "quantize", "decoding", "cleangen"])  # fmt: skip
    out = tmp_path / "demo"
    run_demo(quick, out, show_progress=False)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["defense"] for r in rows] == ["unpoisoned", "none", "prune", "quantize", "decoding", "cleangen"]
    spec = json.loads((out / "defense-cleangen-s0" / "defense.json").read_text())
    assert spec["defense"] == "cleangen" and spec["settings"]["reference"]
    assert set(json.loads((out / "diagnose.json").read_text())) == {"backdoored", "prune", "quantize"}
