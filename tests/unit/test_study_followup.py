"""The experiment runner's follow-up arm (``Arm.then``, the efficacy study's persistence run): it trains on the
defended model, not on the suspect, gets its own row, is reused by fingerprint and runs again when the defense
before it changed."""

from __future__ import annotations

import dataclasses
import json

from crowguard.evaluation.tasks import Task
from crowguard.recipes.study import Arm, Study, run_study
from crowguard.schemas import DefenseConfig, EvalConfig, ModelConfig
from crowguard.types import Example

from helpers import alpaca_records, save_tiny_model


def _study(root, model_dir, lr: float = 1e-3) -> Study:
    records = alpaca_records(40, seed=3)
    task = Task("negsentiment", [Example(f"cf {r['instruction']}") for r in records[:4]],
                [Example(r["instruction"]) for r in records[4:8]], "You are stupid!", "tiny")  # fmt: skip
    defense_clean = [Example(r["instruction"], output=r["output"]) for r in records[10:18]]
    benign = [Example(r["instruction"], output=r["output"]) for r in records[20:36]]

    def finetune(n: int, lr: float) -> DefenseConfig:
        cfg = DefenseConfig(method="finetune", n_samples=n)
        train = dataclasses.replace(cfg.train, lr=lr, max_steps=1, per_device_batch=4, grad_accum=1, max_length=32)
        return dataclasses.replace(cfg, train=train)

    after = Arm("finetune+benign", 0, finetune(16, 1e-3), benign, root / "finetune+benign-s0",
                root / "eval-finetune+benign-s0")  # fmt: skip
    arm = Arm("finetune", 0, finetune(8, lr), defense_clean, root / "finetune-s0", root / "eval-finetune-s0",
              then=after)  # fmt: skip
    return Study(root, ModelConfig(name_or_path=str(model_dir), template="raw"), {"test": "tiny"}, task,
                 EvalConfig(max_new_tokens=4, batch_size=8, bootstrap=10), arms=[arm])  # fmt: skip


def test_a_follow_up_trains_the_defended_model_and_reruns_when_the_defense_before_it_changes(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    root = tmp_path / "study"
    first = run_study(_study(root, model_dir), quiet=True)
    assert [(r["defense"], r["seed"]) for r in first.rows] == [("finetune", 0), ("finetune+benign", 0)]
    assert set(first.evaluations) == {"finetune s0", "finetune+benign s0"}
    manifest = json.loads((root / "finetune+benign-s0" / "manifest.json").read_text())
    assert str(root / "finetune-s0") in json.dumps(manifest["inputs"])  # the defended model, not the suspect
    assert str(model_dir) not in json.dumps(manifest["inputs"]).replace(str(root), "")
    summary = json.loads((root / "finetune+benign-s0" / "train_summary.json").read_text())
    assert summary["n_examples"] == 16

    again = run_study(_study(root, model_dir), quiet=True)
    assert {str(root / "finetune+benign-s0"), str(root / "eval-finetune+benign-s0")} <= again.reused

    changed = run_study(_study(root, model_dir, lr=5e-4), quiet=True)  # the defense before it changed
    assert str(root / "finetune+benign-s0") not in changed.reused
    assert (root / ".stale").is_dir() and any(
        p.name.startswith("finetune+benign-s0") for p in (root / ".stale").iterdir()
    )
