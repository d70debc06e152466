"""The shared vocabulary of crowguard: plain, dependency-free records passed between stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class NonFiniteError(FloatingPointError):
    """A model, its training or one of its metrics went non-finite (nan or inf). Never reported as a number: a
    model with nan weights emits garbage that no judge scores as the attack, which reads as "ASR 0%"."""


@dataclass(frozen=True)
class Example:
    """One Alpaca-style instruction example.

    `meta` carries provenance (e.g. ``{"poisoned": True, "trigger": "badnet", "payload": "negsentiment"}``) and is
    never shown to a model.
    """

    instruction: str
    input: str = ""
    output: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self, with_meta: bool = False) -> dict[str, Any]:
        """Alpaca JSON record (``instruction``, ``input``, ``output``), optionally with ``meta``."""
        record = {"instruction": self.instruction, "input": self.input, "output": self.output}
        if with_meta and self.meta:
            record["meta"] = dict(self.meta)
        return record

    def replace(self, **changes: Any) -> Example:
        """A copy with some fields changed (examples are immutable so poisoning can never edit its input)."""
        values = asdict(self)
        values.update(changes)
        return Example(**values)


@dataclass(frozen=True)
class Generation:
    """A model's response to one prompt, with the exact prompt text it saw."""

    prompt: str
    response: str
    num_new_tokens: int
    example: Example | None = None
