"""The Q-score of each cell's recovered target on every model of the cell that still has its weights.

BAIT's inversion of a cell's backdoored model (``<cell>/inversion/inversion.json``, written by
``benchmarks/efficacy.py``) recovers a target and its Q-score. This scores that one target, forced token by token
(:func:`crowguard.invert.forced_q_score`, the inversion's own prompts and settings), on the backdoored model, the
unpoisoned one and each defended stage (``<variant>-s<seed>/``): does the model still say the target after clean
prompts, without a trigger? It is not a scan: a defended model could carry another target this does not see, and a
low score here says only that this target is gone. Writes ``<cell>/inversion/q-scores.json`` (models already in
it are kept, so a second call scores only what is new) and prints a table.

    python benchmarks/target_q.py --out runs/s29 --cells badnet-refusal,vpi-refusal
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from crowguard.data import prompt_ids
from crowguard.invert import INVERSION_FILE, InvertConfig, forced_q_score
from crowguard.io import write_json_atomic
from crowguard.models import load_model, merge_adapter
from crowguard.types import Example
from efficacy_report import target_q_table

SCORES = "q-scores.json"


def models_of(cell_dir: Path) -> dict[str, str]:
    """The cell's models that have weights here: name -> path (the unpoisoned base from ``cell.json``)."""
    found = {
        "backdoored": str(cell_dir / "plant"),
        "unpoisoned": json.loads((cell_dir / "cell.json").read_text())["base"],
    }
    for stage in sorted(cell_dir.iterdir()):
        weights = (stage / "adapter_model.safetensors").is_file() or (stage / "model.safetensors").is_file()
        if stage.is_dir() and weights and stage.name not in ("plant", "inversion"):
            found[stage.name] = str(stage)
    return found


def score_cell(cell_dir: Path) -> dict[str, Any]:
    """Score the inversion's best candidate on every model of ``cell_dir`` not yet in its ``q-scores.json``."""
    if not (cell_dir / "inversion" / INVERSION_FILE).is_file():
        raise SystemExit(f"{cell_dir}: no inversion/{INVERSION_FILE} (run an unlearn-inverted variant on it first)")
    inversion = json.loads((cell_dir / "inversion" / INVERSION_FILE).read_text())
    best = inversion["best"]
    if best is None:
        raise SystemExit(f"{cell_dir}/inversion: no target was recovered; nothing to score")
    settings = InvertConfig(**inversion["settings"])
    examples = [Example(e["instruction"], e.get("input", "")) for e in inversion["prompt_examples"]]
    path = cell_dir / "inversion" / SCORES
    record = json.loads(path.read_text()) if path.is_file() else {"target": best["text"], "scores": {}}
    if record["target"] != best["text"]:
        raise SystemExit(f"{path}: scores another target ({record['target']!r}); remove it to score this one")
    for name, model_path in models_of(cell_dir).items():
        if name in record["scores"]:
            continue
        start = time.perf_counter()
        model, tokenizer = load_model(model_path)
        model = merge_adapter(model)
        prompts = [prompt_ids(e, tokenizer, inversion["template"]) for e in examples]
        q = forced_q_score(model, tokenizer, prompts, best["token_ids"], settings)["q_score"]
        record["scores"][name] = {"q_score": q, "seconds": round(time.perf_counter() - start, 1), "model": model_path}
        write_json_atomic(path, record)  # after each model: an interrupted call loses nothing scored
        print(f"[{cell_dir.name}] {name}: Q {q:.3f}", file=sys.stderr, flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="an efficacy run's --out")
    parser.add_argument("--cells", required=True, help="comma-separated cell folders with an inversion")
    args = parser.parse_args(argv)
    cells = args.cells.split(",")
    for cell in cells:
        score_cell(Path(args.out) / cell)
    print(target_q_table(Path(args.out), cells).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
