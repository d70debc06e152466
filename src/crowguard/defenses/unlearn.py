"""``unlearn``: remove a backdoor by unlearning its target under a simulated trigger.

A simulated trigger is fitted (the model frozen) until the model says the target after the defender's clean prompts;
the model then trains on the clean answers with it in place and without it, re-fitting it every ``refit_every``
steps. ``mechanism``: ``parrot`` (SANDE, Li et al., AAAI 2025, arXiv 2405.07667: soft tokens at the instruction's
start; :mod:`crowguard.parrot`) or ``residual`` (BEEAR, Zeng et al., EMNLP 2024: one vector added to the residual
stream entering a decoder layer over the prompt, and with ``unlikelihood`` the target pushed down under it;
:mod:`crowguard.drift`, written from the paper: its departures are in docs/design.md).

Inputs: the suspect model, the defender's clean samples and the target, typed (``target``) or the best candidate of
a ``crowguard invert`` folder (``target_from``, refused unless its verdict is backdoored). Never the trigger, the
attack config, the poisoned data or the unpoisoned base model (a test checks). Engine, adapter modes, seeds,
checkpoints and resume are CROW's; the simulated trigger is saved with each checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from crowguard.config import ConfigError, knob
from crowguard.defenses.base import Defense, DefenseResult
from crowguard.schemas import ModelConfig
from crowguard.types import Example, StageContext


@dataclass
class UnlearnConfig:
    target: str = knob("", "the backdoor's target text, e.g. the refusal sentence (this or target_from is required)")
    target_from: str = knob("", "a `crowguard invert` output directory: the target is its best candidate (refused "
                            "unless its verdict is backdoored)")  # fmt: skip
    mechanism: Literal["parrot", "residual"] = knob(
        "parrot",
        "the simulated trigger: parrot (SANDE: soft tokens at the instruction's start) or residual (BEEAR: "
        "one vector added to the residual stream entering decoder layer `layer` at every prompt position)",
        neutral="parrot",
    )
    soft_tokens: int = knob(8, "length of the parrot (learned input embeddings at the instruction's start)",
                            bounds="[1, inf)")  # fmt: skip
    fit_steps: int = knob(30, "Adam steps fitting the parrot before training (model frozen)", bounds="[1, inf)")
    refit_every: int = knob(10, "re-fit the parrot every N optimizer steps", bounds="[1, inf)")
    refit_steps: int = knob(5, "Adam steps of each re-fit", bounds="[0, inf)")
    fit_lr: float = knob(0.01, "the parrot's Adam learning rate", bounds="(0, inf)")
    fit_batch: int = knob(8, "clean prompts per fitting step (cycled in a seeded order)", bounds="[1, inf)")
    weight: float = knob(1.0, "weight of the clean-answer loss with the parrot in place", bounds="[0, inf)")
    layer: int = knob(-1, "residual: the decoder layer whose input is perturbed (-1: a third of the depth)",
                      bounds="[-1, inf)", neutral=-1)  # fmt: skip
    unlikelihood: float = knob(0.0, "weight of lowering the target's likelihood after the clean prompts under the "
                               "simulated trigger (mean -log(1 - p) over its tokens)", bounds="[0, inf)",
                               neutral=0.0)  # fmt: skip

    fused: bool = knob(False, "one forward per micro-batch over the clean rows and the simulated ones stacked "
                       "(padded to one width), not one forward each: the same loss up to float rounding, fewer "
                       "small operations (faster on a CPU)", neutral=False)  # fmt: skip

    def validate(self) -> None:
        if self.target.strip() and self.target_from:
            raise ValueError("target and target_from are both set; give the target text or an inversion, not both")


class UnlearnDefense(Defense):
    name = "unlearn"
    kind = "training"
    Config = UnlearnConfig

    def check(self) -> None:
        self.target_text()

    def target_text(self) -> str:
        """The target: ``target``, or the best candidate of the inversion in ``target_from`` (read and checked
        here, so a bad file stops the run before any model loads)."""
        if self.settings.target_from:
            from crowguard.invert import inverted_target

            return inverted_target(self.settings.target_from)[0]
        if not self.settings.target.strip():
            raise ConfigError("defense.unlearn.target is empty: unlearn needs the backdoor's target text "
                              "(--unlearn-target \"...\") or a `crowguard invert` output directory "
                              "(--unlearn-target-from DIR)")  # fmt: skip
        return self.settings.target

    def run(self, model: ModelConfig, clean_data: list[Example], ctx: StageContext) -> DefenseResult:
        from crowguard.config import to_dict
        from crowguard.invert import INVERSION_FILE
        from crowguard.parrot import UnlearnObjective
        from crowguard.stage import run_training_stage

        text, inverted = self.target_text(), self.settings.target_from
        source = f"inverted:{inverted}" if inverted else "given"
        if inverted:  # the manifest hashes the inversion the target came from
            ctx = replace(ctx, inputs={**ctx.inputs, "inversion": str(Path(inverted) / INVERSION_FILE)})
        objective = UnlearnObjective(replace(self.settings, target=text), self.cfg.train.seed)
        summary = run_training_stage(
            f"defend:{self.name}", model, self.cfg.train, clean_data, ctx, objective=objective,
            extra_summary={"defense": self.name, "kind": self.kind, "unlearn": to_dict(self.settings),
                           "target": text, "target_source": source},
        )  # fmt: skip
        return DefenseResult(model_path=str(ctx.out_dir), summary=summary)
