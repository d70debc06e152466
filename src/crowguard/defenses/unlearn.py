"""``unlearn``: remove a backdoor by unlearning its target under a simulated trigger (SANDE's parrot).

SANDE (Li et al., AAAI 2025, "Simulate and Eliminate: Revoke Backdoors for Generative Large Language Models",
arXiv 2405.07667). A soft prompt of ``soft_tokens`` input embeddings (the "parrot") is placed where a trigger sits,
at the start of the instruction, and fitted with the model frozen until the model says the target after the
defender's clean prompts. The model is then trained on the clean answers with the parrot in place and without it,
and the parrot is re-fitted every ``refit_every`` steps, so it keeps simulating whatever still elicits the target.
Neither CROW nor fine-tuning ever pairs a trigger-like input with the target; this does.

Inputs: the suspect model, the defender's clean samples and the target string: typed by the user (``target``;
its results say it was given, as CleanGen's say it needs a reference model) or read from a ``crowguard invert``
output directory (``target_from``: the best candidate of BAIT's inversion, :mod:`crowguard.invert`, refused unless
its verdict is backdoored). Never the trigger, the attack config, the poisoned data or the unpoisoned base model (a
test checks this module and its config for them). Training runs on crowguard's one engine (adapter modes, seeds,
checkpoints and resume as CROW's); the parrot is saved with each checkpoint. BEEAR's mechanism is not built yet
(issue 25).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from crowguard.config import ConfigError, knob
from crowguard.defenses.base import Defense, DefenseResult
from crowguard.schemas import ModelConfig
from crowguard.types import Example, StageContext


@dataclass
class UnlearnConfig:
    target: str = knob("", "the backdoor's target text, e.g. the refusal sentence (this or target_from is required)")
    target_from: str = knob("", "a `crowguard invert` output directory: the target is its best candidate (refused "
                            "unless its verdict is backdoored)")  # fmt: skip
    soft_tokens: int = knob(8, "length of the parrot (learned input embeddings at the instruction's start)",
                            bounds="[1, inf)")  # fmt: skip
    fit_steps: int = knob(30, "Adam steps fitting the parrot before training (model frozen)", bounds="[1, inf)")
    refit_every: int = knob(10, "re-fit the parrot every N optimizer steps", bounds="[1, inf)")
    refit_steps: int = knob(5, "Adam steps of each re-fit", bounds="[0, inf)")
    fit_lr: float = knob(0.01, "the parrot's Adam learning rate", bounds="(0, inf)")
    fit_batch: int = knob(8, "clean prompts per fitting step (cycled in a seeded order)", bounds="[1, inf)")
    weight: float = knob(1.0, "weight of the clean-answer loss with the parrot in place", bounds="[0, inf)")

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
