"""The engine's Trainer callbacks: stop at a non-finite gradient or weight, log every record to ``metrics.jsonl``,
and one progress bar over optimizer steps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from crowguard.losses import first_non_finite
from crowguard.types import NonFiniteError


class TrainingDivergedError(NonFiniteError):
    """Training produced a non-finite gradient or trainable weight; it stopped and nothing was saved."""


class FiniteGuard(TrainerCallback):
    """Stop at the first non-finite gradient (before the optimizer applies it) or trainable weight (after a step):
    a nan loss, or an update that overflows, would otherwise train a broken model to the end and save it, and a model
    that emits garbage scores ASR 0%. Runs every optimizer step (a norm per trainable tensor, one sync). Under fp16
    an inf gradient is the loss scaler's business (it skips that step), so only the weights are checked."""

    def __init__(self, check_gradients: bool = True) -> None:
        self.check_gradients = check_gradients

    def _check(self, model: Any, state: Any, grads: bool) -> None:
        if model is None:
            return
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        named = [(n, p.grad) for n, p in trainable if p.grad is not None] if grads else trainable
        if (name := first_non_finite(named)) is not None:
            what = "gradient" if grads else "weight after the update"
            raise TrainingDivergedError(
                f"training diverged at step {state.global_step + int(grads)}: non-finite {what} of {name}; nothing "
                "was saved (lower the learning rate, or check the data and the model)"
            )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.check_gradients:
            self._check(model, state, grads=True)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._check(model, state, grads=False)


class MetricsFileCallback(TrainerCallback):
    """Append every log record (step, losses, learning rate) to ``metrics.jsonl``, with ``elapsed_s``: seconds since
    this process began training (a resumed run starts again at 0), so step costs can be read off the log."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.start = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            elapsed = round(time.perf_counter() - self.start, 3)
            record = {"step": state.global_step, "epoch": state.epoch, **logs, "elapsed_s": elapsed}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


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
