"""Stages check what a user can get wrong before any model loads, and say it in one line (exit code 2).

A directory that exists but holds no model stands in for a model here: a stage that got as far as loading it would
fail with "cannot load model", so any other error proves the check came first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowguard.cli import main
from crowguard.models import ModelLoadError, check_model_exists, load_model

GOOD = json.dumps([{"instruction": f"tell me about topic number {i}", "output": "ok"} for i in range(30)])


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """``not-a-model/`` (looks like a model directory, loads nothing), ``data.json``, and an occupied output directory
    ``occupied/``."""
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    (tmp_path / "data.json").write_text(GOOD)
    (tmp_path / "clean.json").write_text(GOOD.replace("topic", "subject"))  # other prompts than data.json's
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("mine")
    return tmp_path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crowguard: error: "), err
    assert "Traceback" not in err and "cannot load model" not in err, err
    return err


def _evaluate(files: Path, *extra: str, model: str | None = None, out: str = "eval") -> list[str]:
    data, clean = str(files / "data.json"), str(files / "clean.json")
    return ["evaluate", "--model", model or str(files / "not-a-model"), "--triggered", data, "--clean", clean,
            "--out", str(files / out), "--quiet", *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------ missing model paths
@pytest.mark.parametrize(
    "ref", ["./typo", "typo-model", "../models/typo", "/no/such/model", "~/no-such-model", "a/b/c"]
)
def test_a_missing_model_path_is_named(files: Path, capsys, ref: str):
    assert main(_evaluate(files, model=ref)) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"crowguard: error: model path {ref!r} does not exist"), err
    assert "huggingface.co" not in err and "Repo id" not in err
    assert not (files / "eval").exists()


@pytest.mark.parametrize("command", ["backdoor", "defend", "diagnose"])
def test_every_model_command_names_a_missing_model_path(files: Path, capsys, command: str):
    data, out, ok = str(files / "data.json"), str(files / "o"), f"ok={files / 'not-a-model'}"
    args = {
        "backdoor": ["--model", "./typo", "--data", data],
        "defend": ["--method", "crow", "--model", "./typo", "--data", data],
        # the second model is checked before the first one loads
        "diagnose": ["--model", ok, "--model", "bad=./typo", "--triggered", data, "--clean", data],
    }[command]
    assert main([command, *args, "--out", out]) == 2
    assert "model path './typo' does not exist" in _one_line_error(capsys)
    assert not (files / "o").exists()


def test_load_model_names_a_missing_path_and_a_moved_base(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"^model path './typo' does not exist$"):
        load_model("./typo")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "moved")}))
    with pytest.raises(ModelLoadError, match=r"does not exist \(the base model named in .*adapter_config.json\)$"):
        load_model(str(adapter))


def test_a_missing_adapter_path_is_named(files: Path, capsys):
    assert main(_evaluate(files, "--adapter", str(files / "no-adapter"))) == 2
    assert f"adapter path '{files / 'no-adapter'}' does not exist" in _one_line_error(capsys)


def test_hub_ids_are_left_to_the_hub_when_online_and_to_the_cache_offline(tmp_path: Path, monkeypatch):
    import huggingface_hub

    with pytest.raises(ModelLoadError, match="not in the Hub cache"):  # the tests run offline
        check_model_exists("owner/no-such-model")
    # A model in the Hub cache loads offline: the cache's own layout, refs/main -> snapshots/<commit>/config.json.
    repo = tmp_path / "hub" / "models--owner--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model_exists("owner/cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    check_model_exists("owner/no-such-model")  # online: a valid Hub id is for from_pretrained to fetch
    check_model_exists("gpt2")
    with pytest.raises(ModelLoadError, match=r"model path '\./owner/name' does not exist"):
        check_model_exists("./owner/name")  # a path, never a Hub id


# ---------------------------------------------------------------------------------- evaluate: checks come first
def test_evaluate_refuses_an_occupied_output_before_loading_the_model(files: Path, capsys):
    assert main(_evaluate(files, out="occupied")) == 2
    assert "occupied: directory is not empty" in _one_line_error(capsys)
    assert (files / "occupied" / "keep.txt").read_text() == "mine"


def test_evaluate_rejects_an_unknown_payload_before_loading_the_model(files: Path, capsys):
    assert main(_evaluate(files, "--payload", "negsentimen")) == 2
    err = _one_line_error(capsys)
    assert "evaluate.payload: payload 'negsentimen' has no built-in judge" in err
    assert "did you mean 'negsentiment'" in err


EXTRA_FILES = [
    ("--humaneval", "HumanEval.jsonl", None, ["cannot read evaluate.humaneval", "No such file"]),
    ("--humaneval", "HumanEval.jsonl", '{"task_id": "x"}\n', ["lacks entry_point, prompt, test"]),
    ("--utility", "utility.json", "[]", ["contains no records"]),
]


@pytest.mark.parametrize(("flag", "name", "content", "words"), EXTRA_FILES)
def test_evaluate_checks_extra_files_before_loading_the_model(files: Path, capsys, flag, name, content, words):
    path = files / name
    if content is not None:
        path.write_text(content)
    assert main(_evaluate(files, flag, str(path))) == 2
    err = _one_line_error(capsys)
    assert str(path) in err
    for word in words:
        assert word in err, err


# ------------------------------------------------------------------------------------------------ defend none
def test_defend_none_refuses_out_and_writes_nothing(files: Path, capsys):
    out = files / "none-out"
    assert main(["defend", "--method", "none", "--model", str(files / "not-a-model"), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "defense 'none' trains and writes nothing" in err and "drop --out" in err
    assert f"crowguard evaluate --model {files / 'not-a-model'}" in err
    assert not out.exists()


def test_defend_none_names_the_model_and_adapter_it_leaves_as_they_are(files: Path, capsys):
    model, adapter = str(files / "not-a-model"), str(files / "occupied")
    assert main(["defend", "--method", "none", "--model", model, "--adapter", str(files / "gone")]) == 2
    assert f"adapter path '{files / 'gone'}' does not exist" in _one_line_error(capsys)
    assert main(["defend", "--method", "none", "--model", model, "--adapter", adapter]) == 0
    assert f"evaluate the model as given: --model {model} --adapter {adapter}" in capsys.readouterr().out


def test_defend_with_a_training_method_needs_out(files: Path, capsys):
    args = ["defend", "--method", "crow", "--model", str(files / "not-a-model"), "--data", str(files / "data.json")]
    assert main(args) == 2
    assert "--out is required" in _one_line_error(capsys)
