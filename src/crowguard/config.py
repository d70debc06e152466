"""Typed configuration: dataclasses are the schema, YAML is their serialization.

Every knob is a dataclass field with a ``help`` string in its metadata and a sane default. :func:`load` reads YAML,
applies ``a.b=c`` overrides and type-checks the result before any work starts: unknown keys and wrong types raise
:class:`ConfigError` with the dotted path and a did-you-mean suggestion. :func:`save` writes the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_RATIO = re.compile(r"\d+:\d+")
_YAML_BOOLS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}  # what PyYAML reads as booleans
_NON_FINITE = re.compile(r"[-+]?\.?(nan|inf|infinity)", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and where it was set. ``key`` is the
    dotted key at fault when one is (so :func:`load` can tell a file's value from a ``--set`` or a flag)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def knob(
    default: Any = dataclasses.MISSING,
    help: str = "",
    open_sections: Any = None,
    bounds: str | None = None,
    neutral: Any = dataclasses.MISSING,
    **kwargs: Any,
) -> Any:
    """A dataclass field with a help string (shown by ``crowguard validate --explain``).

    ``neutral``: the value that gives what crowguard gave before the knob existed (or ``SPEED_ONLY`` for a knob that
    never changes a result); a field at its neutral value stays out of the experiment runner's fingerprints
    (:func:`fingerprint_view`), so adding a knob does not invalidate every earlier stage.

    ``bounds`` is an interval a number must lie in, checked when a config is read: ``"(0, inf)"``, ``"[0, 1)"``,
    ``"[-1, inf)"`` (``inf`` is an open end; every float must be finite in any case).

    ``open_sections`` (a function returning ``{name: dataclass}``) makes the field a dict of sections that appear in
    YAML as keys of the parent mapping (``defense.crow`` rather than ``defense.sections.crow``): the parent is open
    to sections defined elsewhere, such as each defense's own config.
    """
    if open_sections is not None:
        return dataclasses.field(default_factory=dict, metadata={"help": help, "open_sections": open_sections})
    meta = {"help": help, **({"bounds": _parse_bounds(bounds)} if bounds else {})}
    if neutral is not dataclasses.MISSING:
        meta["neutral"] = neutral
    # Mutable defaults (lists, dicts, nested configs at any depth) are deep-copied per instance: a shallow copy
    # (dataclasses.replace) left ExperimentConfig().defense.train one object shared by every config.
    if isinstance(default, (list, dict)) or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


_BOUNDS = re.compile(r"([\[(])\s*(-?inf|[-+]?[\d.]+(?:e[-+]?\d+)?)\s*,\s*(inf|[-+]?[\d.]+(?:e[-+]?\d+)?)\s*([\])])")


def _parse_bounds(text: str) -> tuple[str, float, float, str]:
    """``"[0, 1)"`` -> ``("[", 0.0, 1.0, ")")``; a malformed interval is a programming error."""
    match = _BOUNDS.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bounds {text!r}: expected an interval like '[0, 1)' or '(0, inf)'")
    return match[1], float(match[2]), float(match[3]), match[4]


def check_bounds(value: Any, bounds: tuple[str, float, float, str], where: str) -> None:
    """Raise :class:`ConfigError` when the number ``value`` lies outside ``bounds`` (see :func:`knob`)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    left, low, high, right = bounds
    above = value > low or (left == "[" and value == low)
    below = value < high or (right == "]" and value == high)
    if not (above and below):
        shown = lambda x: "inf" if math.isinf(x) else f"{x:g}"  # noqa: E731
        raise ConfigError(f"{where}: must be within {left}{shown(low)}, {shown(high)}{right}, got {value!r}")


def suggest(name: str, options: Sequence[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (dataclasses, tuples, paths)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices:  # YAML 1.1 reads off/on/no/yes as booleans
            words = [c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOLS[value]]
            value = words[0] if len(words) == 1 else value
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for section {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, Sequence, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads "1e-3" as a string; a user means the number
        elif isinstance(value, str) and _NON_FINITE.fullmatch(value.strip()):
            value = float(value.strip().replace(".", ""))  # "nan", ".inf": refused as not finite just below
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # a nan learning rate trains a nan model that evaluates to "ASR 0%"
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {type(value).__name__} {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    open_field = _open_field(cls)
    sections = open_field.metadata["open_sections"]() if open_field else {}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key in sections and open_field is not None and key not in fields:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a mapping for section {_type_name(sections[key])}, got {value!r}")
            kwargs.setdefault(open_field.name, {})[key] = from_dict(sections[key], value, path)
            continue
        if key not in fields or fields[key] is open_field:
            options = [name for name in fields if fields[name] is not open_field] + list(sections)
            raise ConfigError(f"unknown key {path!r}{suggest(str(key), options)}", key=path)
        default = _field_default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            # A partial section overrides the *field's* default, not the section type's: {"train": {"max_steps": 2}}
            # in a DefenseConfig keeps its lr 1e-3 (TrainConfig's own default is 2e-4).
            value = _merge(to_dict(default), value)
        try:
            kwargs[key] = _coerce(value, hints[key], path)
            if "bounds" in fields[key].metadata:
                check_bounds(kwargs[key], fields[key].metadata["bounds"], path)
        except ConfigError as exc:
            exc.key = exc.key or path
            raise
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without default
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None
    return obj


def _open_field(cls: type) -> dataclasses.Field | None:
    """The field of ``cls`` holding open sections (see :func:`knob`), if any."""
    return next((f for f in dataclasses.fields(cls) if "open_sections" in f.metadata), None)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, recursively for nested mappings."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


SPEED_ONLY = object()  # knob(neutral=SPEED_ONLY): how fast, never what comes out


def fingerprint_view(obj: Any) -> Any:
    """:func:`to_dict` without the fields at their ``neutral`` value (and the speed-only ones): what a stage's
    fingerprint hashes of its settings."""
    if dataclasses.is_dataclass(obj):
        data: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            neutral = f.metadata.get("neutral", dataclasses.MISSING)
            if neutral is SPEED_ONLY or (neutral is not dataclasses.MISSING and value == neutral):
                continue
            if "open_sections" in f.metadata:
                data.update({str(k): fingerprint_view(v) for k, v in value.items()})
            else:
                data[f.name] = fingerprint_view(value)
        return data
    if isinstance(obj, dict):
        return {str(k): fingerprint_view(v) for k, v in obj.items()}
    return to_dict(obj)


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data (paths become strings, tuples lists)."""
    if dataclasses.is_dataclass(obj):
        data: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if "open_sections" in f.metadata:
                data.update(value)  # open sections sit in the parent mapping
            else:
                data[f.name] = value
        return data
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    if _RATIO.fullmatch(raw.strip()):
        return key.strip().split("."), raw.strip()  # "2:4" (an N:M pattern); YAML 1.1 would read 124 (base 60)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string; on the command line it means a number
    return key.strip().split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (type checking happens in :func:`from_dict`).

    ``overrides`` are ``"a.b=value"`` strings (value parsed as YAML); ``values`` maps dotted keys to Python values
    (used for command-line flags, whose values must not be reinterpreted as YAML).
    """
    result = _deepcopy(data)
    pairs = [(*parse_override(text), text) for text in overrides]
    pairs += [(key.split("."), value, f"{key}={value}") for key, value in (values or {}).items()]
    for keys, value, text in pairs:
        node = result
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if (where := _cycle(data)) is not None:
        raise ConfigError(f"{path}: {where} refers to itself (a YAML anchor used inside its own value)")
    return data


def _cycle(node: Any, where: str = "", seen: tuple[int, ...] = ()) -> str | None:
    """The dotted key of the first mapping or list that contains itself (``a: &x [*x]``), or None."""
    if not isinstance(node, (dict, list)):
        return None
    if id(node) in seen:
        return where or "the top level"
    is_map = isinstance(node, dict)
    for key, value in node.items() if is_map else enumerate(node):
        child = f"{where}[{key}]" if not is_map else f"{where}.{key}" if where else str(key)
        if (found := _cycle(value, child, (*seen, id(node)))) is not None:
            return found
    return None


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    base: str | Path | None = None,
) -> T:
    """Load ``cls`` from an optional YAML file (laid over the YAML file ``base``, section by section, when given)
    plus ``--set`` overrides and flag ``values`` (flags win). An error names where the bad value came from: the
    ``--set`` that gave it (even when a flag overrides it), else the file (a shipped preset is not blamed for a
    command line's value), else the command line's key."""
    data = read_yaml(path) if path is not None else {}
    if base is not None:
        data = _merge(read_yaml(base), data)
    if overrides and values:  # a bad --set must not hide behind a flag that sets the same key
        try:
            from_dict(cls, apply_overrides(data, overrides))
        except ConfigError as exc:
            if (text := _override_at_fault(exc, overrides)) is not None:
                raise ConfigError(f"--set {text}: {exc}", exc.key) from None
    full = apply_overrides(data, overrides, values)
    try:
        return from_dict(cls, full)
    except ConfigError as exc:
        raise ConfigError(f"{_source_of(cls, exc, data, path, overrides, values)}{exc}", exc.key) from None


def _override_at_fault(exc: ConfigError, overrides: Sequence[str]) -> str | None:
    """The ``--set`` text whose key is ``exc``'s key (or a section holding it), if any."""
    if exc.key is None:
        return None
    for text in reversed(overrides):
        key = ".".join(parse_override(text)[0])
        if exc.key == key or exc.key.startswith(key + ".") or key.startswith(exc.key + "."):
            return text
    return None


def _source_of(
    cls: type, exc: ConfigError, data: Mapping[str, Any], path: Any, overrides: Sequence[str], values: Any
) -> str:
    """The prefix naming where a failing value came from (see :func:`load`)."""
    if (text := _override_at_fault(exc, overrides)) is not None:
        return f"--set {text}: "
    if exc.key is not None and exc.key in (values or {}):
        return ""  # a flag: the message names its key
    if path is None:
        return ""
    if exc.key is None and (overrides or values):  # a check across settings: the file's only if it fails alone
        try:
            from_dict(cls, data)
        except ConfigError:
            return f"{path}: "
        return ""  # the message names the settings at fault
    return f"{path}: "


def save(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from crowguard.io import write_text_atomic

    write_text_atomic(Path(path), yaml.safe_dump(to_dict(obj), sort_keys=False))


def explain(schema: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every knob of ``schema`` (a config class or instance), for ``crowguard
    validate --explain``. Defaults are the field's own: a nested section shows its field's default instance
    (``defense.train.lr`` 0.001), not its type's (``TrainConfig().lr`` 0.0002)."""
    obj = schema() if isinstance(schema, type) else schema
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if "open_sections" in f.metadata:
            for name, section in f.metadata["open_sections"]().items():
                rows.extend(explain(value.get(name) or section, f"{prefix}{name}."))
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(explain(value, key + "."))
            continue
        rows.append((key, repr(to_dict(value)), f.metadata.get("help", "")))
    return rows
