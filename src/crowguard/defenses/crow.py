"""CROW: internal consistency regularisation (Min, Pham, Li, Sun, ICML 2025, https://arxiv.org/abs/2411.12768).

Fine-tunes on clean data with ``L = L_LM + alpha * L_cons(x + delta)``, where ``L_cons`` is the mean ``1 - cos``
between consecutive hidden states over real tokens and ``delta`` one FGSM step on the input embeddings
(see :func:`crowguard.losses.crow_loss`). Paper settings: 100 clean samples, epsilon 0.1, alpha 5.5, LoRA r 8 /
alpha 16 on all linear layers, lr 1e-3, 5 epochs, cosine, warmup 0.1, batch 2 x 4 (the shared ``defense.train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from crowguard.config import knob, to_dict
from crowguard.defenses.base import Defense, DefenseResult
from crowguard.schemas import ModelConfig
from crowguard.types import Example, StageContext


@dataclass
class CrowConfig:
    alpha: float = knob(
        5.5, "weight of the adversarial consistency loss (paper: 5.5; larger for some tasks)", bounds="[0, inf)"
    )
    epsilon: float = knob(
        0.1, "FGSM step on the input embeddings (absolute, per dimension, as in the paper)", bounds="[0, inf)"
    )
    epsilon_mode: Literal["absolute", "rms"] = knob(
        "absolute", "absolute: epsilon per dimension (paper); rms: epsilon x RMS of the real-token embeddings"
    )
    steps: int = knob(
        1,
        "perturbation steps: 1 = the paper's FGSM; k > 1 = PGD (k signed steps of 2.5 x epsilon / k, each projected "
        "back onto the epsilon ball; one extra forward per step; not the paper's method)",
    )
    layers: str | list[int] = knob(
        "reference",
        "layer pairs in the consistency loss: 'reference' (hidden_states[1:-2] vs [2:-1]), 'all', or a list of "
        "hidden-state indices l, each adding the pair (l, l+1)",
    )

    def validate(self) -> None:
        if self.alpha < 0 or self.epsilon < 0:
            raise ValueError("alpha and epsilon must not be negative")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (1 = the paper's FGSM step), got {self.steps}")
        if isinstance(self.layers, str) and self.layers not in ("reference", "all"):
            raise ValueError(f"layers must be 'reference', 'all' or a list of indices, got {self.layers!r}")


class CrowDefense(Defense):
    name = "crow"
    kind = "training"
    Config = CrowConfig

    def crow_settings(self) -> CrowConfig:
        return self.settings

    def run(
        self,
        model: ModelConfig,
        clean_data: list[Example],
        ctx: StageContext,
    ) -> DefenseResult:
        from crowguard.stage import run_training_stage

        crow = self.crow_settings()
        summary = run_training_stage(
            f"defend:{self.name}",
            model,
            self.cfg.train,
            clean_data,
            ctx,
            crow=crow,
            extra_summary={"defense": self.name, "kind": self.kind, "crow": to_dict(crow)},
        )
        return DefenseResult(model_path=str(ctx.out_dir), summary=summary)
