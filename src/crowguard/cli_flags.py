"""The CLI's flags, generated from the config dataclasses (and each defense's own Config), never from a hand-written
table: ``--lr`` sets ``defense.train.lr`` for defend, ``--crow-alpha`` sets ``defense.crow.alpha``, and a new knob
or defense gets its flag without an edit. Values land in ``args`` under ``cfg.<dotted key>``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

FLAG_DEST = "cfg."


def _flag_type(tp: Any) -> dict[str, Any]:
    """argparse keywords for a field annotated ``tp``: type, choices, nargs or a boolean action."""
    import types
    import typing

    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:  # X | None: a flag of type X
        return _flag_type(args[0])
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(tp)), "type": type(typing.get_args(tp)[0])}
    if origin is list and args and args[0] in (int, float, str):  # --x a b and --x a --x b alike
        return {"nargs": "+", "type": args[0], "action": "extend"}
    return {"type": _yaml_value, "metavar": "YAML"}  # unions like str | list[int]: parsed as in --set


def _yaml_value(text: str) -> Any:
    from crowguard.config import parse_override

    return parse_override(f"x={text}")[1]


def add_schema_flags(
    parser: argparse.ArgumentParser,
    obj: Any,
    key_prefix: str,
    flag_prefix: str = "",
    *,
    flatten: Sequence[str] = (),
    rename: dict[str, str] | None = None,
    skip: Sequence[str] = (),
    group: Any = None,
) -> None:
    """One flag per knob of the config instance ``obj`` (defaults shown are its values).

    Nested sections become ``--section-knob`` (a section's ``name`` is ``--section``; sections in ``flatten`` keep
    bare knob names), open sections (each defense's own) ``--<defense>-<knob>``; ``rename`` maps a field to a flag.
    """
    import dataclasses
    import typing

    from crowguard.config import to_dict

    hints = typing.get_type_hints(type(obj))
    target = group or parser
    for field in dataclasses.fields(obj):
        if field.name in skip:
            continue
        value, key = getattr(obj, field.name), f"{key_prefix}{field.name}"
        if "open_sections" in field.metadata:
            for name, section in value.items():
                section_group = parser.add_argument_group(f"{key_prefix}{name} ({name}'s own settings)")
                add_schema_flags(parser, section, f"{key_prefix}{name}.", f"{flag_prefix}{name}-", group=section_group)
            continue
        if dataclasses.is_dataclass(value):
            inner = flag_prefix if field.name in flatten else f"{flag_prefix}{field.name}-"
            add_schema_flags(parser, value, f"{key}.", inner, group=target)
            continue
        name = (rename or {}).get(field.name, field.name)
        flag = flag_prefix[:-1] if name == "name" and flag_prefix else f"{flag_prefix}{name}"
        shown = to_dict(value)
        help_text = field.metadata.get("help", "").replace("%", "%%")
        kwargs = _flag_type(hints[field.name])
        if kwargs.get("action") in (None, "extend") and "choices" not in kwargs:
            kwargs.setdefault("metavar", field.name.upper())
        target.add_argument(f"--{flag.replace('_', '-')}", dest=f"{FLAG_DEST}{key}", default=None,
                            help=f"{help_text} (default: {shown!r})", **kwargs)  # fmt: skip


def schema_values(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted config keys the user gave flags for."""
    return {k[len(FLAG_DEST) :]: v for k, v in vars(args).items() if k.startswith(FLAG_DEST) and v is not None}


def _model_flags(parser: argparse.ArgumentParser) -> None:
    from crowguard.schemas import ModelConfig

    group = parser.add_argument_group("model")
    add_schema_flags(parser, ModelConfig(), "model.", rename={"name_or_path": "model"}, group=group)
