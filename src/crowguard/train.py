"""The one fine-tuning engine: ``transformers.Trainer`` + ``peft``, used to plant backdoors and by every
training defense (plain fine-tuning is CROW with ``alpha = 0``).

The only ``Trainer`` subclass, :class:`CrowTrainer`, replaces ``compute_loss`` with :func:`crowguard.losses.crow_loss`
(per-micro-batch mean; the Trainer divides by the accumulation steps) and logs ``lm_loss``, ``consistency_loss`` and
``consistency_adv`` separately. Checkpoints go to a persistent work directory beside the output so ``resume``
continues a crashed run; the final artefact is written atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from crowguard.data import IGNORE_INDEX, tokenize_examples
from crowguard.losses import crow_loss, masked_lm_loss
from crowguard.schemas import CrowConfig, TrainConfig
from crowguard.types import Example

PART_NAMES = ("lm_loss", "consistency_loss", "consistency_adv", "epsilon_effective")


class TokenizedDataset(torch.utils.data.Dataset):
    """Pre-tokenised examples (lists of ids), padded per batch by the collator."""

    def __init__(self, features: Sequence[dict[str, list[int]]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


class CrowTrainer(Trainer):
    """``Trainer`` whose loss is ``L_LM + alpha * L_cons(x + delta)`` (CROW); ``crow=None`` means plain SFT."""

    loss_is_scaled_for_ga = False  # crow_loss is a per-micro-batch mean; the Trainer divides by accumulation steps

    def __init__(self, *args: Any, crow: CrowConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crow = crow
        self._part_sums: dict[str, float] = {}
        self._part_count = 0

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.crow is None:  # plain SFT: one forward, no hidden states
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).logits
            loss = masked_lm_loss(logits, inputs["labels"])
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
        )
        if model.training:
            for name in PART_NAMES:
                if name in parts:
                    self._part_sums[name] = self._part_sums.get(name, 0.0) + float(parts[name])
            self._part_count += 1
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._part_count and "loss" in logs:
            for name, total in self._part_sums.items():
                logs[name] = round(total / self._part_count, 6)
            self._part_sums, self._part_count = {}, 0
        super().log(logs, *args, **kwargs)


class MetricsFileCallback(TrainerCallback):
    """Append every log record (step, losses, learning rate) to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class ProgressBarCallback(TrainerCallback):
    """One tqdm bar over optimizer steps, showing the latest losses; tqdm supplies the ETA."""

    def __init__(self, description: str = "train") -> None:
        self.description = description
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.description, unit="step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "lm_loss", "consistency_adv") if k in logs}
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        if cfg.adapter_mode == "continue":
            for name, param in model.named_parameters():
                param.requires_grad = "lora_" in name
            return model
        model = model.merge_and_unload()
        finetune = "full" if cfg.adapter_mode == "full" else cfg.finetune
    else:
        finetune = cfg.finetune
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
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


def training_arguments(cfg: TrainConfig, work_dir: Path) -> TrainingArguments:
    """``TrainingArguments`` from crowguard's ``TrainConfig`` (paper defaults: cosine, warmup 0.1, 2 x 4)."""
    use_cuda = torch.cuda.is_available()
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
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        use_cpu=not use_cuda,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # CROW detaches the input embeddings: a trainable, untied embedding matrix gets no gradient, which DDP
        # must be told about (transformers' default turns the search on unless gradient checkpointing is used).
        ddp_find_unused_parameters=None,
        logging_first_step=True,
        # gradient checkpointing is enabled on the model in prepare_for_training; the argument is left at its
        # default (renamed activation_checkpointing in transformers 5.2x, so naming it warns on every run)
    )


def latest_checkpoint(work_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` directory in ``work_dir``, or None."""
    checkpoints = sorted(Path(work_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    work_dir: Path,
    crow: CrowConfig | None = None,
    template: str = "alpaca",
    resume: bool = False,
    show_progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Fine-tune ``model`` on ``examples`` (prompt masked) with optional CROW regularisation.

    ``model`` must already be prepared (:func:`prepare_for_training`). Checkpoints (every ``cfg.save_steps``) and
    ``metrics.jsonl`` go to ``work_dir``; with ``resume`` the newest checkpoint there is continued.
    """
    features = tokenize_examples(examples, tokenizer, cfg.max_length, template)
    if not any(any(label != IGNORE_INDEX for label in f["labels"]) for f in features):
        raise ValueError("no example has a response token to learn: check the data's 'output' fields")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    callbacks: list[TrainerCallback] = [MetricsFileCallback(work_dir / "metrics.jsonl")]
    if show_progress:
        callbacks.append(ProgressBarCallback(description))
    checkpoint = latest_checkpoint(work_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* directory in {work_dir}")
    if not resume and (work_dir / "metrics.jsonl").exists():
        (work_dir / "metrics.jsonl").unlink()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    trainer = CrowTrainer(
        model=model,
        args=training_arguments(cfg, work_dir),
        train_dataset=TokenizedDataset(features),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=callbacks,
        crow=crow,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress bar and metrics.jsonl replace the raw log prints
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        tokenizer.padding_side = padding_side
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    final = losses[-1] if losses else None
    if final is not None and not math.isfinite(final):
        raise FloatingPointError(f"training diverged: final loss {final}")
    return TrainResult(
        model=trainer.model,
        steps=output.global_step,
        seconds=seconds,
        final_loss=final,
        log_history=list(trainer.state.log_history),
        trainable_parameters=trainable,
    )
