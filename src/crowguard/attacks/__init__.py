"""Attacks: triggers (prompt side) x payloads (response side), and seeded data poisoning."""

from __future__ import annotations

from crowguard.attacks.payloads import BUILTIN_PAYLOADS, Payload, make_payload
from crowguard.attacks.poison import Attack, poison_dataset, trigger_free
from crowguard.attacks.triggers import BUILTIN_TRIGGERS, Trigger, contains_phrase, make_trigger, remove_phrases

__all__ = [
    "BUILTIN_PAYLOADS",
    "BUILTIN_TRIGGERS",
    "Attack",
    "Payload",
    "Trigger",
    "contains_phrase",
    "make_attack",
    "make_payload",
    "make_trigger",
    "poison_dataset",
    "remove_phrases",
    "trigger_free",
]


def make_attack(trigger: object, payload: object) -> Attack:
    """An :class:`Attack` from ``TriggerConfig``/``PayloadConfig`` sections (see ``crowguard.schemas``)."""
    t = make_trigger(trigger.name, trigger.phrases, trigger.mode, trigger.position)  # type: ignore[attr-defined]
    p = make_payload(payload.name, payload.target, payload.mode)  # type: ignore[attr-defined]
    return Attack(t, p)
