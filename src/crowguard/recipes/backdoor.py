"""Recipe: plant a backdoor by supervised fine-tuning on a poisoned set (BackdoorLLM / the CROW paper: poisoned +
clean examples, LoRA, lr 2e-4, 5 epochs, batch 2 x 4).

check the output directory and the model path -> load the poisoned training set -> run the one training stage ->
the backdoored adapter (or model) in ``out_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crowguard.data import DataError, load_examples
from crowguard.io import check_output_dir
from crowguard.models import check_model_exists
from crowguard.schemas import ExperimentConfig
from crowguard.stage import run_training_stage
from crowguard.types import StageContext


def run_backdoor(
    cfg: ExperimentConfig,
    data: str,
    out_dir: Path,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the poisoned set ``data`` with ``cfg.backdoor``; returns the train summary."""
    if not cfg.model.name_or_path:
        raise DataError("model.name_or_path is empty: give --model (a local directory or Hub id)")
    check_output_dir(Path(out_dir), overwrite, [cfg.model.name_or_path, cfg.model.adapter, data])
    check_model_exists(cfg.model.name_or_path, cfg.model.adapter, cfg.model.revision)
    examples = load_examples(data)
    n_poisoned = sum(bool(e.meta.get("poisoned")) for e in examples)
    return run_training_stage(
        "backdoor",
        cfg.model,
        cfg.backdoor,
        examples,
        StageContext(Path(out_dir), overwrite, resume, show_progress, resolved_config=cfg, inputs={"data": data}),
        extra_summary={"n_poisoned": n_poisoned},
    )
