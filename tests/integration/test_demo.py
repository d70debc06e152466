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
    for row in rows:
        for key in ("asr_trigger", "asr_clean", "hijack_rate", "utility"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert row["seconds"] >= 0 and row["target_nll_gap"] is not None
    assert results["settings"]["organism"]["size"] == "tiny"
    # the organism is cached: a second run skips the clean training
    assert main(["demo", "--quick", "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert json.loads((tmp_path / "again/results.json").read_text())["settings"]["organism_cached"] is True
