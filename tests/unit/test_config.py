"""Config defaults: every instance owns its nested defaults."""

from __future__ import annotations

import pytest

from crowguard.config import from_dict
from crowguard.schemas import DefenseConfig, DemoConfig, ExperimentConfig


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


def test_a_partial_section_keeps_the_fields_own_defaults():
    """Before: {"defense": {"train": {"max_steps": 2}}} built TrainConfig() and lost the defense's lr 1e-3 (2e-4),
    and a demo --set backdoor.epochs=2 reset the plant's LoRA r 16 and lr 1e-3."""
    defense = from_dict(DefenseConfig, {"train": {"max_steps": 2}})
    assert defense.train.lr == 1e-3 and defense.train.max_steps == 2
    demo = from_dict(DemoConfig, {"backdoor": {"epochs": 2}, "defense": {"train": {"max_length": 128}}})
    assert (demo.backdoor.epochs, demo.backdoor.lora_r, demo.backdoor.lr) == (2, 16, 1e-3)
    assert demo.defense.train.adapter_mode == "continue" and demo.defense.train.max_length == 128
    experiment = from_dict(ExperimentConfig, {"defense": {"crow": {"alpha": 11}}})
    assert experiment.defense.train.lr == 1e-3 and experiment.defense.crow.alpha == 11


def test_an_n_to_m_ratio_override_stays_text():
    """YAML 1.1 reads a bare 2:4 as the base-60 integer 124; on the command line it is a pattern."""
    from crowguard.config import parse_override

    assert parse_override("defense.prune.pattern=2:4") == (["defense", "prune", "pattern"], "2:4")
    assert parse_override("a.b=12") == (["a", "b"], 12)


def test_a_yaml_boolean_word_is_the_choice_it_spells():
    """YAML 1.1 reads off/on/no/yes as booleans: `--set defense.train.compile=off` (what the docs write) and an
    unquoted `compile: off` in a file gave False, refused as not one of the choices. A bool becomes the one choice
    it spells; where no choice (or more than one) spells it, it is still refused."""
    from crowguard.config import ConfigError, parse_override

    _, value = parse_override("defense.train.compile=off")
    assert value is False  # what YAML reads
    demo = from_dict(DemoConfig, {"defense": {"train": {"compile": value}}, "backdoor": {"compile": False}})
    assert demo.defense.train.compile == demo.backdoor.compile == "off"
    with pytest.raises(ConfigError, match="is not one of"):
        from_dict(DemoConfig, {"backdoor": {"compile": True}})  # "on" is no choice of compile
    with pytest.raises(ConfigError, match="is not one of"):
        from_dict(DemoConfig, {"backdoor": {"precision": False}})


def test_explain_shows_each_fields_own_default_not_its_types():
    """Issue 27's defect: `validate --explain` printed TrainConfig's lr 0.0002 for defense.train.lr (really 1e-3)."""
    from crowguard.config import explain
    from crowguard.schemas import DemoConfig, ExperimentConfig

    rows = {key: default for key, default, _ in explain(ExperimentConfig)}
    assert rows["defense.train.lr"] == "0.001" and rows["backdoor.lr"] == "0.0002"
    assert rows["defense.crow.alpha"] == "5.5"
    demo = {key: default for key, default, _ in explain(DemoConfig)}
    assert demo["backdoor.lora_r"] == "16" and demo["evaluate.max_new_tokens"] == "16"
