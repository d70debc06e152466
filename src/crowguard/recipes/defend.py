"""Recipe: purify a (possibly backdoored) model with a defense on a small clean set.

check the output directory, the model and the data -> draw ``n_samples`` clean examples (seeded; only for a defense
that uses them, ``Defense.needs_data``) -> the registered defense's ``run`` -> the purified model in ``out_dir``.
Training defenses share one budget (``defense.train``): the same data, epochs, schedule and learning rate. ``none``
trains and writes nothing (see :mod:`crowguard.defenses.none`), so it takes no ``out_dir``.
"""

from __future__ import annotations

import random
from pathlib import Path

from crowguard.config import ConfigError
from crowguard.data import DataError, load_examples
from crowguard.defenses.base import DefenseResult, make_defense
from crowguard.io import check_output_dir
from crowguard.models import check_model_exists
from crowguard.schemas import ExperimentConfig
from crowguard.types import Example, StageContext


def clean_samples(path: str, n: int, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement with ``seed`` (all of them when ``n`` is 0)."""
    examples = load_examples(path)
    if n == 0 or n == len(examples):
        return examples
    if n > len(examples):
        raise DataError(f"{path}: defense.n_samples is {n} but the file has {len(examples)} examples")
    return random.Random(seed).sample(examples, n)


def run_defend(
    cfg: ExperimentConfig,
    out_dir: Path | None,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
) -> DefenseResult:
    """Run ``cfg.defense`` on ``cfg.model`` with clean data ``cfg.defense.data``; ``out_dir`` is None for ``none``."""
    if not cfg.model.name_or_path:
        raise DataError("model.name_or_path is empty: give --model (a local directory or Hub id)")
    defense = make_defense(cfg.defense)
    defense.check()
    if cfg.defense.method == "none":  # refuses an out_dir, checks the model and adapter exist
        return defense.run(cfg.model, [], StageContext(None if out_dir is None else Path(out_dir)))
    if out_dir is None:
        raise ConfigError(f"defense {cfg.defense.method!r} writes the purified model: give --out")
    check_output_dir(Path(out_dir), overwrite, [cfg.model.name_or_path, cfg.model.adapter, cfg.defense.data])
    check_model_exists(cfg.model.name_or_path, cfg.model.adapter, cfg.model.revision)
    data: list[Example] = []
    inputs: dict[str, str] = {}
    if defense.needs_data:  # one that uses no clean samples (quantize, magnitude pruning): no --data
        if not cfg.defense.data:
            raise DataError(
                f"defense {cfg.defense.method!r} uses clean samples and defense.data is empty: give --data, a clean "
                "Alpaca JSON/JSONL file"
            )
        data = clean_samples(cfg.defense.data, cfg.defense.n_samples, cfg.defense.train.seed)
        inputs = {"data": cfg.defense.data}
    return defense.run(cfg.model, data, StageContext(Path(out_dir), overwrite, resume, show_progress, cfg, inputs))
