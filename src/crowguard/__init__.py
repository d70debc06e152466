"""crowguard: plant, remove and measure backdoors in causal language models.

Built around CROW (Min et al., ICML 2025, "Eliminating Backdoors from Large Language Models via Internal
Consistency Regularization", https://arxiv.org/abs/2411.12768). Importing the package is cheap: heavy libraries
(torch, transformers) are imported by the modules that need them, never here.
"""

from __future__ import annotations

__version__ = "0.1.0"
