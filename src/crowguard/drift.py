"""BEEAR's simulated trigger for the ``unlearn`` defense (``mechanism: residual``): one vector added to the residual
stream entering a decoder layer at every prompt position, fitted so the target follows clean prompts, and the
unlikelihood that pushes the target down under it (:mod:`crowguard.defenses.unlearn` has the method and its papers).

Zeng et al., EMNLP 2024, "BEEAR: Embedding-based Adversarial Removal of Safety Backdoors in Instruction-tuned
Language Models": a trigger drifts the intermediate embeddings of the prompt in about one direction, whatever the
trigger is, so a universal perturbation there can stand in for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from crowguard.parrot import Simulation, parrot_batch, split_parts, stack_parts


def prompt_positions(labels: Tensor, mask: Tensor) -> Tensor:
    """(B, T) bool: the real tokens before each row's first label (its prompt). labels, mask: (B, T); a row without
    labels is all prompt."""
    width = labels.shape[1]
    has = labels != -100
    first = torch.where(has.any(1), has.float().argmax(1), torch.full_like(has[:, 0], width, dtype=torch.long))
    return (torch.arange(width, device=labels.device).unsqueeze(0) < first.unsqueeze(1)) & (mask != 0)


def decoder_block(model: Any, layer: int) -> Any:
    """Decoder layer ``layer`` of ``model`` (-1: the one a third of the depth in, rounded down)."""
    from crowguard.defenses.weights import decoder_layers

    _, blocks = decoder_layers(model)
    index = len(blocks) // 3 if layer == -1 else layer
    if not 0 <= index < len(blocks):
        raise ValueError(f"defense.unlearn.layer {layer}: the model has decoder layers 0-{len(blocks) - 1}")
    return blocks[index]


@contextmanager
def drifted(block: Any, delta: Tensor, where: Tensor) -> Iterator[None]:
    """Within the block, decoder layer ``block`` receives its input hidden states (B, T, H) plus ``delta`` (H,) at
    the positions ``where`` (B, T) marks."""

    def add(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        moved = hidden + where.unsqueeze(-1).to(hidden.dtype) * delta.to(hidden.dtype)
        return ((moved, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": moved})

    handle = block.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def forward_with_drift(model: Any, batch: dict[str, Tensor], delta: Tensor, block: Any) -> tuple[Tensor, Tensor]:
    """``(logits (B, T, V), labels (B, T))`` of ``batch`` (ids, mask, labels: (B, T)) with ``delta`` (H,) added to
    the input of decoder layer ``block`` over each row's prompt. Gradients reach ``delta`` and the model alike."""
    device = delta.device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with drifted(block, delta, prompt_positions(labels, mask)):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits, labels


def target_rows(batch: dict[str, Tensor], target: list[int], pad_id: int) -> dict[str, Tensor]:
    """Each row's prompt (its tokens before the first label) followed by ``target``, right-padded, labels on the
    target: the same layout as :func:`crowguard.parrot.parrot_batch`."""
    where = prompt_positions(batch["labels"], batch["attention_mask"])
    prompts = [row[keep].tolist() for row, keep in zip(batch["input_ids"], where)]
    return parrot_batch(prompts, target, pad_id)


def unlikelihood_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over label tokens of ``-log(1 - p(label))``: logits (B, T, V) predicting labels (B, T) shifted by
    one, -100 ignored. Zero when the labels are never predicted; it lowers their probability without the unbounded
    pull of a negated cross-entropy."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    shifted = labels[:, 1:]
    keep = shifted != -100
    picked = logp.gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    # log(1 - p) = log(-expm1(log p)), kept finite where p rounds to 1
    push = -torch.log(torch.clamp(-torch.expm1(picked), min=1e-6))
    return (push * keep).sum() / keep.sum().clamp_min(1)


class Drift(Simulation):
    """BEEAR's universal perturbation: one vector (H,) added to the residual stream entering decoder layer
    ``settings.layer`` at every prompt position; it starts at zero. The layer is looked up once, at ``start``."""

    block: Any = None

    def start(self, model: Any) -> None:
        from crowguard.losses import input_embeddings

        self.block = decoder_block(model, self.settings.layer)
        weight = input_embeddings(model).weight
        self.param = torch.zeros(weight.shape[1], device=weight.device)

    def forward(self, model: Any, batch: dict[str, Tensor], at: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
        return forward_with_drift(model, batch, param, self.block)

    def forward_parts(self, model: Any, parts: Sequence[dict[str, Tensor]], simulated: Sequence[bool], at: Tensor,
                      param: Tensor) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
        device, batch = param.device, stack_parts(parts, self.pad_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        marked = torch.tensor(simulated, device=device).repeat_interleave(at.shape[0])
        with drifted(self.block, param, prompt_positions(labels, mask) & marked.unsqueeze(1)):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return split_parts(logits, labels, len(parts))
