"""How the CLI turns ``--config``, ``--set`` and flags into a config: presets by name, the schema ``validate``
checks, a demo file laid over its organism's preset, and ``--quick`` that never replaces a setting the user gave."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crowguard.cli_flags import schema_values


class UsageError(Exception):
    """A user-fixable problem found by the CLI itself (exit code 2)."""


def _config_source(ref: str | None) -> Path | None:
    """A YAML path, or a packaged preset name like ``defenses/crow``."""
    if ref is None:
        return None
    path = Path(ref)
    if path.exists() or ref.endswith((".yaml", ".yml")):
        return path
    from crowguard.registry import preset_path

    return Path(str(preset_path(ref)))


def _load_experiment(args: argparse.Namespace, flags: dict[str, Any] | None = None) -> Any:
    """The experiment config from ``--config``, ``--set`` overrides and the command's flags (schema flags and
    ``flags``)."""
    from crowguard import config
    from crowguard.schemas import ExperimentConfig

    values = {**schema_values(args), **{k: v for k, v in (flags or {}).items() if v is not None}}
    return config.load(ExperimentConfig, _config_source(args.config), args.set or (), values)


def _validated_schema(choice: str, source: Path, sets: Sequence[str]) -> type:
    """The schema ``validate`` checks against: the one named, or (``auto``) the one of experiment / demo whose keys
    hold all of the file's top-level keys and that validates; both valid: the experiment's (``--schema demo`` checks
    the other); neither: the experiment's, so its error is the one reported."""
    import dataclasses

    from crowguard import config
    from crowguard.schemas import DemoConfig, ExperimentConfig

    schemas = {"experiment": ExperimentConfig, "demo": DemoConfig}
    if choice != "auto":
        return schemas[choice]
    keys = set(config.read_yaml(source))
    fitting = [cls for cls in schemas.values() if keys <= {f.name for f in dataclasses.fields(cls)}]
    for cls in fitting:
        try:
            config.load(cls, source, sets)
        except config.ConfigError:
            continue
        return cls
    return fitting[0] if len(fitting) == 1 else ExperimentConfig


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b": value}``."""
    if not isinstance(data, dict):
        return {prefix: data}
    return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()} or {prefix: {}}


def _quick_keeping_nothing_given(cfg: Any, quick: Any, values: dict[str, Any], sets: Sequence[str]) -> Any:
    """``quick`` (the --quick config), unless it would silently replace a value the user gave: then a UsageError
    naming the setting, so a user never gets a run other than the one asked for."""
    from crowguard.config import parse_override, to_dict

    before, after = _flat(to_dict(cfg)), _flat(to_dict(quick))
    given = {*values, *(".".join(parse_override(text)[0]) for text in sets)}
    clash = sorted(key.rstrip(".") for key in after if before.get(key) != after[key]
                   and any(key.rstrip(".") == g or key.startswith(g + ".") for g in given))  # fmt: skip
    if clash:
        raise UsageError(f"--quick sets {', '.join(clash)} itself; drop --quick or the setting you gave")
    return quick


def demo_config(args: argparse.Namespace) -> Any:
    """The demo's settings: the organism's preset (``demo/<organism>``), a ``--config`` file laid over it, then
    ``--set`` and flags; ``--quick`` last (refusing to replace a setting the user gave)."""
    from crowguard import config
    from crowguard.recipes.demo import quick_config
    from crowguard.schemas import DemoConfig

    values = schema_values(args)
    organism = values.get("organism.name") or "smollm2"
    source = _config_source(args.config) if args.config else _config_source(f"demo/{organism}")
    # --organism picks its preset; a --config file goes on top of it (not instead of it)
    base = _config_source(f"demo/{organism}") if args.config and "organism.name" in values else None
    cfg = config.load(DemoConfig, source, args.set or (), values, base=base)
    if args.quick:
        cfg = _quick_keeping_nothing_given(cfg, quick_config(cfg), values, args.set or ())
    return cfg
