"""Aggregation over defense seeds: mean, spread and every seed's value, never one seed standing for a method."""

from __future__ import annotations

import statistics

import pytest

from crowguard.evaluation.report import over_seeds, seeds_table


def test_over_seeds_matches_statistics_and_keeps_every_value():
    rows = [
        {"defense": "none", "seed": None, "asr_trigger": 0.97},
        {"defense": "crow", "seed": 0, "asr_trigger": 0.29, "target_nll_gap": 2.36},
        {"defense": "crow", "seed": 1, "asr_trigger": 0.26, "target_nll_gap": 2.29},
        {"defense": "crow", "seed": 2, "asr_trigger": 0.40, "target_nll_gap": None},
        {"defense": "finetune", "seed": 0, "asr_trigger": 0.30},  # one seed: nothing to aggregate
    ]
    (crow,) = over_seeds(rows, ["asr_trigger", "target_nll_gap"])
    assert crow["defense"] == "crow" and crow["seeds"] == [0, 1, 2]
    values = [0.29, 0.26, 0.40]
    assert crow["asr_trigger"]["values"] == values
    assert crow["asr_trigger"]["mean"] == pytest.approx(statistics.mean(values))
    assert crow["asr_trigger"]["sd"] == pytest.approx(statistics.stdev(values))
    assert crow["target_nll_gap"]["values"] == [2.36, 2.29]  # a missing value is left out, not counted as 0
    table = seeds_table([crow], [("asr_trigger", "ASR"), ("target_nll_gap", "gap")])
    assert "| crow (0,1,2) | 31.7% +- 7.4% (29.0%/26.0%/40.0%) |" in table
