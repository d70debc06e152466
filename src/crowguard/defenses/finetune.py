"""Equal-budget fine-tuning: CROW's run with ``alpha = 0`` and no perturbation.

Same clean samples, epochs, schedule and learning rate as CROW (the shared ``defense.train``), so any difference in
the results is the consistency regularisation's (the reference code ran this baseline at a different learning rate).
It has no knobs of its own.
"""

from __future__ import annotations

from crowguard.defenses.crow import CrowConfig, CrowDefense


class FinetuneDefense(CrowDefense):
    name = "finetune"
    Config = None

    def crow_settings(self) -> CrowConfig:
        # alpha 0: the LM loss alone; the consistency terms are still logged, over CROW's pairs
        return CrowConfig(alpha=0.0, epsilon=0.0, layers=self.cfg.section("crow").layers)
