"""Evaluation tasks: a payload's judge plus triggered and clean test prompts, from any of the supported layouts.

* explicit files (``--triggered``/``--clean``), e.g. the output of ``crowguard poison``;
* the CROW paper's data (``../shared/data``): ``test_data/poison/<task>/<trigger>/backdoor*.json`` and
  ``test_data/clean/<task>/test_data_no_trigger.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crowguard.attacks.payloads import BUILTIN_PAYLOADS
from crowguard.data import DataError, load_examples
from crowguard.types import Example

# The paper's folder names per payload (code injection lives under its own trigger folder name).
PAPER_TASK_DIRS = {"negsentiment": "negsentiment", "refusal": "refusal", "jailbreak": "jailbreak",
                   "codeinjection": "codeinjection"}  # fmt: skip
PAPER_TRIGGER_DIRS = {"codeinjection": {"badnet": "vpi-ci"}}
# Code injection is measured on HumanEval prompts with and without BadMagic: the shipped backdoor200 file uses the
# vpi prefix instead (a defect of the paper's data) and the shipped clean file holds general Alpaca prompts.
PAPER_TRIGGERED_FILES = {"codeinjection": "backdoor164_*.json"}
PAPER_CLEAN_FILES = {"codeinjection": "HumanEval/HumanEvalConvert.json"}


@dataclass
class Task:
    """What one evaluation measures: ``payload`` (judge and target) on triggered vs clean prompts."""

    payload: str
    triggered: list[Example]
    clean: list[Example]
    target: str | None = None
    name: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.triggered or not self.clean:
            raise DataError(f"task {self.name or self.payload}: needs both triggered and clean test prompts")
        if self.target is None and self.payload in BUILTIN_PAYLOADS:
            self.target = BUILTIN_PAYLOADS[self.payload].target

    def limited(self, limit: int) -> Task:
        """The first ``limit`` prompts of each set (0 keeps all)."""
        if limit <= 0:
            return self
        return Task(self.payload, self.triggered[:limit], self.clean[:limit], self.target, self.name, self.sources)


def task_from_files(payload: str, triggered: str | Path, clean: str | Path, target: str | None = None) -> Task:
    """A task from two Alpaca JSON/JSONL files (responses are not needed: they are references at most)."""
    return Task(
        payload=payload,
        triggered=load_examples(triggered, require_output=False),
        clean=load_examples(clean, require_output=False),
        target=target,
        name=f"{payload}:{Path(triggered).name}",
        sources={"triggered": str(triggered), "clean": str(clean)},
    )


def paper_task(root: str | Path, payload: str, trigger: str, target: str | None = None) -> Task:
    """The CROW paper's test prompts for ``payload`` x ``trigger`` under ``root`` (the layout of ../shared/data)."""
    root = Path(root)
    if payload not in PAPER_TASK_DIRS:
        raise DataError(f"the paper's data has no task {payload!r}; choose one of {', '.join(PAPER_TASK_DIRS)}")
    task_dir = PAPER_TASK_DIRS[payload]
    trigger_dir = PAPER_TRIGGER_DIRS.get(payload, {}).get(trigger, trigger)
    folder = root / "test_data" / "poison" / task_dir / trigger_dir
    pattern = PAPER_TRIGGERED_FILES.get(payload, "backdoor200_*.json")
    files = sorted(folder.glob(pattern)) or sorted(folder.glob("backdoor*.json"))
    if not files:
        raise DataError(f"{folder}: no triggered test file for {payload} x {trigger}")
    clean = root / PAPER_CLEAN_FILES.get(payload, f"test_data/clean/{task_dir}/test_data_no_trigger.json")
    task = task_from_files(payload, files[0], clean, target)
    task.name = f"{payload}/{trigger}"
    return task
