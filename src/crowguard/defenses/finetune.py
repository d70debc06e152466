"""Equal-budget fine-tuning: CROW's run with ``alpha = 0`` and no perturbation.

Same clean samples, epochs, schedule and learning rate as CROW, so any difference in the results is the consistency
regularisation's (the reference code ran this baseline at a different learning rate).
"""

from __future__ import annotations

from crowguard.defenses.crow import CrowDefense
from crowguard.schemas import CrowConfig


class FinetuneDefense(CrowDefense):
    name = "finetune"

    def crow_settings(self) -> CrowConfig:
        return CrowConfig(alpha=0.0, epsilon=0.0, layers=self.cfg.crow.layers)
