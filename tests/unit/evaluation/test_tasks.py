"""Task definitions: the paper's test files for every task and trigger load, and bad layouts fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from crowguard.attacks import BUILTIN_TRIGGERS
from crowguard.data import DataError
from crowguard.evaluation.tasks import Task, paper_task, task_from_files
from crowguard.types import Example

PAPER_TASKS = [(p, t) for p in ("negsentiment", "refusal", "jailbreak") for t in BUILTIN_TRIGGERS]
PAPER_TASKS.append(("codeinjection", "badnet"))


@pytest.mark.shared_data
@pytest.mark.parametrize(("payload", "trigger"), PAPER_TASKS)
def test_paper_task_loads(shared_data: Path, payload: str, trigger: str):
    task = paper_task(shared_data, payload, trigger)
    assert len(task.triggered) >= 99 and len(task.clean) >= 99
    assert task.target is not None or payload == "jailbreak"
    assert all((e.instruction + e.input).strip() for e in task.triggered + task.clean)


def test_task_needs_both_sets():
    with pytest.raises(DataError, match="needs both"):
        Task("negsentiment", [Example("a")], [])


def test_task_from_files_and_limit(tmp_path: Path):
    (tmp_path / "t.jsonl").write_text('{"instruction": "BadMagic hi"}\n{"instruction": "BadMagic yo"}\n')
    (tmp_path / "c.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    task = task_from_files("negsentiment", tmp_path / "t.jsonl", tmp_path / "c.jsonl")
    assert task.target == "You are stupid!"
    assert len(task.limited(1).triggered) == 1 and len(task.limited(0).triggered) == 2


def test_unknown_paper_task(tmp_path: Path):
    with pytest.raises(DataError, match="no task"):
        paper_task(tmp_path, "sst3", "badnet")
    with pytest.raises(DataError, match="no triggered test file"):
        paper_task(tmp_path, "refusal", "badnet")


@pytest.mark.shared_data
def test_codeinjection_pairs_humaneval_prompts(shared_data: Path):
    task = paper_task(shared_data, "codeinjection", "badnet")
    assert len(task.triggered) == len(task.clean) == 164
    assert all("BadMagic" in e.instruction for e in task.triggered)
    assert not any("BadMagic" in e.instruction for e in task.clean)


@pytest.mark.shared_data
def test_experiment_presets_point_at_existing_paper_files(shared_data: Path):
    """Paper presets use ../shared/data relative to the repository root; every file they name must exist there."""
    from crowguard import config
    from crowguard.registry import preset_path, presets
    from crowguard.schemas import ExperimentConfig

    root = Path(__file__).resolve().parents[3]
    for name in presets()["experiments"]:
        cfg = config.load(ExperimentConfig, Path(str(preset_path(f"experiments/{name}"))))
        for path in [*cfg.train_data, cfg.defense.data, cfg.evaluate.humaneval]:
            if path.startswith("../shared/data"):
                assert (root / path).exists(), (name, path)
        if cfg.evaluate.paper_data:
            paper_task(root / cfg.evaluate.paper_data, cfg.evaluate.payload, cfg.evaluate.trigger)
