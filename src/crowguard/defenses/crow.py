"""CROW: internal consistency regularisation (Min, Pham, Li, Sun, ICML 2025, https://arxiv.org/abs/2411.12768).

Fine-tunes on clean data with ``L = L_LM + alpha * L_cons(x + delta)``, where ``L_cons`` is the mean ``1 - cos``
between consecutive hidden states over real tokens and ``delta`` one FGSM step on the input embeddings
(see :func:`crowguard.losses.crow_loss`). Paper settings: 100 clean samples, epsilon 0.1, alpha 5.5, LoRA r 8 /
alpha 16 on all linear layers, lr 1e-3, 5 epochs, cosine, warmup 0.1, batch 2 x 4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crowguard.config import to_dict
from crowguard.defenses.base import DefenseResult
from crowguard.schemas import CrowConfig, DefenseConfig, ModelConfig
from crowguard.stage import run_training_stage
from crowguard.types import Example


class CrowDefense:
    name = "crow"

    def __init__(self, cfg: DefenseConfig) -> None:
        self.cfg = cfg

    def crow_settings(self) -> CrowConfig:
        return self.cfg.crow

    def run(
        self,
        model: ModelConfig,
        clean_data: list[Example],
        out_dir: Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        show_progress: bool = True,
        resolved_config: Any = None,
        inputs: dict[str, str] | None = None,
    ) -> DefenseResult:
        crow = self.crow_settings()
        summary = run_training_stage(
            f"defend:{self.name}",
            model,
            self.cfg.train,
            clean_data,
            Path(out_dir),
            crow=crow,
            resolved_config=resolved_config,
            inputs=inputs,
            overwrite=overwrite,
            resume=resume,
            show_progress=show_progress,
            extra_summary={"defense": self.name, "crow": to_dict(crow)},
        )
        return DefenseResult(model_path=str(out_dir), summary=summary)
