"""What the weight-editing defenses (:mod:`~crowguard.defenses.prune`, :mod:`~crowguard.defenses.quantize`) share:
which matrices they edit, how the model is loaded, and how the edited model is written.

They edit the ``nn.Linear`` layers of the decoder blocks only: the token embeddings and the LM head stay as they are
(Wanda prunes ``find_layers(model.model.layers[i])``; bitsandbytes' transformers integration keeps ``lm_head`` in
full precision too, and with tied embeddings the head *is* the embedding matrix). Nothing here imports torch at
module level, so config loading stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crowguard.schemas import ModelConfig

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


def has_adapter(model_cfg: ModelConfig) -> bool:
    """Whether the model arrives with a LoRA adapter (``model.adapter``, or an adapter directory as the model)."""
    path = Path(model_cfg.name_or_path)
    return model_cfg.adapter is not None or (
        (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
    )


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


def placement(model: Any) -> dict[str, str]:
    """Where the edit ran: the device and dtype of the model's first parameter (for ``manifest.json``)."""
    parameter = next(model.parameters())
    return {"device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch.")}


def stage_inputs(model_cfg: ModelConfig, inputs: dict[str, str] | None) -> dict[str, str]:
    """The inputs ``manifest.json`` hashes: the model, its adapter and whatever the recipe passed (the data)."""
    all_inputs = {"model": model_cfg.name_or_path, **(inputs or {})}
    if model_cfg.adapter:
        all_inputs["adapter"] = model_cfg.adapter
    return all_inputs
