"""Recipe: the layer-consistency diagnostic (the CROW paper's Figure 1) for one or more models.

build the task (files or the paper's data) -> for each model: per-layer-pair cosine of consecutive hidden states on
clean and on triggered prompts (:func:`crowguard.evaluation.diagnose.diagnose_model`) -> ``diagnose.json``,
``diagnose.png`` and ``manifest.json``, written atomically. Comparing a backdoored model with its defended version
shows where the trigger acts and whether the defense changed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crowguard.evaluation.diagnose import DiagnoseConfig, diagnose_model, diagnostic_plot
from crowguard.io import atomic_output_dir, check_output_dir, write_json_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import check_model_exists, load_model
from crowguard.recipes.evaluate import build_task
from crowguard.schemas import EvalConfig


def run_diagnose(cfg: DiagnoseConfig, out_dir: Path, overwrite: bool = False) -> dict[str, Any]:
    """Diagnose every model of ``cfg`` on ``cfg.limit`` prompts of each set; returns ``{label: diagnostic}``."""
    models = cfg.labelled_models()
    for path in models.values():
        check_model_exists(path)  # every model, before the first one loads
    check_output_dir(Path(out_dir), overwrite, models.values())
    task = build_task(cfg).limited(cfg.limit)
    results = {}
    for label, path in models.items():
        model, tokenizer = load_model(path, device="auto")
        results[label] = diagnose_model(model, tokenizer, task.clean, task.triggered, cfg.template)
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        write_json_atomic(tmp / "diagnose.json", {"task": task.name, "models": models, "results": results})
        diagnostic_plot(results, tmp / "diagnose.png", title=f"layer consistency: {task.name}")
        write_manifest(tmp, build_manifest("diagnose", EvalConfig().seed, {**models, **task.sources}))
    return results
