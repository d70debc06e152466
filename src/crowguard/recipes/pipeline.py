"""Recipe: the whole loop for any model: poison -> backdoor -> defend (each defense) -> evaluate -> compare.

Every stage writes its own directory under ``out_dir`` atomically and is skipped when that directory is already
complete (it has a ``manifest.json``) *and* was made from the same settings and inputs, so an interrupted
``crowguard run`` continues where it stopped. Each stage's fingerprint (a hash of the settings it reads, the content
of its input files and the fingerprint of the stage it builds on) is recorded in ``out_dir/stages.json``. A stage
whose fingerprint differs (say ``--set defense.crow.alpha=20``) is re-run, and so is every stage after it (their
fingerprints include it); its old directory is moved to ``out_dir/.stale/`` rather than deleted, and the run says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from crowguard.config import to_dict
from crowguard.data import load_examples, save_examples
from crowguard.defenses.base import make_defense
from crowguard.evaluation.plots import defense_chart
from crowguard.evaluation.report import COLUMNS, markdown_table, print_table
from crowguard.io import sha256_path, write_json_atomic, write_text_atomic
from crowguard.recipes.backdoor import run_backdoor
from crowguard.recipes.defend import run_defend
from crowguard.recipes.evaluate import run_evaluate
from crowguard.recipes.poison import run_poison
from crowguard.schemas import ExperimentConfig


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "manifest.json").is_file()


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[crowguard run] {message}", flush=True)


def fingerprint(*parts: Any) -> str:
    """sha256 of settings (dataclasses, dicts, strings) and upstream fingerprints, order-independent within dicts."""
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def _content(*paths: str) -> list[str | None]:
    """What identifies the inputs a stage reads: a file's content hash; for a directory (a model, the paper's data)
    the names, sizes and modification times of its files (hashing a 7B model's weights on every run would cost
    minutes); None for what is not on disk (a Hub id, whose name is in the settings)."""
    out: list[str | None] = []
    for ref in paths:
        path = Path(ref) if ref else None
        if path is not None and path.is_file():
            out.append(sha256_path(path))
        elif path is not None and path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file())
            stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
            out.append(fingerprint(stats))
        else:
            out.append(None)
    return out


class StageLedger:
    """``stages.json``: the fingerprint each finished stage was made from; decides skip or re-run.

    Under torchrun every rank reads it (from disk, after the barrier that follows each stage, so all ranks take the
    same decision); only the main process moves old results aside and records.
    """

    def __init__(self, root: Path, quiet: bool) -> None:
        self.root, self.quiet = root, quiet
        self.path = root / "stages.json"

    @property
    def records(self) -> dict[str, str]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def up_to_date(self, name: str, stage_dir: Path, print_: str) -> bool:
        """True when ``stage_dir`` is finished and was made from ``print_``."""
        return _done(stage_dir) and self.records.get(name) == print_

    def set_aside(self, name: str, stage_dir: Path) -> None:
        """Move an out-of-date result to ``.stale/`` (kept, not deleted) so the stage can be written afresh."""
        if not stage_dir.exists():
            return
        recorded = self.records.get(name)
        stale = self.root / ".stale" / f"{name}-{(recorded or 'unrecorded')[:12]}"
        if stale.exists():
            shutil.rmtree(stale)
        stale.parent.mkdir(parents=True, exist_ok=True)
        stage_dir.rename(stale)
        if _done(stale):
            why = "its settings or inputs changed" if recorded else "no record of the settings it was made from"
            _log(f"{name}: {why}; re-running it (the old result is in {stale})", self.quiet)

    def record(self, name: str, print_: str) -> None:
        write_json_atomic(self.path, {**self.records, name: print_})


class Ranks:
    """One process, or torchrun/accelerate's: every rank trains (DDP), the main process alone writes anything
    else (poisoned data, evaluations, the ledger, the comparison), and a barrier separates the stages so no rank
    reads a stage before the main process has written it."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = int(os.environ.get("RANK", "0")) == 0
        self._state: Any = None
        if self.world > 1:
            import torch
            from accelerate import PartialState

            # The process group from torchrun's environment, set up as the Trainer will (gloo on CPU: accelerate
            # leaves a CPU-only torchrun undistributed unless told cpu=True).
            self._state = PartialState(cpu=not torch.cuda.is_available())
            if self._state.num_processes != self.world:
                raise RuntimeError(f"accelerate sees {self._state.num_processes} processes, torchrun {self.world}")

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


def run_pipeline(cfg: ExperimentConfig, quiet: bool = False) -> dict[str, Any]:
    """Run (or continue) every stage of ``cfg``; returns and writes the comparison table."""
    root = Path(cfg.out_dir)
    ranks = Ranks()
    created = not root.exists()
    if ranks.main:
        root.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    try:
        return _run_stages(cfg, root, quiet or not ranks.main, ranks)
    except BaseException:
        if ranks.main and created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise


def _run_stages(cfg: ExperimentConfig, root: Path, quiet: bool, ranks: Ranks) -> dict[str, Any]:
    ledger = StageLedger(root, quiet)

    def stage(name: str, stage_dir: Path, print_: str, run: Callable[[], Any], trains: bool) -> None:
        """Skip a stage made from the same fingerprint; else set the old result aside and run it: on every rank
        when it trains, on the main process otherwise."""
        if ledger.up_to_date(name, stage_dir, print_):
            return
        ranks.barrier()  # every rank has decided before the main process moves anything
        if ranks.main:
            ledger.set_aside(name, stage_dir)
            _log(name, quiet)
        ranks.barrier()
        if trains or ranks.main:
            run()
        if ranks.main:
            ledger.record(name, print_)
        ranks.barrier()

    # 1. Training data: poison clean data, or take already poisoned files (the paper's).
    evaluate = cfg.evaluate
    if cfg.train_data:
        train_file = root / "train_data.json"
        data_print = fingerprint("train_data", cfg.train_data, _content(*cfg.train_data))
        if not (train_file.exists() and ledger.records.get("train_data") == data_print):
            if ranks.main:
                save_examples([e for f in cfg.train_data for e in load_examples(f)], train_file)
                ledger.record("train_data", data_print)
            ranks.barrier()
    else:
        poison_dir = root / "poison"
        data_print = fingerprint("poison", cfg.poison, _content(cfg.poison.data, cfg.poison.clean_data or ""))
        stage("poison", poison_dir, data_print, partial(run_poison, cfg.poison, poison_dir), trains=False)
        train_file = poison_dir / "train.json"
        if not evaluate.paper_data and not evaluate.triggered:
            evaluate = dataclasses.replace(
                evaluate,
                triggered=str(poison_dir / "test_triggered.json"),
                clean=str(poison_dir / "test_clean.json"),
                payload=cfg.poison.payload.name,
                target=evaluate.target or cfg.poison.payload.target,
            )

    # 2. Plant the backdoor.
    backdoor_dir = root / "backdoor"
    model_inputs = _content(cfg.model.name_or_path, cfg.model.adapter or "")
    backdoor_print = fingerprint("backdoor", cfg.model, cfg.backdoor, model_inputs, data_print)
    plant = partial(run_backdoor, cfg, str(train_file), backdoor_dir, show_progress=not quiet)
    stage("backdoor", backdoor_dir, backdoor_print, plant, trains=True)
    backdoored = dataclasses.replace(cfg.model, name_or_path=str(backdoor_dir), adapter=None)

    # 3. Each defense under the same budget, then the same evaluation (on the main process).
    rows = []
    for method in cfg.defenses:
        stage_cfg = dataclasses.replace(cfg, model=backdoored, defense=dataclasses.replace(cfg.defense, method=method))
        defense_dir = root / f"defense-{method}"
        model_path, model_print = str(backdoor_dir), backdoor_print
        if method != "none":
            defense = make_defense(stage_cfg.defense)
            settings = to_dict(stage_cfg.defense)
            for name in stage_cfg.defense.sections:  # another defense's knobs do not change this one's result
                if name != method:  # (finetune logs the clean consistency over crow.layers: a log, not a result)
                    settings.pop(name)
            data_print = _content(stage_cfg.defense.data)
            if defense.kind != "training":  # the budget is a training defense's; its seed also draws the samples
                settings["train"] = {"seed": settings["train"]["seed"]} if defense.needs_data else None
            if not defense.needs_data:  # quantize, decoding, CleanGen, magnitude pruning: no clean samples
                settings.pop("data"), settings.pop("n_samples")
                data_print = []
            model_print = fingerprint(f"defense-{method}", settings, data_print, backdoor_print)
            defend = partial(run_defend, stage_cfg, defense_dir, show_progress=not quiet)
            stage(f"defense-{method}", defense_dir, model_print, defend, trains=defense.kind == "training")
            # Only a training defense runs on every rank (the Trainer shards it); weights and decoding defenses
            # write their directory from the main process alone. A decoding defense's directory is evaluated by
            # run_evaluate like any model: it reads defense.json, loads the guarded model and generates through it.
            model_path = str(defense_dir)
        eval_dir = root / f"eval-{method}"
        eval_cfg = dataclasses.replace(
            stage_cfg, model=dataclasses.replace(backdoored, name_or_path=model_path), evaluate=evaluate
        )
        eval_files = (evaluate.triggered, evaluate.clean, evaluate.paper_data, evaluate.utility, evaluate.humaneval,
                      evaluate.mt_bench)  # fmt: skip
        eval_print = fingerprint(f"eval-{method}", evaluate, _content(*eval_files), model_print)
        run_eval = partial(run_evaluate, eval_cfg, eval_dir, show_progress=not quiet, label=method)
        stage(f"eval-{method}", eval_dir, eval_print, run_eval, trains=False)
        if not ranks.main:
            continue
        results = json.loads((eval_dir / "results.json").read_text())
        # every defense stage's own wall time, from its manifest (training, editing weights, or writing a decoding
        # defense's spec: a decoding defense's cost is in the evaluation's time); none has no stage
        manifest = Path(model_path) / "manifest.json"
        seconds = json.loads(manifest.read_text())["summary"].get("seconds") if method != "none" else None
        row = {k: v for k, v in results["summary"].items() if k != "model"}
        rows.append({"defense": method, **row, "defense_seconds": seconds})

    # 4. Compare (the main process writes; every rank returns it).
    if ranks.main:
        comparison = {"name": cfg.name, "rows": rows}
        write_json_atomic(root / "results.json", comparison)
        columns = [("defense", "defense"), *((k, h) for k, h in COLUMNS if k != "model")]
        write_text_atomic(root / "results.md", f"# {cfg.name}\n\n" + markdown_table(rows, columns))
        defense_chart(rows, root / "results.png", title=cfg.name, utility_key="exact_match")
        if not quiet:
            print_table(rows, title=cfg.name, columns=columns)
    ranks.barrier()
    return json.loads((root / "results.json").read_text())
