"""Recipe: purify a (possibly backdoored) model with a defense on a small clean set.

draw ``n_samples`` clean examples (seeded) -> the registered defense's ``run`` -> the purified model in ``out_dir``.
Training defenses share one budget (``defense.train``): the same data, epochs, schedule and learning rate.
"""

from __future__ import annotations

import random
from pathlib import Path

from crowguard.data import DataError, load_examples
from crowguard.defenses.base import DefenseResult, make_defense
from crowguard.schemas import ExperimentConfig
from crowguard.types import Example


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
    out_dir: Path,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
) -> DefenseResult:
    """Run ``cfg.defense`` on ``cfg.model`` with clean data ``cfg.defense.data``."""
    if not cfg.model.name_or_path:
        raise DataError("model.name_or_path is empty: give --model (a local directory or Hub id)")
    defense = make_defense(cfg.defense)
    data = []
    inputs = {}
    if cfg.defense.method != "none":
        if not cfg.defense.data:
            raise DataError("defense.data is empty: give --data, a clean Alpaca JSON/JSONL file")
        data = clean_samples(cfg.defense.data, cfg.defense.n_samples, cfg.defense.train.seed)
        inputs = {"data": cfg.defense.data}
    return defense.run(
        cfg.model,
        data,
        Path(out_dir),
        overwrite=overwrite,
        resume=resume,
        show_progress=show_progress,
        resolved_config=cfg,
        inputs=inputs,
    )
