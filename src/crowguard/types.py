"""The shared vocabulary of crowguard: plain, dependency-free records passed between stages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


class Generator:
    """How an evaluation makes its answers: the contract a decoding defense (or another backend) implements.

    ``self(model, tokenizer, examples, template, settings, show_progress)`` gives one :class:`Generation` per example,
    in order; ``effective_settings(settings)`` is what decoding really ran with (recorded with the results);
    ``last_stats`` holds, after each call, one dict of numbers per example (added to its record) or None;
    ``summarize({set: stats of that set})`` gives extra entries for the metrics. This base class is crowguard's
    batched generation (:func:`crowguard.evaluation.generate.generate`).
    """

    last_stats: list[dict[str, Any]] | None = None

    def __call__(self, model: Any, tokenizer: Any, examples: Any, template: str = "alpaca", settings: Any = None,
                 show_progress: bool = True) -> list[Generation]:  # fmt: skip
        from crowguard.evaluation.generate import generate

        return generate(model, tokenizer, examples, template, self.effective_settings(settings), show_progress)

    def effective_settings(self, settings: Any) -> Any:
        """The ``DecodingSettings`` decoding really runs with, given those asked for (None: the defaults)."""
        from crowguard.evaluation.generate import DecodingSettings

        return settings or DecodingSettings()

    def summarize(self, stats: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage (a defense's run) writes: its output directory (None: it writes nothing, as ``none``),
    whether it may replace a non-empty one or resume its own checkpoints, whether it shows progress, the resolved
    config saved beside its artefact, the inputs its manifest hashes (name -> path) and the fingerprint the
    experiment runner reuses it by (recorded in the manifest; see :mod:`crowguard.recipes.study`)."""

    out_dir: Path | None = None
    overwrite: bool = False
    resume: bool = False
    show_progress: bool = True
    resolved_config: Any = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str | None = None
