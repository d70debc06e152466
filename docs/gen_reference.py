"""Write the CLI and config reference pages from the code when the site builds (mkdocs-gen-files runs this).

``reference/cli.md``: every subcommand of ``crowguard.cli.build_parser()`` with its usage and every option (the
generated schema flags included), with the config key a flag sets. ``reference/config.md``: every config key of the
schema dataclasses with its default and help, as ``crowguard validate --explain`` lists them. Nothing here is
hand-written per flag or key, so the pages cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
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


def config_section(title: str, intro: str, cls: type, prefix: str = "") -> list[str]:
    lines = ["", f"## {title}", "", intro, "", "| key | default | help |", "|---|---|---|"]
    for key, default, help_text in explain(cls):
        shown = str(default).replace("|", "\\|").replace("`", "'")
        lines.append(f"| `{prefix}{key}` | `{shown}` | {cell(help_text)} |")
    return lines


def config_page() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the schema dataclasses (`src/crowguard/schemas.py` and each defense's own `Config`) when this",
        "site is built; `crowguard validate --explain` prints the first list. A YAML file holds any subset of these",
        "keys as nested sections; `--set KEY=VALUE` overrides one; unknown keys and wrong types are refused before",
        "any work starts.",
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
        "`ScanConfig`: what `crowguard scan` reads; its `--set` takes these keys without the `scan.` prefix.",
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
