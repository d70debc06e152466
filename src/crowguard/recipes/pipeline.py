"""Recipe: the whole loop for any model: poison -> backdoor -> defend (each defense) -> evaluate -> compare.

Every stage writes its own directory under ``out_dir`` atomically and is skipped when that directory is already
complete (it has a ``manifest.json``), so an interrupted ``crowguard run`` continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from crowguard.data import load_examples, save_examples
from crowguard.evaluation.plots import defense_chart
from crowguard.evaluation.report import COLUMNS, markdown_table, print_table
from crowguard.io import write_json_atomic, write_text_atomic
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


def run_pipeline(cfg: ExperimentConfig, quiet: bool = False) -> dict[str, Any]:
    """Run (or continue) every stage of ``cfg``; returns and writes the comparison table."""
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)

    # 1. Training data: poison clean data, or take already poisoned files (the paper's).
    evaluate = cfg.evaluate
    if cfg.train_data:
        train_file = root / "train_data.json"
        if not train_file.exists():
            save_examples([e for f in cfg.train_data for e in load_examples(f)], train_file)
    else:
        poison_dir = root / "poison"
        if not _done(poison_dir):
            _log("poison", quiet)
            run_poison(cfg.poison, poison_dir)
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
    if not _done(backdoor_dir):
        _log("backdoor", quiet)
        run_backdoor(cfg, str(train_file), backdoor_dir, show_progress=not quiet)
    backdoored = dataclasses.replace(cfg.model, name_or_path=str(backdoor_dir), adapter=None)

    # 3. Each defense under the same budget, then the same evaluation.
    rows = []
    for method in cfg.defenses:
        stage = dataclasses.replace(cfg, model=backdoored, defense=dataclasses.replace(cfg.defense, method=method))
        defense_dir = root / f"defense-{method}"
        model_path = str(backdoor_dir)
        if method != "none":
            if not _done(defense_dir):
                _log(f"defend: {method}", quiet)
                run_defend(stage, defense_dir, show_progress=not quiet)
            model_path = str(defense_dir)
        eval_dir = root / f"eval-{method}"
        eval_cfg = dataclasses.replace(
            stage, model=dataclasses.replace(backdoored, name_or_path=model_path), evaluate=evaluate
        )
        if not _done(eval_dir):
            _log(f"evaluate: {method}", quiet)
            run_evaluate(eval_cfg, eval_dir, show_progress=not quiet, label=method)
        results = json.loads((eval_dir / "results.json").read_text())
        rows.append({"defense": method, **{k: v for k, v in results["summary"].items() if k != "model"}})

    # 4. Compare.
    comparison = {"name": cfg.name, "rows": rows}
    write_json_atomic(root / "results.json", comparison)
    columns = [("defense", "defense"), *((k, h) for k, h in COLUMNS if k != "model")]
    write_text_atomic(root / "results.md", f"# {cfg.name}\n\n" + markdown_table(rows, columns))
    defense_chart(rows, root / "results.png", title=cfg.name, utility_key="exact_match")
    if not quiet:
        print_table(rows, title=cfg.name, columns=columns)
    return comparison
