"""The demo's setup: its up-front refusals, and its plant's place in the cache (content-addressed by fingerprint)."""

from __future__ import annotations

import dataclasses

import pytest

from crowguard.config import ConfigError
from crowguard.schemas import DemoConfig, OrganismConfig


def test_the_plant_is_addressed_by_everything_that_makes_it(tmp_path):
    """The study's plant directory carries the fingerprint: the template, a plant setting or the mix change it;
    the defenses' seeds do not."""
    from crowguard.evaluation.tasks import Task
    from crowguard.recipes.demo import Base, DemoSetup, demo_study
    from crowguard.recipes.study import Runner, suspect_fingerprint
    from crowguard.types import Example

    mix = [Example("a", "", "b")]
    task = Task("negsentiment", [Example("t BadMagic")], [Example("t")], "You are stupid!")
    setup = DemoSetup(Base("/m", True, 0.0, {"source": "wheel"}), mix, [], task, [])
    cfg = dataclasses.replace(DemoConfig(), organism=OrganismConfig(name="smollm2", cache_dir=str(tmp_path)))

    def plant_print(c: DemoConfig, s: DemoSetup = setup) -> str:
        study = demo_study(c, s, tmp_path / "out", arms=False)
        assert study.plant is not None and "{fp}" in str(study.plant.out_dir)
        return suspect_fingerprint(study)

    first = plant_print(cfg)
    assert plant_print(dataclasses.replace(cfg, defense_seeds=[3, 4])) == first
    assert plant_print(dataclasses.replace(cfg, template="chat")) != first
    assert plant_print(dataclasses.replace(cfg, backdoor=dataclasses.replace(cfg.backdoor, lr=5e-4))) != first
    assert plant_print(cfg, dataclasses.replace(setup, mix=[Example("a", "", "c")])) != first
    assert Runner(tmp_path, True).place(tmp_path / "x-{fp}", first) == tmp_path / f"x-{first[:16]}"


def test_chat_template_on_the_tiny_organism_is_refused_before_anything_trains(tmp_path):
    from crowguard.recipes.demo import prepare

    cfg = dataclasses.replace(
        DemoConfig(), template="chat", organism=OrganismConfig(name="tiny", cache_dir=str(tmp_path))
    )
    with pytest.raises(ConfigError, match="template chat needs an organism with a chat template"):
        prepare(cfg, show_progress=False)
    assert not any(tmp_path.iterdir())  # nothing was trained or written
