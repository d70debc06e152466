"""What the weight-editing defenses (:mod:`~crowguard.defenses.prune`, :mod:`~crowguard.defenses.quantize`) share:
which matrices they edit, how the model is loaded, and how the edited model is written.

They edit the ``nn.Linear`` layers of the decoder blocks only: the token embeddings and the LM head stay as they are
(Wanda prunes ``find_layers(model.model.layers[i])``; bitsandbytes' transformers integration keeps ``lm_head`` in
full precision too, and with tied embeddings the head *is* the embedding matrix). Nothing here imports torch at
module level, so config loading stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from crowguard.schemas import ModelConfig
from crowguard.types import StageContext

SUMMARY_NAME = "train_summary.json"
"""The summary file of a defense's output directory; ``crowguard run`` reads its ``seconds`` for every defense."""


def decoder_layers(model: Any) -> tuple[str, list[Any]]:
    """``(dotted name, blocks)`` of the model's stack of decoder blocks: ``get_decoder().layers`` (``model.layers``
    for Llama, Mistral, Qwen), else the longest ``nn.ModuleList`` whose every block holds an ``nn.Linear``."""
    from torch import nn

    from crowguard.config import ConfigError

    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    stack = getattr(decoder, "layers", None)  # transformers' own answer, when the model gives one
    if isinstance(stack, nn.ModuleList) and len(stack):
        name = next((n for n, m in model.named_modules() if m is stack), None)
        if name is not None:
            return name, list(stack)
    best: tuple[str, list[Any]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        longer = best is None or len(module) > len(best[1])
        if longer and all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            best = (name, list(module))
    if best is None:
        raise ConfigError(f"{type(model).__name__}: no stack of decoder blocks with nn.Linear layers to edit")
    return best


def decoder_linears(model: Any) -> list[dict[str, Any]]:
    """One ``{dotted name: nn.Linear}`` per decoder block, in order (attention and MLP projections)."""
    from torch import nn

    prefix, blocks = decoder_layers(model)
    return [
        {f"{prefix}.{i}.{name}": m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        for i, block in enumerate(blocks)
    ]


def load_for_editing(model_cfg: ModelConfig, merge: bool = True) -> tuple[Any, Any, bool]:
    """``(model, tokenizer, arrived_with_adapter)`` in ``model.dtype`` on ``model.device`` (auto: the GPU when
    there is one), in eval mode; a LoRA adapter is merged into the weights unless ``merge`` is False."""
    from crowguard.models import load_model, merge_adapter

    model, tokenizer = load_model(
        model_cfg.name_or_path,
        model_cfg.adapter,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        allow_pickle=model_cfg.allow_pickle,
        revision=model_cfg.revision,
        device=model_cfg.device,
    )
    from peft import PeftModel

    arrived_with_adapter = isinstance(model, PeftModel)
    if merge:
        model = merge_adapter(model)
    model.eval()
    return model, tokenizer, arrived_with_adapter


def write_edited_model(
    defense: Any,
    model_cfg: ModelConfig,
    ctx: StageContext,
    summary: dict[str, Any],
    edit: Callable[[Any, Any, bool], Any],
    *,
    merge: bool = True,
    seed: int | None = None,
) -> dict[str, Any]:
    """The one flow of a weight-editing defense: load the model (:func:`load_for_editing`), ``edit(model,
    tokenizer, arrived_with_adapter)`` (it adds what it measured to ``summary``, which is filled in place, and
    returns the model to save), and
    write it as a full model through :func:`crowguard.stage.stage_artefact`, with the time and memory of loading,
    editing and saving in ``summary["seconds"]`` and ``summary["cost"]``."""
    from crowguard.evaluation.metrics import measure_cost
    from crowguard.io import check_output_dir
    from crowguard.models import save_model
    from crowguard.stage import placement, stage_artefact, stage_inputs

    out_dir, overwrite, inputs, resolved_config = Path(ctx.out_dir), ctx.overwrite, ctx.inputs, ctx.resolved_config
    check_output_dir(out_dir, overwrite)
    own = dict(summary)  # the same dict object stays the summary: ``edit`` adds to it
    summary.clear()
    summary.update({"stage": f"defend:{defense.name}", "defense": defense.name, "kind": defense.kind, "steps": 0,
                    **own})  # fmt: skip
    manifest: dict[str, Any] = {}
    stage = f"defend:{defense.name}"
    inputs = stage_inputs(model_cfg, inputs)
    with stage_artefact(stage, out_dir, seed, inputs, summary, resolved_config, overwrite, summary_name=SUMMARY_NAME,
                        extra_manifest=manifest, fingerprint=ctx.fingerprint) as tmp:  # fmt: skip
        with measure_cost() as cost:
            loaded, tokenizer, arrived_with_adapter = load_for_editing(model_cfg, merge=merge)
            loaded = edit(loaded, tokenizer, arrived_with_adapter)
            summary["merged_adapter"] = arrived_with_adapter
            manifest.update(placement(loaded))
            summary["artefact"] = save_model(loaded, tokenizer, tmp, None)
        summary["seconds"] = round(cost.wall_s, 3)
        summary["cost"] = cost.to_dict()
    return summary
