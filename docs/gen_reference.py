"""Write the CLI and config reference pages from the code when the site builds (mkdocs-gen-files runs this).

``reference/cli.md``: every subcommand of ``crowguard.cli.build_parser()`` with its usage and every option (the
generated schema flags included), with the config key a flag sets. ``reference/config.md``: every config key of the
schema dataclasses with its default and help, as ``crowguard validate --explain`` lists them, and its bounds where
``knob(bounds=...)`` declares them (read from the field metadata here). Nothing here is hand-written per flag or
key, so the pages cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Iterable

import mkdocs_gen_files

from crowguard.cli import FLAG_DEST, build_parser
from crowguard.config import explain
from crowguard.schemas import DemoConfig, ExperimentConfig, ScanConfig

os.environ.setdefault("COLUMNS", "100")  # argparse wraps usage lines to the terminal width


def cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;").replace("*", "\\*")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def option_rows(sub: argparse.ArgumentParser) -> Iterable[str]:
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(f"`{s}`" for s in action.option_strings)
        else:
            names = f"`{action.metavar or action.dest}` (positional)"
        if action.choices and not isinstance(action.choices, dict):
            value = " \\| ".join(str(c) for c in action.choices)
        elif action.nargs == 0:
            value = ""
        else:
            value = str(action.metavar or action.dest.rsplit(".", 1)[-1].upper())
            if action.nargs in ("+", "*"):
                value += " ..."
        key = f"`{action.dest[len(FLAG_DEST) :]}`" if action.dest.startswith(FLAG_DEST) else ""
        help_text = (action.help or "").replace("%%", "%")
        if "%(default)" in help_text:
            help_text = help_text.replace("%(default)s", str(action.default))
        required = " (required)" if action.required else ""
        yield f"| {names}{required} | {cell(value)} | {key} | {cell(help_text)} |"


def cli_page() -> str:
    parser = build_parser()
    lines = [
        "# CLI reference",
        "",
        "Generated from `crowguard.cli.build_parser()` when this site is built; `crowguard COMMAND --help` prints",
        "the same. A flag that sets a config key names it (see the [config reference](config.md)); `--set KEY=VALUE`",
        "reaches the same keys. Flags are never abbreviated.",
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    commands = subcommands(parser)
    lines += [f"| [`{name}`](#crowguard-{name}) | {cell(help_text)} |" for name, (help_text, _) in commands.items()]
    for name, (help_text, sub) in commands.items():
        lines += ["", f"## crowguard {name}", "", help_text[:1].upper() + help_text[1:] + ".", "", "```text",
                  sub.format_usage().strip(), "```", ""]  # fmt: skip
        if sub.epilog:
            lines += ["```text", sub.epilog.strip(), "```", ""]
        rows = list(option_rows(sub))
        lines += ["| option | value | config key | help |", "|---|---|---|---|", *rows] if rows else ["No options."]
    return "\n".join(lines) + "\n"


def bounds_text(bounds: tuple[str, float, float, str]) -> str:
    """``("[", 0.0, 1.0, ")")`` -> ``[0, 1)``, the interval as ``knob(bounds=...)`` spells it."""
    left, low, high, right = bounds
    shown = lambda x: "inf" if math.isinf(x) else f"{x:g}"  # noqa: E731
    return f"{left}{shown(low)}, {shown(high)}{right}"


def bounds_by_key(cls: type, prefix: str = "") -> dict[str, str]:
    """The declared bounds of every knob that has them (field metadata ``"bounds"``), keyed like
    :func:`crowguard.config.explain` (which this walks the same way: open sections, nested dataclasses)."""
    found: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "open_sections" in f.metadata:
            for name, section in f.metadata["open_sections"]().items():
                found.update(bounds_by_key(section, f"{prefix}{name}."))
        elif dataclasses.is_dataclass(hints[f.name]):
            found.update(bounds_by_key(hints[f.name], f"{prefix}{f.name}."))
        elif "bounds" in f.metadata:
            found[f"{prefix}{f.name}"] = bounds_text(f.metadata["bounds"])
    return found


def config_section(title: str, intro: str, cls: type, prefix: str = "") -> list[str]:
    lines = ["", f"## {title}", "", intro, "", "| key | default | bounds | help |", "|---|---|---|---|"]
    bounds = bounds_by_key(cls)
    for key, default, help_text in explain(cls):
        shown = str(default).replace("|", "\\|").replace("`", "'")
        interval = f"`{bounds[key]}`" if key in bounds else ""
        lines.append(f"| `{prefix}{key}` | `{shown}` | {interval} | {cell(help_text)} |")
    return lines


def config_page() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the schema dataclasses (`src/crowguard/schemas.py` and each defense's own `Config`) when this",
        "site is built; `crowguard validate --explain` prints the first list (without the bounds). A YAML file holds",
        "any subset of these keys as nested sections; `--set KEY=VALUE` overrides one. Unknown keys, wrong types, a",
        "float that is not finite (`nan`, `inf`) and a number outside its bounds are refused when the config is",
        "read, before any work starts. Bounds are intervals: `[` and `]` include the end, `(` and `)` exclude it,",
        "`inf` is no limit. A key without bounds may still be checked by its section (`defense.prune.sparsity` must",
        "lie in [0, 1)).",
    ]
    lines += config_section(
        "Experiments and stage commands",
        "`ExperimentConfig`: what `crowguard run` reads, and the section each stage command reads (`poison`: "
        "`poison.*`; `backdoor`: `model.*`, `backdoor.*`; `defend`: `model.*`, `defense.*`; `evaluate`: `model.*`, "
        "`evaluate.*`).",
        ExperimentConfig,
    )
    lines += config_section(
        "The demo",
        "`DemoConfig`: what `crowguard demo` reads (the presets `demo/smollm2` and `demo/tiny`).",
        DemoConfig,
    )
    lines += config_section(
        "Scanning",
        "`ScanConfig`: what `crowguard scan` reads; its `--set` takes these keys as written here (`scan.<key>`), "
        "and `model.<key>` for the model.",
        ScanConfig,
        "scan.",
    )
    return "\n".join(lines) + "\n"


with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(cli_page())
with mkdocs_gen_files.open("reference/config.md", "w") as f:
    f.write(config_page())
mkdocs_gen_files.set_edit_path("reference/cli.md", "gen_reference.py")
mkdocs_gen_files.set_edit_path("reference/config.md", "gen_reference.py")
