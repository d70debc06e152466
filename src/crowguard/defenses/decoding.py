"""Sampling as a defense: decode the guarded model with temperature / nucleus (top-p) sampling instead of greedily.

BackdoorLLM's Backdoor-DefenseBox lists it as "Decoding: adjusts temperature to reduce backdoor activation during
generation" (``DefenseBox/README.md``, citing arXiv 2402.06925). Its scripts (read at commit 591bb2f, Yige Li,
2025-05-23, "Update Backdoor DefenseBox", in the fork adrian-cheung/BackdoorLLM; the upstream bboylyg/BackdoorLLM
could not be fetched here) have no single default temperature, they sweep it:

* ``DefenseBox/defense_methods/decoding.py`` (the script the README runs), ``run_decoding_defense`` lines 67-73:
  ``GenerationConfig(temperature=T, top_p=0.75, num_beams=1, max_new_tokens=256)`` for
  ``T in [0.1, 0.3, 0.6, 0.9, 1.2, 2.0]`` (lines 114 and 121). It sets no ``do_sample``, and the transformers its
  ``requirements.txt`` pins (4.41.2-4.43.4) then decodes greedily and ignores the temperature, so as written that
  sweep appears to measure greedy decoding six times;
* ``DefenseBox/defense_methods/decode_defense.py`` lines 130-177 does sample (``do_sample=True``), with
  ``top_p=1.0``, 128 new tokens and ``T in [0.1, 0.5, 1.0, 1.5, 2.0, 3.0]``;
* neither sets ``top_k``, so transformers' ``GenerationConfig`` default of 50 applied; neither sets a seed.

crowguard samples explicitly (``do_sample`` on) with decoding.py's ``top_p`` 0.75, transformers' implicit
``top_k`` 50, and temperature 0.9, one value of decoding.py's sweep (a choice, not a DefenseBox default: sweep it
with ``--set defense.decoding.temperature=...``). The seed is a knob and is recorded. The number of new tokens is
the evaluation's (``evaluate.max_new_tokens``). Sampled output also depends on the batch composition (the hf
backend draws for the whole batch), so the same seed reproduces a result only with the same ``batch_size``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from crowguard.config import knob
from crowguard.defenses.base import Defense


@dataclass
class DecodingConfig:
    temperature: float = knob(
        0.9, "sampling temperature (BackdoorLLM DefenseBox sweeps 0.1-2.0 and has no single default; 0.9 is one value)"
    )
    top_p: float = knob(0.75, "nucleus sampling mass (DefenseBox decoding.py: 0.75; 1.0 = off)", bounds="(0, 1]")
    top_k: int = knob(
        50, "keep the k most likely tokens (0 = off; DefenseBox inherits transformers' default 50)", bounds="[0, inf)"
    )
    seed: int = knob(0, "sampling seed (recorded with the results)")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (greedy decoding is no defense), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")


class DecodingDefense(Defense):
    name = "decoding"
    kind = "decoding"
    Config = DecodingConfig
    needs_data = False

    def generator(self, spec: dict[str, Any], device: str = "auto") -> Any:
        """Crowguard's generation with sampling switched on at this defense's settings."""
        from crowguard.evaluation.generate import Generator

        settings: DecodingConfig = self.settings

        class Sampling(Generator):
            def effective_settings(self, base: Any) -> Any:
                from crowguard.evaluation.generate import DecodingSettings

                sampled = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
                return dataclasses.replace(base or DecodingSettings(), do_sample=True, seed=settings.seed, **sampled)

        return Sampling()
