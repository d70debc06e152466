"""The one fine-tuning engine: ``transformers.Trainer`` + ``peft``, used to plant backdoors and by every
training defense (plain fine-tuning is CROW with ``alpha = 0``).

The only ``Trainer`` subclass, :class:`CrowTrainer`, replaces ``compute_loss`` with :func:`crowguard.losses.crow_loss`
and logs ``lm_loss``, ``consistency_loss`` and ``consistency_adv`` separately. How a step's loss is averaged is
``TrainConfig.loss_average`` and never the installed transformers' choice: the Trainer's own token counting is
switched off (``model_accepts_loss_kwargs = False``, ``loss_is_scaled_for_ga = False``), so every version from 5.0
on divides each micro-batch's loss by the accumulation steps, and ``token`` mode counts the step's tokens itself.
Checkpoints go to a persistent work directory beside the output so ``resume`` continues a crashed run; the final
artefact is written atomically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from crowguard.config import ConfigError
from crowguard.data import IGNORE_INDEX, tokenize_examples
from crowguard.losses import count_loss_tokens, crow_loss, masked_lm_loss
from crowguard.resume import check_resume, run_settings, start_fresh, truncate_metrics
from crowguard.schemas import TrainConfig
from crowguard.speed import resolve_auto_levers, training_levers, warn_if_slow_bfloat16
from crowguard.train_callbacks import (
    FiniteGuard,
    MetricsFileCallback,
    ProgressBarCallback,
    TrainingDivergedError,
)
from crowguard.types import Example

PART_NAMES = ("lm_loss", "consistency_loss", "consistency_adv", "epsilon_effective")


def regroup_by_length(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The rows of one optimizer step's right-padded micro-batches (``input_ids``, ``attention_mask``, ``labels``,
    each (B_i, T_i)), re-dealt longest first into micro-batches of the same sizes B_1, B_2, ..., each padded
    (``pad_id``, mask 0, label ``IGNORE_INDEX``) only to its own longest row. In ``token`` loss mode a step's loss is
    a sum over its real tokens over step-wide counts, so the regrouping changes only the order of float additions
    and the work spent on padding.
    """
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    rows: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        if set(batch) != set(pad_values):
            raise ValueError(f"regroup_by_length: micro-batch keys {sorted(batch)}, expected {sorted(pad_values)}")
        mask = batch["attention_mask"]
        lengths = mask.sum(-1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        if not torch.equal(mask.bool(), positions < lengths.unsqueeze(-1)):
            raise ValueError("regroup_by_length: every row must be right-padded (mask ones, then zeros)")
        for row, n in enumerate(lengths.tolist()):
            rows.append({key: tensor[row, :n] for key, tensor in batch.items()})
    rows.sort(key=lambda r: r["input_ids"].shape[0], reverse=True)  # stable: ties keep the sampler's order
    regrouped, start = [], 0
    for batch in batches:
        group = rows[start : start + batch["input_ids"].shape[0]]
        start += len(group)
        width = group[0]["input_ids"].shape[0]
        regrouped.append({
            key: torch.stack([torch.nn.functional.pad(r[key], (0, width - r[key].shape[0]), value=value)
                              for r in group])
            for key, value in pad_values.items()
        })  # fmt: skip
    return regrouped


class CrowSettings(Protocol):
    """What the engine reads of CROW's settings (:class:`crowguard.defenses.crow.CrowConfig` has them): the engine
    sits below the defenses and takes plain settings, not a defense's config class."""

    alpha: float
    epsilon: float
    epsilon_mode: str
    layers: str | list[int]
    steps: int


class Objective(Protocol):
    """A training objective other than CROW's, brought by a defense (``unlearn``): it adds per-example fields to
    the tokenised features (and collates them), gives each micro-batch's loss and logged parts, brings callbacks,
    and describes itself for the resume check."""

    def prepare(self, features: list[dict[str, list[int]]], examples: Sequence[Example], tokenizer: Any,
                template: str) -> list[dict[str, Any]]: ...  # fmt: skip

    def collate(self, collator: Any) -> Any: ...

    def compute(self, model: Any, inputs: dict[str, torch.Tensor], num_items: Any) -> tuple[torch.Tensor, dict]: ...

    def callbacks(self, checkpoint: str | None) -> list[TrainerCallback]: ...

    def describe(self) -> dict[str, Any]: ...


class TokenizedDataset(torch.utils.data.Dataset):
    """Pre-tokenised examples (lists of ids), padded per batch by the collator."""

    def __init__(self, features: Sequence[dict[str, list[int]]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


class CrowTrainer(Trainer):
    """``Trainer`` whose loss is ``L_LM + alpha * L_cons(x + delta)`` (CROW); ``crow=None`` means plain SFT.

    ``loss_average="token"``: each micro-batch contributes its token sums over the whole optimizer step's token
    counts (label tokens for the LM loss, real tokens for the consistency loss, summed over the accumulated
    micro-batches and gathered over processes), so the step's loss and gradient do not depend on how the batch is
    split into micro-batches and ranks. ``"micro_batch"``: the mean of per-micro-batch means (the reference code).
    ``regroup_pad_id`` (token mode): each step's micro-batches are re-dealt by length (:func:`regroup_by_length`).
    """

    # Both switches make the Trainer treat compute_loss's value as a per-micro-batch quantity and divide it by the
    # accumulation steps, on every version: before 5.19 the rule was "model_accepts_loss_kwargs and a token count
    # exists => do not divide", from 5.19 on loss_is_scaled_for_ga decides. Token mode undoes that division itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        crow: CrowSettings | None = None,
        loss_average: str = "token",
        regroup_pad_id: int | None = None,
        objective: Objective | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        if loss_average not in ("token", "micro_batch"):
            raise ValueError(f'loss_average must be "token" or "micro_batch", got {loss_average!r}')
        self.model_accepts_loss_kwargs = False  # no Trainer token counting: crowguard counts (token mode) itself
        self.crow = crow
        self.loss_average = loss_average
        self.regroup_pad_id = regroup_pad_id if loss_average == "token" else None
        self._step_counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._part_sums: dict[str, tuple[float, float]] = {}  # name -> (weighted sum, sum of weights)

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's micro-batches of one optimizer step; in token mode also their token counts, all ranks."""
        batch_samples, num_items = super().get_batch_samples(*args, **kwargs)
        self._step_counts = None
        if self.regroup_pad_id is not None and len(batch_samples) > 1:
            batch_samples = regroup_by_length(batch_samples, self.regroup_pad_id)
        if self.loss_average == "token" and batch_samples:
            counts = torch.tensor(
                [count_loss_tokens(b["labels"], b.get("attention_mask")) for b in batch_samples], dtype=torch.float64
            ).sum(0)
            if self.args.world_size > 1:
                counts = self.accelerator.gather(counts.to(self.args.device)).reshape(-1, 2).sum(0).cpu()
            self._step_counts = (counts[0], counts[1])
        return batch_samples, num_items

    def _denominators(self, model: Any) -> tuple[Any, Any, float]:
        """``(num_items, num_tokens, scale)`` for this micro-batch: step-wide counts and the factor that undoes the
        Trainer's division by the accumulation steps and DDP's mean over ranks (token mode, training only)."""
        if self.loss_average != "token" or not model.training or self._step_counts is None:
            return None, None, 1.0
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        items, tokens = self._step_counts
        return items.clamp_min(1).item(), tokens.clamp_min(1).item(), float(steps * self.args.world_size)

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        num_items, num_tokens, scale = self._denominators(model)
        if self.objective is not None:  # a defense's own objective (unlearn); its parts are per-item means
            loss, parts = self.objective.compute(model, inputs, num_items)
            if model.training:
                items = 1 if num_items is None else count_loss_tokens(inputs["labels"], None)[0]
                self._add_parts({name: (value, items) for name, value in parts.items()})
            loss = loss * scale
            return (loss, None) if return_outputs else loss
        if self.crow is None:  # plain SFT: one forward, no hidden states
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).logits
            loss = masked_lm_loss(logits, inputs["labels"], num_items) * scale
            return (loss, None) if return_outputs else loss
        crow = self.crow
        loss, parts = crow_loss(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["labels"],
            alpha=crow.alpha,
            epsilon=crow.epsilon,
            layers=crow.layers,
            epsilon_mode=crow.epsilon_mode,
            steps=crow.steps,
            num_items=num_items,
            num_tokens=num_tokens,
        )
        loss = loss * scale
        if model.training:
            # Logged parts are averaged like the loss: over tokens in token mode (so loss = lm_loss + alpha *
            # consistency_adv holds in the logs), over micro-batches otherwise.
            items, tokens = (
                (1, 1) if num_items is None else count_loss_tokens(inputs["labels"], inputs.get("attention_mask"))
            )
            self._add_parts({name: (parts[name], items if name == "lm_loss" else tokens)
                             for name in PART_NAMES if name in parts})  # fmt: skip
        return (loss, None) if return_outputs else loss

    def _add_parts(self, weighted: dict[str, tuple[float, float]]) -> None:
        """Accumulate each logged part's ``(value, weight)`` until the next log, which shows the weighted means."""
        for name, (value, weight) in weighted.items():
            total, weights = self._part_sums.get(name, (0.0, 0.0))
            self._part_sums[name] = (total + float(weight) * float(value), weights + float(weight))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._part_sums and "loss" in logs:
            names = list(self._part_sums)
            sums = torch.tensor([self._part_sums[name] for name in names], dtype=torch.float64)
            if self.args.world_size > 1:  # every rank logs (the Trainer gathers its loss): the parts over all ranks
                sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
            for name, (total, weights) in zip(names, sums.tolist()):
                logs[name] = round(total / max(weights, 1e-12), 6)
            self._part_sums = {}
        super().log(logs, *args, **kwargs)


@dataclass
class TrainResult:
    """What a training run produced and what it cost."""

    model: Any
    steps: int
    seconds: float
    final_loss: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainable_parameters: int = 0


def prepare_for_training(model: Any, cfg: TrainConfig) -> Any:
    """Make ``model`` trainable as ``cfg`` says: a new LoRA, full fine-tuning, or continue an attached adapter.

    A model that arrives as a ``PeftModel`` (a LoRA adapter on a base) follows ``cfg.adapter_mode``: ``continue``
    trains that adapter further (the reference code), ``merge`` merges it and trains a new LoRA, ``full`` merges
    it and trains every weight.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    quantized = bool(getattr(model, "is_loaded_in_4bit", False))
    if quantized:  # QLoRA: norms in fp32, input gradients for checkpointing (peft's preparation)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    if isinstance(model, PeftModel):
        if cfg.adapter_mode == "continue":
            for name, param in model.named_parameters():
                param.requires_grad = "lora_" in name
            _enable_checkpointing(model, cfg)
            return model
        if quantized:
            raise ConfigError("train.adapter_mode merge with quantize_base 4bit would merge the adapter into "
                              "rounded 4-bit weights; use adapter_mode continue (QLoRA trains the adapter it is "
                              "given)")  # fmt: skip
        model = model.merge_and_unload()
        finetune = "full" if cfg.adapter_mode == "full" else cfg.finetune
    else:
        finetune = cfg.finetune
    _enable_checkpointing(model, cfg)
    if finetune == "full":
        for param in model.parameters():
            param.requires_grad = True
        return model
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    # The Trainer seeds the RNG only when it starts, after the adapter exists: seed the LoRA initialisation here
    # (without disturbing the caller's RNG) so cfg.seed decides it, whatever ran before in the process.
    from crowguard.models import without_peft_deprecation_warning

    with torch.random.fork_rng(devices=[]), without_peft_deprecation_warning():
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora)


def _enable_checkpointing(model: Any, cfg: TrainConfig) -> None:
    """Gradient checkpointing (non-reentrant, so frozen inputs and LoRA need no input-grad hook) when asked."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def training_arguments(cfg: TrainConfig, work_dir: Path, find_unused_parameters: bool = False) -> TrainingArguments:
    """``TrainingArguments`` from crowguard's ``TrainConfig`` (paper defaults: cosine, warmup 0.1, 2 x 4); the
    defaults below (no reporting, 2 checkpoints kept, no loader workers) give way to ``cfg.trainer_args``."""
    use_cuda = torch.cuda.is_available()
    defaults = {"report_to": "none", "save_total_limit": 2, "dataloader_num_workers": 0}
    return TrainingArguments(
        output_dir=str(work_dir),
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        use_cpu=not use_cuda,
        remove_unused_columns=False,
        disable_tqdm=True,
        # every trainable parameter gets a gradient each step (CROW's LM term reaches a trainable embedding matrix
        # too), so no search; never left to the Trainer's checkpointing-dependent default
        ddp_find_unused_parameters=find_unused_parameters,
        logging_first_step=True,
        # gradient checkpointing is enabled on the model in prepare_for_training; the argument is left at its
        # default (renamed activation_checkpointing in transformers 5.2x, so naming it warns on every run)
        **{**defaults, **cfg.trainer_args},
    )


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    work_dir: Path,
    crow: CrowSettings | None = None,
    template: str = "alpaca",
    resume: bool = False,
    show_progress: bool = True,
    description: str = "train",
    identity: Any = None,
    objective: Objective | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Fine-tune ``model`` on ``examples`` (prompt masked) with optional CROW regularisation, or a defense's own
    ``objective`` instead.

    ``model`` must already be prepared (:func:`prepare_for_training`). ``cfg.base_dtype`` and ``cfg.compile`` hold
    for the run only (:func:`crowguard.speed.training_levers`): the model returned has its loaded dtype and runs
    eagerly. Checkpoints (every ``cfg.save_steps``),
    ``metrics.jsonl`` and the run's settings go to ``work_dir``; with ``resume`` the newest checkpoint there is
    continued, but only when the settings, the tokenised data and ``identity`` (the caller's name for the model)
    are the checkpointed run's (:class:`ResumeError` otherwise). ``callbacks`` are more ``TrainerCallback``s (a
    benchmark's step probe).
    """
    cfg = resolve_auto_levers(cfg)
    features = tokenize_examples(examples, tokenizer, cfg.max_length, template)
    if not any(any(label != IGNORE_INDEX for label in f["labels"]) for f in features):
        raise ValueError("no example has a response token to learn: check the data's 'output' fields")
    work_dir = Path(work_dir)
    settings = run_settings(cfg, crow, template, features, identity)
    if objective is not None:
        settings["objective"] = objective.describe()
        features = objective.prepare(features, examples, tokenizer, template)
    checkpoint = check_resume(work_dir, settings) if resume else None
    if checkpoint is None:
        start_fresh(work_dir, settings)
    else:
        truncate_metrics(work_dir / "metrics.jsonl", int(Path(checkpoint).name.split("-")[-1]))
    trainer_callbacks: list[TrainerCallback] = [
        FiniteGuard(cfg.precision != "fp16"),
        MetricsFileCallback(work_dir / "metrics.jsonl"),
        *callbacks,
    ]
    if show_progress:
        trainer_callbacks.append(ProgressBarCallback(description))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    if objective is not None:
        trainer_callbacks += objective.callbacks(checkpoint)
        collator = objective.collate(collator)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    trainer = CrowTrainer(
        model=model,
        args=training_arguments(cfg, work_dir),
        train_dataset=TokenizedDataset(features),
        data_collator=collator,
        callbacks=trainer_callbacks,
        crow=crow,
        loss_average=cfg.loss_average,
        # regrouping re-deals the collator's three tensors; an objective's own fields are not among them
        regroup_pad_id=(tokenizer.pad_token_id or 0) if cfg.regroup_micro_batches and objective is None else None,
        objective=objective,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress bar and metrics.jsonl replace the raw log prints
    start = time.perf_counter()
    try:
        trainer_compiles = bool(cfg.trainer_args.get("torch_compile"))
        if cfg.precision == "bf16":
            warn_if_slow_bfloat16("train.precision bf16", next(model.parameters()).device)
        if cfg.base_dtype == "bfloat16":
            warn_if_slow_bfloat16("train.base_dtype bfloat16", next(model.parameters()).device)
        with training_levers(model, cfg.compile, cfg.base_dtype, trainer_compiles):  # undone when training ends
            output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        tokenizer.padding_side = padding_side
    return _result(trainer, model, output.global_step, time.perf_counter() - start)


def _result(trainer: CrowTrainer, model: Any, steps: int, seconds: float) -> TrainResult:
    """What a finished run produced; a final loss that is not finite is an error (nothing gets saved)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final = losses[-1] if losses else None
    if final is not None and not math.isfinite(final):
        raise TrainingDivergedError(f"training diverged: final loss {final}; nothing was saved")
    return TrainResult(
        model=trainer.model,
        steps=steps,
        seconds=seconds,
        final_loss=final,
        log_history=list(trainer.state.log_history),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
