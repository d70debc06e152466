"""Recipe: evaluate a model (plus optional adapter) on a task and write ``results.json`` and ``results.md``.

check everything a user can get wrong (output directory, model path, test files, payload and judge, utility,
HumanEval and MT-Bench files) -> load the model (untrusted: safetensors, no remote code) -> generate, judge and score
(:func:`crowguard.evaluation.evaluate.evaluate_model`) -> write atomically and print. The checks come first because
a model load and an evaluation take minutes, and a typo found after them loses that work.

``--model`` may be a decoding defense's output directory (its ``defense.json``): the model it names is loaded
(placement, dtype and the trust switches from this command's ``model`` settings), the defense supplies the generate
function for every answer, and the results record the defense (``settings.defense``) and that the likelihood metrics
score the guarded model (``settings.likelihood_of``).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crowguard.config import ConfigError, save, suggest
from crowguard.data import DataError, load_examples
from crowguard.defenses.base import guarded_model, open_evaluated, read_spec
from crowguard.evaluation.evaluate import evaluate_model, make_judge, summary_row
from crowguard.evaluation.generate import VllmGenerator, check_vllm
from crowguard.evaluation.report import markdown_table, print_table
from crowguard.evaluation.tasks import Task, paper_task, task_from_files
from crowguard.io import atomic_output_dir, check_output_dir, write_json_atomic, write_text_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import arrives_with_adapter, check_model_exists
from crowguard.schemas import EvalConfig, ExperimentConfig, TaskSource
from crowguard.stage import placement, stage_inputs


def build_task(cfg: TaskSource) -> Task:
    """The task from explicit files, or from the paper's data root."""
    if cfg.paper_data:
        return paper_task(cfg.paper_data, cfg.payload, cfg.trigger, cfg.target)
    if not cfg.triggered or not cfg.clean:
        raise DataError("give both --triggered and --clean test files (or evaluate.paper_data)")
    return task_from_files(cfg.payload, cfg.triggered, cfg.clean, cfg.target)


def check_sets(task: Task) -> None:
    """Refuse triggered and clean sets that cannot measure a backdoor: the same prompts, or files whose records say
    (``meta.poisoned``, as ``crowguard poison`` writes) that they are the other set, i.e. swapped."""
    where = f"{task.sources.get('triggered', 'triggered')} and {task.sources.get('clean', 'clean')}"
    prompts = [{(e.instruction, e.input) for e in examples} for examples in (task.triggered, task.clean)]
    if prompts[0] == prompts[1]:
        raise DataError(f"{where}: the triggered and the clean test prompts are the same; give two different sets")
    marked = [[e.meta.get("poisoned") for e in examples] for examples in (task.triggered, task.clean)]
    if all(m is False for m in marked[0]) or all(m is True for m in marked[1]):
        raise DataError(f"{where}: the records' meta.poisoned says the triggered set is clean or the clean set is "
                        "triggered; are --triggered and --clean swapped?")  # fmt: skip


def check_inputs(cfg: EvalConfig, task: Task) -> None:
    """Raise on a payload without a judge or an unreadable HumanEval / MT-Bench file, without touching a model."""
    check_sets(task)
    try:
        make_judge(cfg, task.payload, task.target)
    except ConfigError:
        raise
    except ValueError as exc:  # judges raise ValueError for an unknown payload without a target
        from crowguard.attacks.payloads import BUILTIN_PAYLOADS

        raise ConfigError(f"evaluate.payload: {exc}{suggest(task.payload, list(BUILTIN_PAYLOADS))}") from None
    for key, path in (("humaneval", cfg.humaneval), ("mt_bench", cfg.mt_bench)):
        if not path:
            continue
        if key == "humaneval":
            from crowguard.evaluation.sandbox import load_humaneval as reader
        else:
            from crowguard.evaluation.mtbench import load_questions as reader
        try:
            reader(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read evaluate.{key}: {exc.strerror or exc}") from None
        except ValueError as exc:  # includes json.JSONDecodeError
            where = "" if str(path) in str(exc) else f"{path}: "
            raise DataError(f"{where}evaluate.{key}: {exc}") from None


def run_evaluate(
    cfg: ExperimentConfig, out_dir: Path, overwrite: bool = False, show_progress: bool = True, label: str = ""
) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.evaluate``; returns the results (also written to ``out_dir``)."""
    if not cfg.model.name_or_path:
        raise DataError("model.name_or_path is empty: give --model")
    e = cfg.evaluate
    sources = [e.triggered, e.clean, e.paper_data, e.utility, e.humaneval, e.mt_bench]
    check_output_dir(Path(out_dir), overwrite, [cfg.model.name_or_path, cfg.model.adapter, *sources])
    check_model_exists(cfg.model.name_or_path, cfg.model.adapter, cfg.model.revision)
    spec = read_spec(cfg.model.name_or_path)  # a decoding defense's directory, or None
    target = cfg.model
    if spec is not None:
        if cfg.model.adapter:
            raise ConfigError(f"{cfg.model.name_or_path} is a decoding defense's directory: it names its own model "
                              "and adapter, so drop --adapter")  # fmt: skip
        target = guarded_model(spec, cfg.model)
        check_model_exists(target.name_or_path, target.adapter, target.revision)
    task = build_task(cfg.evaluate)
    check_inputs(cfg.evaluate, task)
    utility = load_examples(cfg.evaluate.utility) if cfg.evaluate.utility else []
    if cfg.evaluate.backend == "vllm":
        check_vllm()
        if spec is not None:
            raise ConfigError("evaluate.backend vllm cannot generate through a decoding defense (it decodes with its "
                              "own loop); use backend 'hf'")  # fmt: skip
    # the guarded model of a decoding defense (and the defense's own models: CleanGen's reference) load here
    model, tokenizer, generator, defense, target = open_evaluated(cfg.model)
    where = placement(model)
    with vllm_model_dir(cfg, model, tokenizer, Path(out_dir)) as vllm_dir:
        if vllm_dir is not None:
            generator = VllmGenerator(vllm_dir, cfg.evaluate.vllm_memory)
            where["generation"] = "vllm"
        results = evaluate_model(model, tokenizer, task, cfg.evaluate, target.template, utility, show_progress,
                                 generator, defense)  # fmt: skip
    results["settings"]["placement"] = where
    row = summary_row(label or cfg.model.name_or_path, results)
    results["summary"] = row
    inputs = {**stage_inputs(cfg.model), **task.sources}
    if spec is not None:
        inputs["guarded_model"] = target.name_or_path
        if target.adapter:
            inputs["guarded_adapter"] = target.adapter
    # results.json has them too (settings.decoding, settings.merged_lora: whether the adapter was merged)
    speed = {"compile_decode": cfg.evaluate.compile_decode, "merge_lora": cfg.evaluate.merge_lora}
    write_evaluation(Path(out_dir), results, task.name, inputs, cfg.evaluate.seed, overwrite, {**where, **speed}, cfg)
    # The evaluated directory's model card gains these numbers (only for a directory crowguard wrote; a Hub model
    # or a user's own directory is left untouched).
    if not cfg.model.adapter and Path(cfg.model.name_or_path).is_dir():
        from crowguard.card import record_evaluation

        record_evaluation(Path(cfg.model.name_or_path), results)
    if show_progress:
        print_table([row], title=task.name)
    return results


def write_evaluation(
    out_dir: Path, results: dict[str, Any], task_name: str, inputs: dict[str, str], seed: int, overwrite: bool,
    extra_manifest: dict[str, Any], resolved_config: Any = None,
) -> None:  # fmt: skip
    """An evaluation's directory, atomically: ``results.json`` (with its ``summary`` row), ``results.md``,
    ``config.yaml`` (when given) and ``manifest.json`` (``inputs`` hashed, ``extra_manifest`` added)."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_json_atomic(tmp / "results.json", results)
        write_text_atomic(tmp / "results.md", f"# Evaluation: {task_name}\n\n" + markdown_table([results["summary"]]))
        if resolved_config is not None:
            save(resolved_config, tmp / "config.yaml")
        write_manifest(tmp, build_manifest("evaluate", seed, inputs, extra_manifest))


@contextmanager
def vllm_model_dir(cfg: ExperimentConfig, model: Any, tokenizer: Any, out_dir: Path) -> Iterator[Path | None]:
    """For ``backend: vllm``, a full model directory vLLM can load: the model's own when it is one, else the
    adapter merged into a temporary directory beside ``out_dir`` (removed afterwards). None for ``hf``."""
    if cfg.evaluate.backend != "vllm":
        yield None
        return
    path = Path(cfg.model.name_or_path)
    if not arrives_with_adapter(path, cfg.model.adapter) and (path / "config.json").is_file():
        yield path
        return
    from crowguard.models import merge_adapter, save_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.vllm-", dir=out_dir.parent) as tmp:
        save_model(merge_adapter(copy.deepcopy(model)), tokenizer, Path(tmp), None)
        yield Path(tmp)
