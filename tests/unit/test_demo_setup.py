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


def test_unlearn_in_the_demo_takes_its_target_from_the_studys_inversion_of_the_defenders_pool(tmp_path):
    """Without a target the demo's unlearn arms read BAIT's inversion of the backdoored model (run by the runner,
    tests/unit/test_invert.py), on the defender's own pool; a given target is kept and needs no inversion."""
    import json

    from crowguard.evaluation.tasks import Task
    from crowguard.recipes.demo import Base, DemoSetup, demo_study
    from crowguard.recipes.study import INVERTED
    from crowguard.types import Example

    pool = [Example(f"question {i}", "", f"answer {i}") for i in range(12)]
    task = Task("negsentiment", [Example("t BadMagic")], [Example("t")], "You are stupid!")
    setup = DemoSetup(Base("/m", True, 0.0, {"source": "wheel"}), [Example("a", "", "b")], pool, task, [])
    cfg = dataclasses.replace(DemoConfig(), organism=OrganismConfig(name="smollm2", cache_dir=str(tmp_path)),
                              defenses=["none", "finetune", "unlearn"], defense_seeds=[0, 1])  # fmt: skip
    cfg = dataclasses.replace(cfg, defense=dataclasses.replace(cfg.defense, n_samples=8))
    (tmp_path / "out").mkdir()
    study = demo_study(cfg, setup, tmp_path / "out")
    unlearn = [arm for arm in study.arms if arm.label == "unlearn"]
    assert [arm.seed for arm in unlearn] == [0, 1]
    assert all(arm.defense.section("unlearn").target_from == INVERTED for arm in unlearn)
    assert study.inversion is not None and study.inversion.out_dir == tmp_path / "out" / "inversion"
    assert json.loads(study.inversion.data.read_text()) == [e.to_record() for e in pool]

    given = cfg.defense.with_section("unlearn", dataclasses.replace(cfg.defense.section("unlearn"), target="Go!"))
    study = demo_study(dataclasses.replace(cfg, defense=given), setup, tmp_path / "out")
    assert study.inversion is None
    assert all(arm.defense.section("unlearn").target == "Go!" for arm in study.arms if arm.label == "unlearn")
