"""A stage's artefact, and one training stage from start to finish (shared by ``backdoor`` and every training
defense). A component below both ``defenses`` and ``recipes``: neither package is imported here.

:func:`stage_artefact` is the one writer of a stage's output directory, for training and training-free stages
alike: whatever the stage puts in the temporary directory, plus ``config.yaml``, ``train_summary.json`` (or another
summary), ``manifest.json`` and, for a model directory, the model card ``README.md`` (:mod:`crowguard.card`),
renamed into place in one step.

:func:`run_training_stage`: load the model (untrusted: safetensors, no remote code) -> make it trainable (LoRA /
full / continue or merge an attached adapter) -> train with the one engine -> write the artefact (with
``metrics.jsonl``) through :func:`stage_artefact`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crowguard.card import is_model_dir, write_model_card
from crowguard.config import ConfigError, save
from crowguard.data import examples_sha256
from crowguard.io import atomic_output_dir, check_output_dir, output_lock, write_json_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import arrives_with_adapter, base_of_adapter, is_adapter_dir, load_model, save_model
from crowguard.resume import latest_checkpoint, require_checkpoint
from crowguard.schemas import ModelConfig, TrainConfig
from crowguard.speed import resolve_auto_levers
from crowguard.train import CrowSettings, Objective, prepare_for_training, train
from crowguard.types import Example, StageContext


@contextmanager
def stage_artefact(
    stage: str,
    out_dir: Path,
    seed: int | None,
    inputs: Mapping[str, str],
    summary: dict[str, Any],
    resolved_config: Any = None,
    overwrite: bool = False,
    summary_name: str = "train_summary.json",
    extra_manifest: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory for the stage's own files; on a clean exit add ``config.yaml`` (when given),
    the summary and ``manifest.json`` (inputs hashed, versions, seed) and rename it to ``out_dir`` atomically.

    ``summary`` and ``extra_manifest`` are read after the body, so the body may still add to them; ``fingerprint``
    (the experiment runner's, from :class:`StageContext`) goes into the manifest.
    """
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        yield tmp
        if resolved_config is not None:
            save(resolved_config, tmp / "config.yaml")
        write_json_atomic(tmp / summary_name, summary)
        extra = {"summary": summary, **(extra_manifest or {}), **({"fingerprint": fingerprint} if fingerprint else {})}
        write_manifest(tmp, build_manifest(stage, seed, dict(inputs), extra))
        if is_model_dir(tmp):
            write_model_card(tmp, Path(out_dir))


OPTIMIZER_PACKAGES = {"paged_adamw_8bit": "bitsandbytes"}


def check_optimizer(optim: str) -> None:
    """Refuse, before any model loads, an optimizer whose package is missing (bitsandbytes: CUDA machines)."""
    import importlib.util

    package = OPTIMIZER_PACKAGES.get(optim)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.optim {optim!r} needs the {package} package (CUDA GPUs only): pip install "
                          f"{package}, or choose adamw_torch")  # fmt: skip


def check_precision(precision: str) -> None:
    """Refuse, before any model loads, fp16 autocast without a CUDA GPU (the CPU has no fp16 autocast; the run
    would silently train in float32 under an fp16 label)."""
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision fp16 needs a CUDA GPU and this machine has none; use fp32 (or bf16)")


def stage_inputs(model_cfg: ModelConfig, inputs: Mapping[str, str] | None = None) -> dict[str, str]:
    """The inputs a stage's ``manifest.json`` hashes: the model, its adapter and what the recipe passed (the data)."""
    all_inputs = {"model": model_cfg.name_or_path, **(inputs or {})}
    if model_cfg.adapter:
        all_inputs["adapter"] = model_cfg.adapter
    return all_inputs


def placement(model: Any) -> dict[str, str]:
    """Where a stage ran the model: the device and dtype of its first parameter (for ``manifest.json``)."""
    parameter = next(model.parameters())
    return {"device": str(parameter.device), "dtype": str(parameter.dtype)}


def work_dir_for(out_dir: Path) -> Path:
    """Where checkpoints of a run into ``out_dir`` live until it succeeds (``--resume`` reads them)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.work"


def _output_base(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str | None:
    """The base a saved LoRA adapter must name so ``load_model`` can rebuild the trained model, or None when
    only a full model can represent it."""
    path = model_cfg.name_or_path
    adapter_dir = is_adapter_dir(path)
    if model_cfg.adapter is None and not adapter_dir:
        return path  # a new LoRA on a plain model
    if train_cfg.adapter_mode == "continue":
        return base_of_adapter(path) if adapter_dir else path  # the same adapter, trained further
    if model_cfg.adapter is None:
        return path  # a new LoRA on the merged adapter directory: load_model merges it again
    return None  # model + separate adapter, merged: save the merged model


def run_training_stage(
    stage: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    examples: Sequence[Example],
    ctx: StageContext,
    *,
    crow: CrowSettings | None = None,
    extra_summary: dict[str, Any] | None = None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    """Train and save (with CROW's loss, plain SFT, or a defense's ``objective``); returns the summary written to
    ``train_summary.json``. The output directory is locked
    (:func:`crowguard.io.output_lock`) from the checks to the final rename; a run that fails before its first
    checkpoint leaves no work directory behind."""
    out_dir = Path(ctx.out_dir)
    check_output_dir(out_dir, ctx.overwrite, stage_inputs(model_cfg, dict(ctx.inputs)).values())
    main_process = int(os.environ.get("RANK", "0")) == 0
    with output_lock(out_dir) if main_process else contextlib.nullcontext():
        return _train_and_save(stage, model_cfg, train_cfg, examples, ctx, crow, extra_summary, objective)


def _check_before_loading(model_cfg: ModelConfig, train_cfg: TrainConfig, work_dir: Path, resume: bool) -> None:
    """What can be refused before minutes of model loading: the optimizer, the precision, 4-bit's needs, and a
    resume without a checkpoint (which leaves nothing behind)."""
    check_optimizer(train_cfg.optim)
    check_precision(train_cfg.precision)
    if train_cfg.quantize_base == "4bit":
        from crowguard.models import check_4bit

        check_4bit()  # before minutes of loading
        if arrives_with_adapter(model_cfg.name_or_path, model_cfg.adapter) and train_cfg.adapter_mode != "continue":
            raise ConfigError("quantize_base 4bit with a model that has a LoRA adapter needs adapter_mode continue "
                              "(merging it would round it into 4-bit weights)")  # fmt: skip
    if resume:
        require_checkpoint(work_dir)  # before minutes of model loading, and leaving nothing


def _train_and_save(
    stage: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    examples: Sequence[Example],
    ctx: StageContext,
    crow: CrowSettings | None,
    extra_summary: dict[str, Any] | None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    out_dir, overwrite, resume, show_progress = Path(ctx.out_dir), ctx.overwrite, ctx.resume, ctx.show_progress
    resolved_config, inputs = ctx.resolved_config, dict(ctx.inputs)
    work_dir = work_dir_for(out_dir)
    train_cfg = resolve_auto_levers(train_cfg)  # the manifest records what ran
    _check_before_loading(model_cfg, train_cfg, work_dir, resume)
    identity = {key: getattr(model_cfg, key) for key in ("name_or_path", "adapter", "revision", "dtype", "template")}
    model, tokenizer = load_model(
        model_cfg.name_or_path,
        model_cfg.adapter,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        allow_pickle=model_cfg.allow_pickle,
        revision=model_cfg.revision,
        trainable_adapter=train_cfg.adapter_mode == "continue",
        quantize_4bit=train_cfg.quantize_base == "4bit",
    )
    model = prepare_for_training(model, train_cfg)
    try:
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
            objective=objective,
        )
    except BaseException:
        if work_dir.is_dir() and latest_checkpoint(work_dir) is None:  # nothing to resume: leave nothing
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    summary = {
        "stage": stage,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "final_loss": result.final_loss,
        "trainable_parameters": result.trainable_parameters,
        "n_examples": len(examples),
        "data_sha256": examples_sha256(examples),
        **(extra_summary or {}),
    }
    if int(os.environ.get("RANK", "0")) != 0:
        return summary  # under torchrun only the main process writes the artefact
    base = _output_base(model_cfg, train_cfg)
    trained = getattr(result.model, "module", result.model)
    where = {**placement(trained), "precision": train_cfg.precision, "base_dtype": train_cfg.base_dtype,
             "compile": train_cfg.compile, "trainer_args": train_cfg.trainer_args}  # fmt: skip
    with stage_artefact(stage, out_dir, train_cfg.seed, stage_inputs(model_cfg, inputs), summary, resolved_config,
                        overwrite, extra_manifest=where, fingerprint=ctx.fingerprint) as tmp:  # fmt: skip
        if base is None or train_cfg.merge_output:
            from crowguard.models import merge_adapter

            if base is not None:  # keep the adapter too
                save_model(trained, tokenizer, tmp / "adapter", base)
            trained = merge_adapter(trained)
        summary["artefact"] = save_model(trained, tokenizer, tmp, base)
        if (work_dir / "metrics.jsonl").exists():
            shutil.copy(work_dir / "metrics.jsonl", tmp / "metrics.jsonl")
    shutil.rmtree(work_dir, ignore_errors=True)
    return summary
