"""Numbers never lie (issue 29, item 1): a non-finite setting, a diverging training run or a broken model ends in
one line and exit 2, never in a saved model or a reported rate. Each case here passed silently before the fix
(``defend --lr inf`` exited 0 with a nan adapter, and ``evaluate`` reported that model's ASR as 0%)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crowguard.cli import main

from helpers import alpaca_records, save_tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("numbers")
    save_tiny_model(root / "base", layers=2)
    (root / "data.json").write_text(json.dumps(alpaca_records(24)))
    (root / "prompts.json").write_text(json.dumps(alpaca_records(6, seed=1)))
    (root / "clean.json").write_text(json.dumps(alpaca_records(6, seed=2)))
    return root


def _one_line_error(capsys, *needles: str) -> str:
    lines = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
    err = lines[-1]  # after any loading progress bar: the error, on one line, and no traceback anywhere
    assert err.startswith("crowguard: error:") and not any("Traceback" in line for line in lines), lines
    for needle in needles:
        assert needle in err, err
    return err


def _defend(root: Path, out: str, *extra: str) -> int:
    return main(["defend", "--method", "finetune", "--model", str(root / "base"), "--data", str(root / "data.json"),
                 "--n-samples", "8", "--out", str(root / out), "--quiet", "--max-steps", "3", *extra])  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [
        ("--lr", "inf", "lr"),
        ("--lr", "nan", "lr"),
        ("--weight-decay", "nan", "weight_decay"),
        ("--lora-dropout", "1.5", "lora_dropout"),
        ("--max-grad-norm", "-1", "max_grad_norm"),
        ("--max-steps", "-2", "max_steps"),
        ("--warmup-ratio", "inf", "warmup_ratio"),
    ],
)
def test_a_non_finite_or_out_of_range_training_setting_is_one_line_before_loading(root, capsys, flag, value, key):
    assert _defend(root, f"out-{key}-{value}", flag, value) == 2
    _one_line_error(capsys, key)
    assert not (root / f"out-{key}-{value}").exists()
    assert not (root / f".out-{key}-{value}.work").exists()  # refused before anything was made


def test_a_diverging_run_stops_with_one_line_and_saves_no_model(root, capsys):
    """lr 1e30 is finite and in range, so only the training guard can catch it: the first update overflows."""
    assert _defend(root, "diverged", "--lr", "1e30") == 2
    _one_line_error(capsys, "training diverged", "nothing was saved")
    assert not (root / "diverged").exists()
    assert not (root / ".diverged.work").exists() and not (root / ".diverged.lock").exists()  # no checkpoint: no .work


def test_evaluate_refuses_a_model_with_a_nan_weight(root, capsys):
    broken = root / "broken"
    shutil.copytree(root / "base", broken)
    weights = load_file(broken / "model.safetensors")
    name = next(n for n in weights if "mlp" in n)
    weights[name][0, 0] = math.nan
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    prompts, clean = str(root / "prompts.json"), str(root / "clean.json")
    rc = main(["evaluate", "--model", str(broken), "--triggered", prompts, "--clean", clean, "--payload",
               "negsentiment", "--max-new-tokens", "4", "--out", str(root / "eval-broken"), "--quiet"])  # fmt: skip
    assert rc == 2
    _one_line_error(capsys, "not finite", name.removesuffix(".weight"))
    assert not (root / "eval-broken").exists()


def test_validate_refuses_nan_and_inf_in_yaml_and_reads_1e_3_as_a_number(tmp_path, capsys):
    for text, key in [("defense:\n  crow:\n    alpha: .nan\n", "alpha"), ("backdoor:\n  lr: .inf\n", "lr")]:
        path = tmp_path / f"{key}.yaml"
        path.write_text(text)
        assert main(["validate", str(path)]) == 2
        _one_line_error(capsys, f"{key}", "finite")
    path = tmp_path / "ok.yaml"
    path.write_text("backdoor:\n  lr: 1e-3\n")  # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    from crowguard import config
    from crowguard.schemas import ExperimentConfig

    assert config.load(ExperimentConfig, path).backdoor.lr == 1e-3


def test_evaluation_settings_out_of_range_are_refused(root, capsys):
    prompts = str(root / "prompts.json")
    for flag, value in [("--hijack-min-share", "2"), ("--bootstrap", "0"), ("--limit", "-1")]:
        rc = main(["evaluate", "--model", str(root / "base"), "--triggered", prompts, "--clean", prompts,
                   flag, value, "--out", str(root / "eval-range")])  # fmt: skip
        assert rc == 2, flag
        _one_line_error(capsys, flag.removeprefix("--").replace("-", "_"))
    assert not (root / "eval-range").exists()


def test_json_outputs_refuse_a_bare_nan(tmp_path):
    from crowguard.io import write_json_atomic
    from crowguard.types import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"metrics\.gap"):
        write_json_atomic(tmp_path / "r.json", {"metrics": {"asr": 0.0, "gap": math.nan}})
    with pytest.raises(NonFiniteError, match=r"rows\[1\]"):
        write_json_atomic(tmp_path / "r.json", {"rows": [1.0, math.inf]})
    assert not (tmp_path / "r.json").exists()
    write_json_atomic(tmp_path / "r.json", {"metrics": {"asr": 0.0, "gap": None}})
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["gap"] is None
    table = {"rows": [{"cell": "a", "asr": 0.5, "gap": None}, {"cell": "é", "asr": 1.0}], "paired": []}
    with pytest.raises(NonFiniteError, match=r"rows\[1\]\.asr"):
        write_json_atomic(tmp_path / "t.json", {"rows": [{"asr": 0.5}, {"asr": math.nan}]}, rows=True)
    write_json_atomic(tmp_path / "t.json", table, rows=True)  # one row per line, the same JSON
    text = (tmp_path / "t.json").read_text()
    assert json.loads(text) == table and '  {"cell": "é", "asr": 1.0}' in text.splitlines()


def test_the_guard_names_the_first_non_finite_tensor():
    from crowguard.losses import first_non_finite

    ok = torch.ones(3, 4)
    assert first_non_finite([("a", ok), ("b", ok * 2)]) is None
    assert first_non_finite([("a", ok), ("b", torch.tensor([1.0, math.inf])), ("c", torch.tensor(math.nan))]) == "b"
    assert first_non_finite([]) is None


def test_a_fresh_run_sets_a_killed_runs_checkpoints_aside_so_resume_cannot_continue_them(root, capsys):
    """Issue 29's stale resume: a killed lr-1e-3 run left checkpoint-5 in .work; a fresh lr-5e-4 run used to keep it
    (rotation then deleted the new run's own), and a later --resume continued the old run under the new label."""
    work = root / ".fresh.work"
    (work / "checkpoint-5").mkdir(parents=True)
    (work / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (work / "run_settings.json").write_text(json.dumps({"train": {"lr": 1e-3}}))
    with pytest.warns(UserWarning, match="earlier run's files"):
        assert _defend(root, "fresh", "--lr", "5e-4", "--set", "defense.train.save_steps=1") == 0
    aside = [p for p in root.glob(".fresh.work.stale-*") if p.is_dir()]
    assert len(aside) == 1 and (aside[0] / "checkpoint-5" / "trainer_state.json").is_file()  # kept, not deleted
    assert not work.exists()  # the fresh run finished and removed its own work directory
    summary = json.loads((root / "fresh" / "train_summary.json").read_text())
    assert summary["steps"] == 3


def test_remote_code_is_never_silent(root, capsys):
    """Issue 29: `trust_remote_code: true` ran the model folder's Python with no warning (allow_pickle warned)."""
    from crowguard.models import load_model

    with pytest.warns(UserWarning, match="trust_remote_code is set: the Python files in"):
        load_model(str(root / "base"), trust_remote_code=True)
    config = root / "remote.yaml"
    config.write_text(f"model:\n  name_or_path: {root / 'base'}\n  trust_remote_code: true\n")
    prompts, clean = str(root / "prompts.json"), str(root / "clean.json")
    with pytest.warns(UserWarning, match="trust_remote_code is set"):
        rc = main(["evaluate", "--config", str(config), "--triggered", prompts, "--clean", clean,
                   "--max-new-tokens", "2", "--out", str(root / "eval-remote"), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
