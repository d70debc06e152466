"""The defense contract: ``run(model, clean_data, out_dir) -> where the purified model is``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from crowguard.schemas import DefenseConfig, ModelConfig
from crowguard.types import Example


@dataclass
class DefenseResult:
    """Where the purified model is (a model or adapter directory loadable by ``load_model``) and its cost."""

    model_path: str
    summary: dict[str, Any]


class Defense(Protocol):
    """A backdoor defense. Every training defense gets the same data, epochs, schedule and learning rate."""

    name: str

    def run(
        self,
        model: ModelConfig,
        clean_data: list[Example],
        out_dir: Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        show_progress: bool = True,
        resolved_config: Any = None,
        inputs: dict[str, str] | None = None,
    ) -> DefenseResult: ...


def make_defense(cfg: DefenseConfig) -> Defense:
    """The registered defense named ``cfg.method``, built from its config section."""
    from crowguard.registry import resolve

    return resolve("defenses", cfg.method)(cfg)
