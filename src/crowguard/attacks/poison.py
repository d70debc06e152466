"""Attack = Trigger x Payload, and the pure, seeded poisoning of a data set."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from crowguard.attacks.payloads import Payload
from crowguard.attacks.triggers import Trigger
from crowguard.config import ConfigError
from crowguard.types import Example


@dataclass(frozen=True)
class Attack:
    """A trigger paired with a payload; ``name`` is ``trigger/payload``."""

    trigger: Trigger
    payload: Payload

    @property
    def name(self) -> str:
        return f"{self.trigger.name}/{self.payload.name}"

    def poison(self, example: Example, rng: random.Random) -> Example:
        """The triggered prompt with the payload response, marked in ``meta``."""
        poisoned = self.payload.apply(self.trigger.apply(example, rng), rng)
        meta = {**poisoned.meta, "poisoned": True, "trigger": self.trigger.name, "payload": self.payload.name}
        return poisoned.replace(meta=meta)

    def describe(self) -> dict[str, object]:
        return {"trigger": self.trigger.describe(), "payload": self.payload.describe()}


def mark_clean(example: Example) -> Example:
    """A copy marked as not poisoned (content untouched)."""
    return example.replace(meta={**example.meta, "poisoned": False})


def num_poisoned(n: int, rate: float) -> int:
    """How many of ``n`` examples a ``rate`` poisons (rounded half up, so 0.5 of 3 is 2)."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"poison rate must be within [0, 1], got {rate}")
    return int(n * rate + 0.5)


def poison_dataset(examples: Sequence[Example], attack: Attack, rate: float, seed: int) -> list[Example]:
    """Poison exactly ``round(rate * len(examples))`` examples chosen with ``seed``; the rest are marked clean.

    Pure and deterministic: the input is not modified, order is kept, and the same arguments give the same
    output. Each example gets ``meta["poisoned"]``; poisoned ones also get ``trigger``, ``payload`` and the
    inserted ``trigger_phrases``.
    """
    k = num_poisoned(len(examples), rate)
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(examples)), k))
    return [attack.poison(e, rng) if i in chosen else mark_clean(e) for i, e in enumerate(examples)]


def trigger_free(examples: Sequence[Example], trigger: Trigger) -> tuple[list[Example], int]:
    """Drop examples whose prompt already holds a trigger phrase (e.g. a natural "2024" for mtba).

    Such examples would teach the model the opposite of the backdoor and make the clean test set contain the
    trigger; returns the kept examples and how many were dropped.
    """
    kept = [e for e in examples if not (trigger.any_phrase(e.instruction) or trigger.any_phrase(e.input))]
    return kept, len(examples) - len(kept)
