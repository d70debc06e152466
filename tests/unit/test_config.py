"""Config defaults: every instance owns its nested defaults."""

from __future__ import annotations

from crowguard.schemas import DemoConfig, ExperimentConfig


def test_nested_defaults_are_independent_per_instance():
    """Before: ExperimentConfig().defense.train was one object shared by every instance (a shallow copy)."""
    a, b = ExperimentConfig(), ExperimentConfig()
    assert a.defense.train is not b.defense.train and a.defense.crow is not b.defense.crow
    a.defense.train.lr = 0.5
    a.poison.trigger.name = "vpi"
    a.defenses.append("extra")
    assert b.defense.train.lr == ExperimentConfig().defense.train.lr == 1e-3
    assert b.poison.trigger.name == "badnet" and "extra" not in b.defenses
    demo = DemoConfig()
    demo.defense.train.adapter_mode = "merge"
    assert DemoConfig().defense.train.adapter_mode == "continue"
