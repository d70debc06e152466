"""No defense: the model as it is (the row every table compares against)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crowguard.defenses.base import DefenseResult
from crowguard.schemas import DefenseConfig, ModelConfig
from crowguard.types import Example


class NoDefense:
    name = "none"

    def __init__(self, cfg: DefenseConfig) -> None:
        self.cfg = cfg

    def run(self, model: ModelConfig, clean_data: list[Example], out_dir: Path, **_: Any) -> DefenseResult:
        """Nothing to train; the model is evaluated as given."""
        return DefenseResult(model_path=model.name_or_path, summary={"stage": "none", "seconds": 0.0, "steps": 0})
