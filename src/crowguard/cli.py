"""The ``crowguard`` command line: thin handlers over the recipes, heavy imports inside the handlers.

``crowguard --help`` must stay fast and must not import torch or transformers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    from crowguard.evaluation.diagnose import DiagnoseConfig
    from crowguard.recipes.diagnose import run_diagnose

    cfg = config.load(DiagnoseConfig, None, (), schema_values(args))
    results = run_diagnose(cfg, Path(args.out), args.overwrite)
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
    result = run_scan(model, cfg, Path(args.out), overwrite=args.overwrite, show_progress=not args.quiet)
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser (:func:`crowguard.cli_parser.build_parser` with this module's handlers)."""
    from crowguard import cli_parser

    handlers = {name.removeprefix("cmd_"): fn for name, fn in globals().items() if name.startswith("cmd_")}
    return cli_parser.build_parser(handlers, command)


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
