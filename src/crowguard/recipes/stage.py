"""One training stage from start to finish, shared by ``backdoor`` and every training defense.

load the model (untrusted: safetensors, no remote code) -> make it trainable (LoRA / full / continue or merge an
attached adapter) -> train with the one engine -> write the artefact, ``config.yaml``, ``manifest.json``,
``metrics.jsonl`` and ``train_summary.json`` into the output directory in one atomic rename.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crowguard.config import save
from crowguard.io import atomic_output_dir, check_output_dir, write_json_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import base_of_adapter, load_model, save_model
from crowguard.schemas import CrowConfig, ModelConfig, TrainConfig
from crowguard.train import ResumeError, latest_checkpoint, prepare_for_training, train
from crowguard.types import Example


def work_dir_for(out_dir: Path) -> Path:
    """Where checkpoints of a run into ``out_dir`` live until it succeeds (``--resume`` reads them)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.work"


def _output_base(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str | None:
    """The base a saved LoRA adapter must name so ``load_model`` can rebuild the trained model, or None when
    only a full model can represent it."""
    path = model_cfg.name_or_path
    is_adapter_dir = (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()
    if model_cfg.adapter is None and not is_adapter_dir:
        return path  # a new LoRA on a plain model
    if train_cfg.adapter_mode == "continue":
        return base_of_adapter(path) if is_adapter_dir else path  # the same adapter, trained further
    if model_cfg.adapter is None:
        return path  # a new LoRA on the merged adapter directory: load_model merges it again
    return None  # model + separate adapter, merged: save the merged model


def run_training_stage(
    stage: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    examples: Sequence[Example],
    out_dir: Path,
    crow: CrowConfig | None = None,
    resolved_config: Any = None,
    inputs: dict[str, str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and save; returns the summary written to ``train_summary.json``."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    work_dir = work_dir_for(out_dir)
    if resume and latest_checkpoint(work_dir) is None:  # before minutes of model loading, and leaving nothing
        raise ResumeError(f"--resume: no checkpoint-* directory in {work_dir} (run without --resume to start afresh)")
    identity = {key: getattr(model_cfg, key) for key in ("name_or_path", "adapter", "revision", "dtype", "template")}
    model, tokenizer = load_model(
        model_cfg.name_or_path,
        model_cfg.adapter,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        allow_pickle=model_cfg.allow_pickle,
        revision=model_cfg.revision,
        trainable_adapter=train_cfg.adapter_mode == "continue",
    )
    model = prepare_for_training(model, train_cfg)
    result = train(
        model,
        tokenizer,
        examples,
        train_cfg,
        work_dir,
        crow=crow,
        template=model_cfg.template,
        resume=resume,
        show_progress=show_progress,
        description=stage,
        identity=identity,
    )
    summary = {
        "stage": stage,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "final_loss": result.final_loss,
        "trainable_parameters": result.trainable_parameters,
        "n_examples": len(examples),
        **(extra_summary or {}),
    }
    if int(os.environ.get("RANK", "0")) != 0:
        return summary  # under torchrun only the main process writes the artefact
    base = _output_base(model_cfg, train_cfg)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        trained = getattr(result.model, "module", result.model)
        if base is None or train_cfg.merge_output:
            from crowguard.models import merge_adapter

            if base is not None:  # keep the adapter too
                save_model(trained, tokenizer, tmp / "adapter", base)
            trained = merge_adapter(trained)
        summary["artefact"] = save_model(trained, tokenizer, tmp, base)
        if (work_dir / "metrics.jsonl").exists():
            shutil.copy(work_dir / "metrics.jsonl", tmp / "metrics.jsonl")
        if resolved_config is not None:
            save(resolved_config, tmp / "config.yaml")
        write_json_atomic(tmp / "train_summary.json", summary)
        all_inputs = {"model": model_cfg.name_or_path, **(inputs or {})}
        if model_cfg.adapter:
            all_inputs["adapter"] = model_cfg.adapter
        parameter = next(trained.parameters())
        placement = {"device": str(parameter.device), "dtype": str(parameter.dtype), "precision": train_cfg.precision}
        write_manifest(tmp, build_manifest(stage, train_cfg.seed, all_inputs, {"summary": summary, **placement}))
    shutil.rmtree(work_dir, ignore_errors=True)
    return summary
