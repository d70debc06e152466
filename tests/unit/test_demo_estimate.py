"""The demo's up-front time estimate (training steps only for training defenses, cached evaluations not counted),
its plant cache key and its up-front refusals."""

from __future__ import annotations

import dataclasses

import pytest

from crowguard.config import ConfigError
from crowguard.recipes.demo import SECONDS_CONVERT, SECONDS_PER_EVAL, SECONDS_PER_STEP, expected_seconds
from crowguard.schemas import DemoConfig, OrganismConfig


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


def test_the_template_is_in_the_plant_key_and_an_alpaca_plant_keeps_its_old_key():
    """A chat-template plant is another model; an Alpaca plant cached before the knob existed is still found."""
    from crowguard.config import to_dict
    from crowguard.organism.build import content_key
    from crowguard.recipes.demo import Base, DemoSetup, plant_key
    from crowguard.types import Example

    setup = DemoSetup(Base("/m", True, 0.0, {"source": "wheel"}), [Example("a", "", "b")], [], None, [])  # type: ignore[arg-type]
    cfg = DemoConfig()
    before_knobs = {k: v for k, v in to_dict(cfg.backdoor).items() if k != "regroup_micro_batches"}
    old = {"base": {"source": "wheel"}, "backdoor": before_knobs, "organism": to_dict(cfg.organism)}
    versions = ("crowguard", "torch", "transformers", "peft")
    assert plant_key(cfg, setup) == content_key(old, (setup.mix,), versions)
    assert plant_key(dataclasses.replace(cfg, template="chat"), setup) != plant_key(cfg, setup)
    # regrouping micro-batches by length is speed only (the same step): the same plant, the same key
    unregrouped = dataclasses.replace(cfg, backdoor=dataclasses.replace(cfg.backdoor, regroup_micro_batches=False))
    assert plant_key(unregrouped, setup) == plant_key(cfg, setup)
    assert plant_key(dataclasses.replace(cfg, backdoor=dataclasses.replace(cfg.backdoor, lr=5e-4)), setup) != (
        plant_key(cfg, setup)
    )


def test_the_first_trained_stage_restates_the_estimate_at_its_own_pace():
    """A plant that took 1.5x its estimate: the rest is re-estimated at 1.5x (the stage costs are the estimate's)."""
    from crowguard.recipes.demo import expected_stage_seconds, pace_note

    cfg = DemoConfig()
    assert expected_stage_seconds(cfg, "plant") == pytest.approx(225 * SECONDS_PER_STEP["plant"])
    assert expected_stage_seconds(cfg, "crow") == pytest.approx(65 * SECONDS_PER_STEP["crow"])
    assert pace_note(300.0, 200.0, 600.0) == (
        "this machine takes 1.50x the estimate's time per step; the rest should take about 15 min"
    )


def test_chat_template_on_the_tiny_organism_is_refused_before_anything_trains(tmp_path):
    from crowguard.recipes.demo import prepare

    cfg = dataclasses.replace(
        DemoConfig(), template="chat", organism=OrganismConfig(name="tiny", cache_dir=str(tmp_path))
    )
    with pytest.raises(ConfigError, match="template chat needs an organism with a chat template"):
        prepare(cfg, show_progress=False)
    assert not any(tmp_path.iterdir())  # nothing was trained or written
