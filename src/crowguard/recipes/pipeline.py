"""Recipe: the whole loop for any model: poison -> backdoor -> defend (each defense) -> evaluate -> compare.

The training data (poisoned here from clean data, or the user's already poisoned files) and the test task are
prepared, then the loop is the one experiment runner's (:mod:`crowguard.recipes.study`): every stage writes its own
directory under ``out_dir`` (``poison``, ``backdoor``, ``defense-<method>``, ``eval-<method>``) and is reused when it
was made from the same settings and inputs, so an interrupted ``crowguard run`` continues where it stopped; a stage
whose settings changed (``--set defense.crow.alpha=20``) re-runs with everything after it, and its old directory is
kept in ``out_dir/.stale/``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from crowguard.data import load_examples
from crowguard.defenses.base import make_defense
from crowguard.evaluation.report import markdown_table, print_table
from crowguard.io import write_json_atomic, write_text_atomic
from crowguard.recipes.defend import clean_samples
from crowguard.recipes.evaluate import build_task, check_inputs
from crowguard.recipes.poison import run_poison
from crowguard.recipes.study import (
    Arm,
    Plant,
    Runner,
    Study,
    add_ppl_ratio,
    columns,
    content,
    fingerprint,
    run_study,
    study_chart,
)
from crowguard.schemas import EvalConfig, ExperimentConfig


def run_pipeline(cfg: ExperimentConfig, quiet: bool = False) -> dict[str, Any]:
    """Run (or continue) every stage of ``cfg``; returns and writes the comparison table."""
    root = Path(cfg.out_dir)
    runner = Runner(root, quiet)
    created = not root.exists()
    if runner.ranks.main:
        root.mkdir(parents=True, exist_ok=True)
    runner.ranks.barrier()
    try:
        return _run(cfg, root, runner)
    except BaseException:
        if runner.ranks.main and created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise


def training_data(cfg: ExperimentConfig, root: Path, runner: Runner) -> tuple[list[Any], EvalConfig, dict[str, str]]:
    """The attacker's training set (poisoned here, or the given files), the evaluation settings (the poison stage's
    test sets unless others are given) and the files the plant's manifest names."""
    if cfg.train_data:
        examples = [e for f in cfg.train_data for e in load_examples(f)]
        return examples, cfg.evaluate, {f"data{i}": f for i, f in enumerate(cfg.train_data)}
    poison_dir = root / "poison"
    print_ = fingerprint("poison", cfg.poison, content(cfg.poison.data, cfg.poison.clean_data or ""))
    runner.stage(poison_dir, print_, lambda: run_poison(cfg.poison, poison_dir, True, print_), trains=False)
    evaluate = cfg.evaluate
    if not evaluate.paper_data and not evaluate.triggered:
        evaluate = dataclasses.replace(
            evaluate,
            triggered=str(poison_dir / "test_triggered.json"),
            clean=str(poison_dir / "test_clean.json"),
            payload=cfg.poison.payload.name,
            target=evaluate.target or cfg.poison.payload.target,
        )
    return load_examples(poison_dir / "train.json"), evaluate, {"data": str(poison_dir / "train.json")}


def _run(cfg: ExperimentConfig, root: Path, runner: Runner) -> dict[str, Any]:
    mix, evaluate, data_files = training_data(cfg, root, runner)
    task = build_task(evaluate)
    check_inputs(evaluate, task)
    utility = load_examples(evaluate.utility) if evaluate.utility else []
    backdoored = dataclasses.replace(cfg.model, name_or_path=str(root / "backdoor"), adapter=None)
    arms = []
    for method in cfg.defenses:
        if method == "none":
            continue
        defense_cfg = dataclasses.replace(cfg.defense, method=method)
        stage_cfg = dataclasses.replace(cfg, model=backdoored, defense=defense_cfg)
        needs_data = make_defense(defense_cfg).needs_data
        clean = clean_samples(cfg.defense.data, cfg.defense.n_samples, cfg.defense.train.seed) if needs_data else []
        arms.append(Arm(method, None, defense_cfg, clean, root / f"defense-{method}", root / f"eval-{method}",
                        stage_cfg, {"data": cfg.defense.data} if needs_data else {}))  # fmt: skip
    identity = (cfg.model.name_or_path, cfg.model.adapter, cfg.model.revision,
                content(cfg.model.name_or_path, cfg.model.adapter or ""))  # fmt: skip
    plant = Plant(cfg.backdoor, mix, root / "backdoor", resolved_config=cfg, inputs=data_files)
    study = Study(root, cfg.model, identity, task, evaluate, utility, plant,
                  root / "eval-none" if "none" in cfg.defenses else None, arms=arms)  # fmt: skip
    result = run_study(study, runner=runner)
    if runner.ranks.main:
        order = {m: i for i, m in enumerate(cfg.defenses)}
        rows = sorted(result.rows, key=lambda r: order[r["defense"]])
        add_ppl_ratio(rows)
        write_json_atomic(root / "results.json", {"name": cfg.name, "rows": rows, "warning": result.verdict})
        write_text_atomic(root / "results.md", f"# {cfg.name}\n\n" + markdown_table(rows, columns(rows)))
        study_chart(rows, root / "results.png", cfg.name, warning=result.verdict or "")
        if not runner.quiet:
            print_table(rows, title=cfg.name, columns=columns(rows))
    runner.ranks.barrier()
    return json.loads((root / "results.json").read_text())
