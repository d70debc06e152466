"""A defense is one module + one registry line: config loading, ``validate --explain``, ``ls``, the CLI's flags and
``--set`` keys and ``defend`` work for a defense no crowguard file knows about."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from crowguard import config
from crowguard.cli import main
from crowguard.registry import DEFENSES
from crowguard.schemas import ExperimentConfig

TOY = '''
"""A toy weight-free defense for the plug-in test: writes its settings and the number of clean samples."""
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from crowguard.config import knob, to_dict
from crowguard.defenses.base import Defense, DefenseResult


@dataclass
class ToyConfig:
    strength: float = knob(1.0, "how hard the toy defends")
    mode: Literal["soft", "hard"] = knob("soft", "the toy's mode")

    def validate(self):
        if self.strength < 0:
            raise ValueError("strength must not be negative")


class ToyDefense(Defense):
    name = "toy"
    kind = "weights"
    Config = ToyConfig

    def run(self, model, clean_data, ctx):
        from crowguard.stage import stage_artefact

        summary = {"defense": self.name, "n_clean": len(clean_data), "settings": to_dict(self.settings)}
        with stage_artefact("defend:toy", Path(ctx.out_dir), 0, {"model": model.name_or_path}, summary,
                            ctx.resolved_config, ctx.overwrite, summary_name="defense_summary.json") as tmp:
            (tmp / "toy.json").write_text("{}")
        return DefenseResult(model_path=str(ctx.out_dir), summary=summary)
'''


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "toy_defense.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(DEFENSES, "toy", "toy_defense:ToyDefense")
    return "toy"


def test_a_new_defense_gets_its_config_section_without_schema_edits(toy: str):
    cfg = config.load(ExperimentConfig, None, ["defense.method=toy", "defense.toy.strength=2.5"])
    assert cfg.defense.section("toy").strength == 2.5 and cfg.defense.toy.mode == "soft"
    assert config.to_dict(cfg.defense)["toy"] == {"strength": 2.5, "mode": "soft"}
    with pytest.raises(config.ConfigError, match=r"defense\.toy.*strength must not be negative"):
        config.load(ExperimentConfig, None, ["defense.toy.strength=-1"])
    with pytest.raises(config.ConfigError, match=r"defense\.toy\.mode.*'medium' is not one of"):
        config.load(ExperimentConfig, None, ["defense.toy.mode=medium"])
    with pytest.raises(config.ConfigError, match=r"unknown key 'defense\.toyy' \(did you mean 'toy'\?\)"):
        config.load(ExperimentConfig, None, ["defense.toyy.strength=1"])


def test_explain_ls_and_round_trip_list_the_new_defense(toy: str, tmp_path: Path, capsys):
    assert main(["validate", "--explain"]) == 0
    assert "defense.toy.strength" in capsys.readouterr().out
    assert main(["ls", "defenses"]) == 0
    assert "toy" in capsys.readouterr().out
    cfg = config.load(ExperimentConfig, None, ["defense.toy.mode=hard"])
    config.save(cfg, tmp_path / "saved.yaml")
    assert config.load(ExperimentConfig, tmp_path / "saved.yaml") == cfg


def test_defend_runs_the_new_defense_with_a_generated_flag(toy: str, tmp_path: Path, capsys):
    data = tmp_path / "clean.json"
    data.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": "a"} for i in range(5)]))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    argv = ["defend", "--method", "toy", "--model", str(model), "--data", str(data), "--n-samples", "3",
            "--toy-strength", "4", "--set", "defense.toy.mode=hard", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "defense_summary.json").read_text())
    assert summary == {"defense": "toy", "n_clean": 3, "settings": {"strength": 4.0, "mode": "hard"}}
    assert (out / "manifest.json").is_file() and (out / "config.yaml").is_file()


def test_every_knob_of_every_section_has_a_flag_that_sets_it(capsys):
    from crowguard.cli import build_parser, schema_values

    parser = build_parser()
    defend = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "defend")[1]
    dests = {a.dest for a in defend._actions}
    for key, _, _ in config.explain(ExperimentConfig):
        if key.startswith("defense."):
            assert f"cfg.{key}" in dests, key
    args = parser.parse_args(["defend", "--crow-alpha", "11", "--lr", "5e-4", "--crow-layers", "[3, 4]"])
    assert schema_values(args) == {"defense.crow.alpha": 11.0, "defense.train.lr": 5e-4, "defense.crow.layers": [3, 4]}
    with pytest.raises(SystemExit):  # no abbreviations: a prefix of a generated flag is an error, not a guess
        parser.parse_args(["defend", "--crow-alph", "11"])
