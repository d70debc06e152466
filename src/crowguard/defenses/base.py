"""The defense contract, for the three kinds of defense crowguard has.

A defense is one module with one class: its ``name``, its ``kind``, its own config dataclass ``Config`` (the
section ``defense.<name>`` of a YAML file; None when it has no knobs) and ``run``. The registry maps the name to the
class (:data:`crowguard.registry.DEFENSES`), and ``configs/defenses/<name>.yaml`` is its preset. Config loading,
``crowguard validate --explain``, ``crowguard ls`` and the CLI's flags and ``--set`` keys read ``Config`` from there,
so adding a defense edits no other file.

Kinds:

* ``training`` (CROW, fine-tuning): train on the clean samples under the shared budget ``defense.train``; the output
  directory is a model or adapter directory.
* ``weights`` (pruning, quantization): edit the weights without training; the output is a model directory.
* ``decoding`` (decoding settings, CleanGen): the weights stay; the output directory holds ``defense.json`` naming
  the model it guards, and evaluation asks the defense how to generate (:func:`open_for_evaluation`).
* ``none``: nothing is written; the model is evaluated as given.

Every output directory is written by :func:`crowguard.stage.stage_artefact` (atomic, ``config.yaml``, summary,
``manifest.json``, model card).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from crowguard.schemas import DefenseConfig, ModelConfig
from crowguard.types import Example, Generation

Kind = Literal["none", "training", "weights", "decoding"]
DEFENSE_FILE = "defense.json"  # in a decoding defense's output: {"defense", "model", "settings"}

# generate(model, tokenizer, examples, template, settings, show_progress) -> one Generation per example, in order:
# the signature of crowguard.evaluation.generate.generate, which a decoding defense replaces.
GenerateFn = Callable[[Any, Any, Sequence[Example], str, Any, bool], list[Generation]]


@dataclass
class DefenseResult:
    """Where the purified model is (a directory ``evaluate --model`` accepts) and its cost."""

    model_path: str
    summary: dict[str, Any]


class Defense:
    """Base class of every defense. ``self.settings`` is the defense's own section (an instance of ``Config``)."""

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "training"
    Config: ClassVar[type | None] = None

    def __init__(self, cfg: DefenseConfig) -> None:
        self.cfg = cfg
        self.settings = cfg.section(self.name) if self.Config is not None else None

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
    ) -> DefenseResult:
        raise NotImplementedError

    def generator(self, spec: dict[str, Any], device: str = "auto") -> GenerateFn:
        """Decoding defenses only: the generate function evaluation uses for the model in ``spec``."""
        raise NotImplementedError(f"defense {self.name!r} is not a decoding-time defense")


def make_defense(cfg: DefenseConfig) -> Defense:
    """The registered defense named ``cfg.method``, built from its config section."""
    from crowguard.registry import resolve

    return resolve("defenses", cfg.method)(cfg)


def read_spec(path: str | Path) -> dict[str, Any] | None:
    """The ``defense.json`` of a decoding defense's output directory, or None for any other model path."""
    spec_path = Path(path) / DEFENSE_FILE
    if not spec_path.is_file():
        return None
    from crowguard.config import ConfigError

    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{spec_path}: unreadable decoding-defense file: {exc}") from None
    missing = [key for key in ("defense", "model", "settings") if key not in spec]
    if missing:
        raise ConfigError(f"{spec_path}: missing {', '.join(missing)}")
    return spec


def guarded_model(spec: dict[str, Any]) -> ModelConfig:
    """The suspect model a decoding defense guards (the ``model`` of its ``defense.json``)."""
    from crowguard.config import from_dict

    return from_dict(ModelConfig, spec["model"], "defense.json: model")


def open_for_evaluation(spec: dict[str, Any], device: str = "auto") -> tuple[GenerateFn, dict[str, Any]]:
    """Ask the decoding defense in ``spec`` how to generate: (generate function, what to record in the results)."""
    from crowguard.config import from_dict

    defense_cfg = from_dict(DefenseConfig, {"method": spec["defense"], spec["defense"]: spec["settings"]})
    defense = make_defense(defense_cfg)
    return defense.generator(spec, device), {"defense": spec["defense"], "settings": spec["settings"]}
