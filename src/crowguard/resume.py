"""Checkpoints of the engine's runs: which one to resume, and the checks that a resume continues its own run (the
same settings, data and model) and that a fresh run starts from an empty work directory."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crowguard.config import ConfigError, to_dict
from crowguard.io import write_json_atomic, write_text_atomic
from crowguard.schemas import TrainConfig


def latest_checkpoint(work_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` directory in ``work_dir``, or None."""
    checkpoints = sorted(Path(work_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


class ResumeError(ConfigError):
    """``--resume`` cannot continue: no checkpoint, or the run would not be the one that was checkpointed."""


# Settings that do not change what is trained (how often to log or checkpoint, how fast) may differ on resume.
RESUME_FREE_KEYS = ("save_steps", "logging_steps", "regroup_micro_batches", "compile")
SETTINGS_FILE = "run_settings.json"


def run_settings(
    cfg: TrainConfig, crow: Any, template: str, features: Sequence[dict[str, list[int]]], identity: Any
) -> dict[str, Any]:
    """What a resumed run must share with the checkpointed one: the training settings, CROW's, the template, the
    tokenised data (hashed) and the caller's identity of the model (path, adapter)."""
    import hashlib

    train_settings = {k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE_KEYS}
    data = hashlib.sha256(json.dumps([[*f["input_ids"], -1, *f["labels"]] for f in features]).encode())
    return {"train": train_settings, "crow": None if crow is None else to_dict(crow), "template": template,
            "data_sha256": data.hexdigest(), "model": identity}  # fmt: skip


def require_checkpoint(work_dir: Path) -> str:
    """The newest checkpoint in ``work_dir``, or the one-line ResumeError that there is none to resume."""
    checkpoint = latest_checkpoint(work_dir) if Path(work_dir).is_dir() else None
    if checkpoint is None:
        raise ResumeError(f"--resume: no checkpoint-* directory in {work_dir} (run without --resume to start afresh)")
    return checkpoint


def set_aside_stale_work(work_dir: Path) -> Path | None:
    """A fresh run starts from an empty work directory: an earlier run's leftovers (a killed run's checkpoints,
    which checkpoint rotation and a later ``--resume`` would mix with this run's) are renamed to
    ``<work_dir>.stale-<time>`` with a warning, not deleted. Only the main process renames; returns the new path."""
    import warnings

    work_dir = Path(work_dir)
    if int(os.environ.get("RANK", "0")) != 0 or not work_dir.is_dir() or not any(work_dir.iterdir()):
        return None
    aside = work_dir.with_name(f"{work_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    work_dir.rename(aside)
    warnings.warn(f"{work_dir} held an earlier run's files (not resumed): moved them to {aside}", stacklevel=4)
    return aside


def start_fresh(work_dir: Path, settings: dict[str, Any]) -> None:
    """A fresh run's work directory: under DDP only the main process sets an earlier run's leftovers aside
    (:func:`set_aside_stale_work`), clears ``metrics.jsonl`` and records ``settings``, so no other rank's file is
    written into a folder that is being moved; every rank gets the directory."""
    work_dir = Path(work_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        set_aside_stale_work(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (work_dir / "metrics.jsonl").unlink(missing_ok=True)
        write_json_atomic(work_dir / SETTINGS_FILE, settings)


def check_resume(work_dir: Path, settings: dict[str, Any]) -> str:
    """The checkpoint to continue, after checking that ``settings`` are the checkpointed run's; else ResumeError."""
    checkpoint = require_checkpoint(work_dir)
    recorded_path = work_dir / SETTINGS_FILE
    if not recorded_path.is_file():
        raise ResumeError(f"--resume: {recorded_path} is missing, so the checkpoint's settings cannot be checked")
    recorded = json.loads(recorded_path.read_text())
    if recorded != settings:
        diff = sorted(_differences(recorded, settings))
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diff[:6])
        raise ResumeError(f"--resume: the settings differ from the checkpointed run in {work_dir} ({shown}); "
                          "resume with the same settings, or start afresh without --resume")  # fmt: skip
    return checkpoint


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint (the crashed run's tail) so a resumed run logs no step twice."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))
