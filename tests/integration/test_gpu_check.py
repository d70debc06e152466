"""The prepared GPU check runs end to end on tiny shapes on the CPU, and says what it skipped and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT


def test_gpu_check_tiny_runs_and_reports(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks/gpu_check.py"), "--tiny", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["step_costs"]
    assert {(r["method"], r["checkpointing"]) for r in rows} == {
        (m, c) for m in ("sft", "crow") for c in (False, True)
    }
    assert all(r["s_per_step"] > 0 and r["paper_run_min"] == r["s_per_step"] * 63 / 60 for r in rows)
    assert report["placement"]["ok"] and report["placement"]["device"] == (
        "cpu" if report["device"] == "cpu" else "cuda:0"
    )
    if report["device"] == "cpu":
        assert "skipped" in report["generation"]
        assert report["qlora"] == {"skipped": "QLoRA needs CUDA"}
    assert "CROW / SFT step time" in result.stdout
