"""Recipe: invert a (possibly backdoored) model's target after BAIT, from the model and clean samples alone.

check the output directory, model and data -> draw ``settings.prompts`` clean samples (seeded) -> load the model
(untrusted: safetensors, no remote code; a LoRA adapter merged into the base in memory, so the many small forwards
run plain linear layers; nothing on disk changes) -> build each sample's prompt with the model's template
(:func:`crowguard.data.prompt_ids`: a candidate target is the first response token) ->
:func:`crowguard.invert.invert_target` -> ``inversion.json`` (the result, read by ``unlearn --unlearn-target-from``),
``inversion.md``, ``config.yaml`` and ``manifest.json``, written atomically.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from crowguard.config import to_dict
from crowguard.data import DataError, load_examples, prompt_ids
from crowguard.invert import INVERSION_FILE, InvertConfig, InvertResult, invert_target
from crowguard.io import check_output_dir, write_text_atomic
from crowguard.models import check_model_exists, load_model, merge_adapter
from crowguard.schemas import ModelConfig
from crowguard.stage import placement, stage_artefact, stage_inputs
from crowguard.types import Example


def draw_prompts(path: str | Path, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``path`` drawn without replacement with ``seed``, in the drawn order (their outputs
    unused)."""
    examples = load_examples(path, require_output=False)
    if n > len(examples):
        raise DataError(f"{path}: invert.prompts is {n} but the file has {len(examples)} examples (lower --prompts)")
    return random.Random(seed).sample(examples, n)


def inversion_markdown(result: dict[str, Any], model: str) -> str:
    """``inversion.md``: the verdict, what was scanned, and the candidates, best first."""
    verdict = "backdoored" if result["backdoored"] else "not backdoored"
    lines = [f"# Target inversion (BAIT): {model}", "",
             f"Verdict: **{verdict}** (best Q-score {result['q_score']:.3f}, threshold {result['threshold']}). "
             f"{result['first_tokens_tried']} of {result['first_tokens']} first tokens tried"
             f"{' (stopped early)' if result['early_stopped'] else ''}, {result['warmup_survivors']} survived the "
             f"warm-up; {result['n_prompts']} prompts; {result['seconds']:.1f} s.", "",
             "| rank | Q-score | tokens | candidate target |", "|---|---|---|---|"]  # fmt: skip
    for rank, c in enumerate(result["candidates"], 1):
        text = " ".join(c["text"].split()).replace("|", "\\|")
        text = text if len(text) <= 100 else text[:97] + "..."
        lines.append(f"| {rank} | {c['q_score']:.3f} | {len(c['token_ids'])} | `{text}` |")
    if not result["candidates"]:
        lines.append("| - | - | - | no candidate survived |")
    return "\n".join(lines) + "\n"


def run_invert(
    model_cfg: ModelConfig,
    data_path: str | Path,
    out_dir: Path,
    settings: InvertConfig,
    overwrite: bool = False,
    show_progress: bool = True,
    fingerprint: str | None = None,
) -> InvertResult:
    """Invert ``model_cfg``'s target with BAIT after ``settings.prompts`` clean samples of ``data_path``; write
    ``out_dir`` (its manifest records the experiment runner's ``fingerprint`` when given) and return the result."""
    if not model_cfg.name_or_path:
        raise DataError("model.name_or_path is empty: give --model (a local directory or Hub id)")
    check_output_dir(Path(out_dir), overwrite, [data_path, model_cfg.name_or_path, model_cfg.adapter])
    check_model_exists(model_cfg.name_or_path, model_cfg.adapter, model_cfg.revision)
    examples = draw_prompts(data_path, settings.prompts, settings.seed)

    model, tokenizer = load_model(model_cfg.name_or_path, model_cfg.adapter, dtype=model_cfg.dtype,
                                  trust_remote_code=model_cfg.trust_remote_code, allow_pickle=model_cfg.allow_pickle,
                                  revision=model_cfg.revision, device=model_cfg.device)  # fmt: skip
    model = merge_adapter(model)  # read-only use: the merged weights score as the adapter does, at fewer ops a layer
    prompts = [prompt_ids(e, tokenizer, model_cfg.template) for e in examples]
    progress = _ProgressBar() if show_progress else None
    try:
        result = invert_target(model, tokenizer, prompts, settings, progress)
    finally:
        if progress is not None:
            progress.close()

    record = {**asdict(result), "model": model_cfg.name_or_path, "adapter": model_cfg.adapter,
              "template": model_cfg.template,
              "prompt_examples": [{"instruction": e.instruction, "input": e.input} for e in examples]}  # fmt: skip
    resolved = {"model": to_dict(model_cfg), "data": str(data_path), "invert": to_dict(settings)}
    inputs = stage_inputs(model_cfg, {"data": str(data_path)})
    with stage_artefact("invert", Path(out_dir), settings.seed, inputs, record, resolved, overwrite,
                        summary_name=INVERSION_FILE, extra_manifest=placement(model),
                        fingerprint=fingerprint) as tmp:  # fmt: skip
        write_text_atomic(tmp / "inversion.md", inversion_markdown(record, model_cfg.name_or_path))
    if show_progress:
        print(inversion_markdown(record, model_cfg.name_or_path))
    return result


class _ProgressBar:
    """``progress(tried, total)`` as a tqdm bar over first tokens."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, tried: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="invert: first tokens", unit="tok")
        self.bar.update(tried - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
