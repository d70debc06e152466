"""The model card is built from a directory's own records; its tables survive values with pipes in them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from crowguard.card import model_card


def test_card_rows_keep_two_cells_when_a_value_holds_a_pipe(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    manifest = {"stage": "defend:prune", "created": "2026-12-01T00:00:00+00:00", "seed": 7,
                "versions": {"crowguard": "0.1.0", "torch": "2.13"},
                "inputs": {"model": {"ref": "some/base", "sha256": "ab" * 32}},
                "summary": {"defense": "prune", "prune": {"criterion": "a|b"}, "seconds": 1.5}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    card = model_card(tmp_path, tmp_path / "final")
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"base_model": "some/base", "library_name": "transformers",
                     "tags": ["crowguard", "backdoor-defense", "prune"]}  # fmt: skip
    rows = [line for line in card.splitlines() if line.startswith("| ") and "---" not in line]
    for row in rows[:8]:  # the "what was done" table: label and value
        cells = [c for c in row.replace("\\|", "").split("|")[1:-1]]
        assert len(cells) == 2, row
    assert "| seed | 7 |" in card and "# final: prune" in card and "a\\|b" in card
