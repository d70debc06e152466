"""The demo's up-front time estimate: training steps only for training defenses, cached evaluations not counted."""

from __future__ import annotations

import dataclasses

import pytest

from crowguard.recipes.demo import SECONDS_CONVERT, SECONDS_PER_EVAL, SECONDS_PER_STEP, expected_seconds
from crowguard.schemas import DemoConfig


def estimate(defenses: list[str], cached: bool) -> float:
    cfg = dataclasses.replace(DemoConfig(), defenses=defenses, defense_seeds=[0])
    seconds = expected_seconds(cfg, cached, cached)
    assert seconds is not None
    return seconds


def test_a_training_defense_adds_its_steps_and_one_evaluation():
    steps = 65  # 100 samples, batch 2 x 4, 5 epochs: 13 steps per epoch
    base = estimate(["none"], cached=True)
    assert base == 0.0  # both reference evaluations come from the cache with the plant
    assert estimate(["none", "crow"], cached=True) == pytest.approx(
        steps * SECONDS_PER_STEP["crow"] + SECONDS_PER_EVAL
    )
    assert estimate(["none", "finetune"], cached=True) == pytest.approx(
        steps * SECONDS_PER_STEP["finetune"] + SECONDS_PER_EVAL
    )


def test_decoding_and_weights_defenses_train_nothing():
    assert estimate(["none", "decoding"], cached=True) == pytest.approx(SECONDS_PER_EVAL)
    assert estimate(["none", "quantize"], cached=True) == pytest.approx(SECONDS_PER_EVAL)


def test_a_cold_run_adds_conversion_planting_and_the_reference_evaluations():
    cfg = DemoConfig()
    plant_steps = -(-(cfg.n_poison + cfg.n_clean) // cfg.backdoor.per_device_batch) * cfg.backdoor.epochs
    expected = SECONDS_CONVERT + plant_steps * SECONDS_PER_STEP["plant"] + 2 * SECONDS_PER_EVAL
    assert estimate(["none"], cached=False) == pytest.approx(expected)
