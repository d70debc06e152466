"""The experiment runner's fingerprints: what changes a result changes them; knobs at their neutral value and
speed-only knobs do not, so adding a knob does not make every earlier stage stale."""

from __future__ import annotations

import dataclasses

from crowguard.recipes.study import fingerprint
from crowguard.schemas import DefenseConfig, TrainConfig


def test_a_result_setting_changes_the_fingerprint_and_a_neutral_or_speed_only_one_does_not():
    base = fingerprint("plant", TrainConfig())
    assert fingerprint("plant", dataclasses.replace(TrainConfig(), lr=5e-4)) != base
    assert fingerprint("plant", dataclasses.replace(TrainConfig(), quantize_base="4bit")) != base
    for speed in ({"regroup_micro_batches": False}, {"save_steps": 5}, {"logging_steps": 3},
                  {"gradient_checkpointing": True}):  # fmt: skip
        assert fingerprint("plant", dataclasses.replace(TrainConfig(), **speed)) == base, speed


def test_a_knob_at_its_neutral_value_is_left_out_of_the_hash():
    """The same hash as a config without the knob at all (what an earlier crowguard recorded)."""
    from crowguard.config import fingerprint_view, to_dict

    view, full = fingerprint_view(TrainConfig()), to_dict(TrainConfig())
    assert "quantize_base" in full and "quantize_base" not in view and "regroup_micro_batches" not in view
    assert view["lr"] == full["lr"] and view["seed"] == full["seed"]


def test_a_defense_fingerprint_sees_its_own_section():
    crow = DefenseConfig(method="crow")
    stronger = crow.with_section("crow", dataclasses.replace(crow.section("crow"), alpha=20.0))
    assert fingerprint(stronger) != fingerprint(crow)
