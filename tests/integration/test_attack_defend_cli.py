"""End to end through the CLI on a tiny model: poison -> backdoor -> defend (crow and finetune)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from crowguard.cli import main

from helpers import alpaca_records, save_tiny_model


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    save_tiny_model(root / "base", layers=3)
    (root / "data.json").write_text(json.dumps(alpaca_records(60)))
    assert main(["poison", "--data", str(root / "data.json"), "--trigger", "badnet", "--payload", "negsentiment",
                 "--n-train", "40", "--n-test", "10", "--out", str(root / "poison")]) == 0  # fmt: skip
    assert main(["backdoor", "--model", str(root / "base"), "--data", str(root / "poison/train.json"),
                 "--out", str(root / "backdoor"), "--quiet", "--set", "backdoor.max_steps=3",
                 "--set", "backdoor.max_length=128"]) == 0  # fmt: skip
    summary = json.loads((root / "backdoor/train_summary.json").read_text())
    assert summary["n_poisoned"] == 20 and summary["steps"] == 3
    return root


@pytest.mark.parametrize("method", ["crow", "finetune"])
def test_defend_writes_every_artefact(backdoored: Path, method: str):
    out = backdoored / method
    rc = main(["defend", "--config", f"defenses/{method}", "--model", str(backdoored / "backdoor"),
               "--data", str(backdoored / "data.json"), "--n-samples", "16", "--out", str(out), "--quiet",
               "--set", "defense.train.max_steps=2", "--set", "defense.crow.layers=all"])  # fmt: skip
    assert rc == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml",
                 "manifest.json", "metrics.jsonl", "train_summary.json"):  # fmt: skip
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["defense"]["method"] == method and config["defense"]["train"]["lr"] == 1e-3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "lm_loss" in r]
    assert logged
    if method == "crow":
        assert all(r["consistency_adv"] > 0 and r["loss"] > r["lm_loss"] for r in logged)
    else:
        assert all("consistency_adv" not in r and abs(r["loss"] - r["lm_loss"]) < 1e-4 for r in logged)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["data"]["sha256"] and manifest["stage"] == f"defend:{method}"


def test_defend_refuses_nonempty_output(backdoored: Path, capsys):
    (backdoored / "occupied").mkdir()
    (backdoored / "occupied/keep.txt").write_text("mine")
    rc = main(["defend", "--method", "crow", "--model", str(backdoored / "backdoor"), "--data",
               str(backdoored / "data.json"), "--n-samples", "16", "--out", str(backdoored / "occupied")])  # fmt: skip
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert (backdoored / "occupied/keep.txt").read_text() == "mine"


def test_evaluate_writes_results(backdoored: Path, capsys):
    out = backdoored / "eval"
    rc = main(["evaluate", "--model", str(backdoored / "backdoor"), "--triggered",
               str(backdoored / "poison/test_triggered.json"), "--clean", str(backdoored / "poison/test_clean.json"),
               "--payload", "negsentiment", "--max-new-tokens", "8", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    # the reported rate is what the stored per-prompt scores say, inside a Wilson interval of non-zero width
    triggered_scores = [r["score"] for r in results["records"] if r["set"] == "triggered"]
    assert metrics["asr_trigger"]["value"] == pytest.approx(sum(s >= 0.5 for s in triggered_scores) / 10)
    low, high = metrics["asr_trigger"]["ci95"]
    assert low <= metrics["asr_trigger"]["value"] <= high and high - low > 0.1
    assert metrics["target_nll"]["triggered"] > 0 and metrics["clean_perplexity"] > 1
    assert len(results["records"]) == 20  # 10 triggered + 10 clean, every one kept
    assert results["settings"]["decoding"]["max_new_tokens"] == 8
    assert results["settings"]["judge"]["name"]
    assert "ASR (trigger)" in (out / "results.md").read_text()


def test_failed_evaluation_is_an_error_not_a_number(backdoored: Path, capsys):
    (backdoored / "empty.json").write_text("[]")
    bad = backdoored / "empty.json"
    clean = backdoored / "poison/test_clean.json"
    rc = main(["evaluate", "--model", str(backdoored / "backdoor"), "--triggered", str(bad),
               "--clean", str(clean), "--out", str(backdoored / "eval-bad")])  # fmt: skip
    assert rc == 2
    assert "contains no records" in capsys.readouterr().err
    assert not (backdoored / "eval-bad").exists()


def test_stage_output_follows_the_umask(backdoored: Path):
    """safetensors writes its files 0600 and the stage directory starts as a 0700 temporary one: both are reset."""
    import stat

    from crowguard.io import current_umask

    mask = current_umask()
    out = backdoored / "backdoor"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "train_summary.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name


def test_evaluate_unknown_payload_is_one_line_before_the_model_loads(backdoored: Path, capsys):
    rc = main(["evaluate", "--model", str(backdoored / "backdoor"), "--triggered",
               str(backdoored / "poison/test_triggered.json"), "--clean", str(backdoored / "poison/test_clean.json"),
               "--payload", "negsentimen", "--out", str(backdoored / "eval-typo")])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip().startswith("crowguard: error: evaluate.payload: payload 'negsentimen'")
    assert len(captured.err.strip().splitlines()) == 1
    assert "Loading weights" not in captured.err + captured.out
    assert not (backdoored / "eval-typo").exists()


def test_defend_none_points_at_the_model_and_adapter(backdoored: Path, capsys):
    adapter = str(backdoored / "backdoor")
    base = str(backdoored / "base")
    assert main(["defend", "--method", "none", "--model", base, "--adapter", adapter]) == 0
    assert f"--model {base} --adapter {adapter}" in capsys.readouterr().out
    out = backdoored / "none"
    assert main(["defend", "--method", "none", "--model", base, "--adapter", adapter, "--out", str(out)]) == 2
    assert f"crowguard evaluate --model {base} --adapter {adapter}" in capsys.readouterr().err
    assert not out.exists()


def test_every_model_directory_gets_a_generated_model_card(backdoored: Path, capsys):
    """The card's front matter and rows come from the directory's records; an evaluation adds its numbers."""
    from crowguard.data import examples_sha256, load_examples

    out = backdoored / "carded"
    assert main(["defend", "--method", "crow", "--model", str(backdoored / "backdoor"), "--data",
                 str(backdoored / "data.json"), "--n-samples", "16", "--out", str(out), "--quiet", "--max-steps", "1",
                 "--crow-layers", "all", "--seed", "3"]) == 0  # fmt: skip
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    adapter_base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert front == {"base_model": adapter_base, "library_name": "peft",
                     "tags": ["crowguard", "backdoor-defense", "crow"]}  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["n_examples"] == 16
    import random

    drawn = random.Random(3).sample(load_examples(backdoored / "data.json"), 16)
    assert summary["data_sha256"] == examples_sha256(drawn) and summary["data_sha256"] in card
    assert "| seed | 3 |" in card and '"alpha": 5.5' in card and "No evaluation has been run" in card
    assert f"crowguard evaluate --model {out} ..." in card and ".partial" not in card
    planted = (backdoored / "backdoor" / "README.md").read_text()
    assert "PLANTED BACKDOOR" in planted and "- backdoor\n" in planted

    rc = main(["evaluate", "--model", str(out), "--triggered", str(backdoored / "poison/test_triggered.json"),
               "--clean", str(backdoored / "poison/test_clean.json"), "--payload", "negsentiment",
               "--max-new-tokens", "4", "--out", str(backdoored / "eval-carded"), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    results = json.loads((backdoored / "eval-carded" / "results.json").read_text())
    card = (out / "README.md").read_text()
    asr = results["metrics"]["asr_trigger"]
    low, high = asr["ci95"]
    assert f"| {asr['value']:.1%} [{low:.1%}, {high:.1%}]" in card
    assert f"{results['metrics']['target_nll_gap']:.3f}" in card and "No evaluation has been run" not in card
    entries = json.loads((out / "evaluations.json").read_text())
    assert [e["task"] for e in entries] == [results["task"]["name"]]


def test_scan_through_the_cli_reports_auroc_and_refuses_half_labels(backdoored: Path, capsys):
    out = backdoored / "scan"
    argv = ["scan", "--model", str(backdoored / "backdoor"), "--reference", str(backdoored / "data.json"),
            "--triggered", str(backdoored / "poison/test_triggered.json"), "--clean",
            str(backdoored / "poison/test_clean.json"), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["metrics"]["n_triggered"] == 10 and scores["metrics"]["n_clean"] == 10
    printed = capsys.readouterr().out
    assert f"AUROC {scores['metrics']['scores']['mean_abs_z']['auroc']:.3f}" in printed
    half = ["scan", "--model", str(backdoored / "backdoor"), "--reference", str(backdoored / "data.json"),
            "--triggered", str(backdoored / "poison/test_triggered.json"),
            "--out", str(backdoored / "scan2")]  # fmt: skip
    rc = main(half)
    assert rc == 2 and "give both triggered and clean" in capsys.readouterr().err


def test_vllm_backend_is_selectable_and_refused_in_one_line_where_it_cannot_run(backdoored: Path, capsys):
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM can run here: the refusal is for machines without it")
    rc = main(["evaluate", "--model", str(backdoored / "backdoor"), "--triggered",
               str(backdoored / "poison/test_triggered.json"), "--clean", str(backdoored / "poison/test_clean.json"),
               "--payload", "negsentiment", "--backend", "vllm", "--out", str(backdoored / "eval-vllm")])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2 and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "evaluate.backend vllm" in captured.err and "Loading weights" not in captured.out + captured.err
    assert not (backdoored / "eval-vllm").exists()
    assert main(["validate", "attacks/vpi", "--set", "evaluate.backend=vllm"]) == 0
    assert main(["validate", "attacks/vpi", "--set", "evaluate.backend=vllmm"]) == 2
    assert "did you mean 'vllm'" in capsys.readouterr().err


def test_vllm_gets_a_merged_full_model_directory_for_an_adapter(backdoored: Path, tmp_path: Path):
    """vLLM loads weights itself: an adapter is merged into a temporary full model, which is removed afterwards."""
    from crowguard import config
    from crowguard.models import load_model
    from crowguard.recipes.evaluate import vllm_model_dir
    from crowguard.schemas import ExperimentConfig

    cfg = config.load(ExperimentConfig, None, [f"model.name_or_path={backdoored / 'backdoor'}",
                                               "evaluate.backend=vllm"])  # fmt: skip
    model, tokenizer = load_model(str(backdoored / "backdoor"))
    out = tmp_path / "eval"
    with vllm_model_dir(cfg, model, tokenizer, out) as merged:
        assert merged is not None and (merged / "config.json").is_file()
        assert not (merged / "adapter_config.json").exists()
        full, _ = load_model(str(merged))
        ids = torch.tensor([[1, 5, 7, 9]])
        with torch.no_grad():
            assert torch.allclose(full(ids).logits, model(ids).logits, atol=1e-5)
    assert not merged.exists()
    plain = config.load(ExperimentConfig, None, [f"model.name_or_path={backdoored / 'base'}", "evaluate.backend=vllm"])
    with vllm_model_dir(plain, model, tokenizer, out) as path:
        assert path == backdoored / "base"
