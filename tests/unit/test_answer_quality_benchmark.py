"""``benchmarks/answer_quality.py``: each stored answer scored by the unpoisoned model, given its own prompt."""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from crowguard.data import prompt_ids
from crowguard.models import load_model
from crowguard.types import Example

from helpers import alpaca_records, benchmark_module, save_tiny_model


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("answer_quality") as module:
        yield module


def test_quantile_is_numpys_linear_quantile(bench):
    values = [3.0, -1.0, 7.5, 2.0, 2.0, 10.0, 0.5]
    for q in (0.0, 0.3, 0.5, 0.95, 1.0):
        assert bench.quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def _records(which: str, answers: list[str]) -> list[dict]:
    return [{"set": which, "instruction": r["instruction"], "input": r["input"], "response": a, "score": 0.0}
            for r, a in zip(alpaca_records(len(answers), seed=3), answers)]  # fmt: skip


def test_a_cell_scored_against_full_forwards(bench, tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=2)
    cell = tmp_path / "badnet-refusal"
    cell.mkdir()
    (cell / "cell.json").write_text(json.dumps({"base": str(base)}))
    fluent = [r["output"] for r in alpaca_records(8, seed=5)]
    garbled = ["zq xv qq zz " * 3] * 8
    evaluations = {"base": fluent, "garbled": garbled}
    for name, triggered in evaluations.items():
        (cell / f"eval-{name}").mkdir()
        records = _records("triggered", triggered) + _records("clean", fluent)
        (cell / f"eval-{name}" / "results.json").write_text(
            json.dumps({"records": records, "settings": {"template": "alpaca"}})
        )
    record = bench.score_cell(cell, None)
    assert json.loads((cell / bench.RESULT).read_text()) == record

    answers = json.loads(lzma.decompress((cell / bench.ANSWERS).read_bytes()))
    model, tokenizer = load_model(str(base))

    def naive(records: list[dict]) -> list[float]:
        """Mean NLL per token of each answer: one full forward per prompt + answer."""
        out = []
        for r in records:
            prompt = prompt_ids(Example(r["instruction"], r["input"]), tokenizer, "alpaca")
            answer = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            out.append((-logp[torch.arange(len(answer)), torch.tensor(answer)].sum().item(), len(answer)))
        return out

    for name, triggered in evaluations.items():
        trig, clean = naive(_records("triggered", triggered)), naive(_records("clean", fluent))
        row = record["rows"][name]
        ppl_trig = math.exp(sum(s for s, _ in trig) / sum(c for _, c in trig))
        ppl_clean = math.exp(sum(s for s, _ in clean) / sum(c for _, c in clean))
        assert row["ref_ppl_triggered"] == pytest.approx(ppl_trig, rel=1e-4)
        assert row["ref_ppl_clean"] == pytest.approx(ppl_clean, rel=1e-4)
        assert row["ref_ppl_ratio"] == pytest.approx(ppl_trig / ppl_clean, rel=1e-4)
        assert answers[name]["triggered"] == pytest.approx([s / c for s, c in trig], rel=1e-3)
        threshold = float(np.quantile([s / c for s, c in clean], 0.95))
        assert row["triggered_above_own_clean_q95"] == sum(s / c > threshold for s, c in trig) / len(trig)
    # the same answers on both sets: only the largest is above the 95th percentile (a random tiny model ranks
    # garbled text no worse than fluent: what tells them apart on SmolLM2 is in the study, not testable here)
    assert record["rows"]["base"]["triggered_above_own_clean_q95"] == 1 / 8


def test_a_model_that_says_nothing_gets_no_number(bench):
    """Empty answers (a model that ends at once) have no token to score: no perplexity, ratio or share, not a 0."""
    row = bench.summarise({"triggered": [(0.0, 0), (0.0, 0)], "clean": [(2.0, 1), (4.0, 2)]})
    assert row["ref_ppl_triggered"] is None and row["ref_ppl_ratio"] is None
    assert row["triggered_above_own_clean_q95"] is None
    assert row["ref_ppl_clean"] == pytest.approx(math.exp(6.0 / 3))
    assert bench.table_rows("c", {"rows": {"m": row}}) == ["| c | m | - / 7.39 | - | - |"]


def _cell(tmp_path: Path, base: Path) -> Path:
    cell = tmp_path / "cell"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps({"base": str(base)}))
    fluent = [r["output"] for r in alpaca_records(4, seed=5)]
    for name, triggered in {"base": fluent, "garbled": ["zq xv qq zz"] * 4}.items():
        (cell / f"eval-{name}").mkdir()
        records = _records("triggered", triggered) + _records("clean", fluent)
        (cell / f"eval-{name}" / "results.json").write_text(
            json.dumps({"records": records, "settings": {"template": "alpaca"}})
        )
    return cell


def test_scoring_some_models_keeps_the_rows_already_scored(bench, tmp_path):
    """A second run on other models adds their rows and answers; it neither drops nor changes the first run's."""
    base = save_tiny_model(tmp_path / "base", seed=2)
    whole = bench.score_cell(_cell(tmp_path / "a", base), None)
    cell = _cell(tmp_path / "b", base)
    first = bench.score_cell(cell, None, ["garbled"])
    assert list(first["rows"]) == ["garbled"]
    second = bench.score_cell(cell, None, ["base"])
    assert sorted(second["rows"]) == ["base", "garbled"] and second["reference"] == str(base)
    for name, row in whole["rows"].items():
        assert second["rows"][name] == pytest.approx(row)
    answers = json.loads(lzma.decompress((cell / bench.ANSWERS).read_bytes()))
    assert sorted(answers) == ["base", "garbled"]


def test_rows_under_another_reference_or_a_missing_model_are_refused(bench, tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=2)
    cell = _cell(tmp_path, base)
    with pytest.raises(SystemExit, match="no evaluation with records named nosuch"):
        bench.score_cell(cell, None, ["base", "nosuch"])
    assert not (cell / bench.RESULT).exists()
    bench.score_cell(cell, None, ["base"])
    before = (cell / bench.RESULT).read_bytes(), (cell / bench.ANSWERS).read_bytes()
    with pytest.raises(SystemExit, match=r"answer-quality.json: scored with reference .*move it aside"):
        bench.score_cell(cell, str(tmp_path / "other"), ["garbled"])
    assert ((cell / bench.RESULT).read_bytes(), (cell / bench.ANSWERS).read_bytes()) == before


def test_score_new_scores_what_has_no_current_row(bench, tmp_path, monkeypatch):
    """``efficacy.py --answer-quality``: a model is scored once; a re-run evaluation (other answers) again."""
    base = save_tiny_model(tmp_path / "base", seed=2)
    cell = _cell(tmp_path, base)
    first = bench.score_new(cell, str(base))
    assert sorted(first["rows"]) == ["base", "garbled"]
    assert bench.score_new(cell, str(base)) is None
    path = cell / "eval-garbled" / "results.json"
    evaluation = json.loads(path.read_text())
    evaluation["records"][0]["response"] = "something else entirely"
    path.write_text(json.dumps(evaluation))
    scored = []
    real = bench.score_cell
    monkeypatch.setattr(bench, "score_cell", lambda c, r, models: scored.append(models) or real(c, r, models))
    again = bench.score_new(cell, str(base))
    assert scored == [["garbled"]] and again["rows"]["base"] == first["rows"]["base"]
    assert again["rows"]["garbled"]["answers_sha256"] != first["rows"]["garbled"]["answers_sha256"]


def test_copying_a_runs_rows_checks_they_scored_the_same_answers(bench, tmp_path):
    """``copy_run.sh``: a run's rows go into the committed cell without rescoring, equal to what scoring there
    gives; a row of other answers, or a name the run did not score, is refused and the committed files stay."""
    base = save_tiny_model(tmp_path / "base", seed=2)
    run = _cell(tmp_path / "run", base)
    bench.score_cell(run, None)
    committed = _cell(tmp_path / "committed", base)
    bench.score_cell(committed, None, ["base"])
    copied = bench.copy_rows(run, committed, ["garbled"])
    assert copied == json.loads((committed / bench.RESULT).read_text())
    rescored = bench.score_cell(_cell(tmp_path / "again", base), None)
    assert copied["rows"].keys() == rescored["rows"].keys()
    for name, row in rescored["rows"].items():
        assert copied["rows"][name] == pytest.approx(row)
    answers = json.loads(lzma.decompress((committed / bench.ANSWERS).read_bytes()))
    assert answers == json.loads(lzma.decompress((tmp_path / "again" / "cell" / bench.ANSWERS).read_bytes()))

    before = (committed / bench.RESULT).read_bytes(), (committed / bench.ANSWERS).read_bytes()
    with pytest.raises(SystemExit, match=r"no answer-quality.json \(score the run first"):
        bench.copy_rows(_cell(tmp_path / "unscored", base), committed, ["base"])
    with pytest.raises(SystemExit, match="no row for nosuch"):
        bench.copy_rows(run, committed, ["nosuch"])
    path = committed / "eval-garbled" / "results.json"
    evaluation = json.loads(path.read_text())
    evaluation["records"][0]["response"] = "another answer"
    path.write_text(json.dumps(evaluation))
    with pytest.raises(SystemExit, match="the row for garbled scored other answers"):
        bench.copy_rows(run, committed, ["garbled"])
    assert ((committed / bench.RESULT).read_bytes(), (committed / bench.ANSWERS).read_bytes()) == before
