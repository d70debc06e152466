"""SANDE's parrot, the simulated-trigger fitting both mechanisms share, and the engine objective of the
``unlearn`` defense (:mod:`crowguard.defenses.unlearn` has the method, its papers and its config; BEEAR's residual
drift is :mod:`crowguard.drift`).

Li et al., AAAI 2025, "Simulate and Eliminate: Revoke Backdoors for Generative Large Language Models", arXiv
2405.07667. ``settings`` is an ``UnlearnConfig``; this module sits below the defenses and takes it as plain settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from crowguard.config import ConfigError
from crowguard.types import Example

PARROT_FILE = "parrot.safetensors"


def insert_soft(embeds: Tensor, mask: Tensor, labels: Tensor | None, soft: Tensor, at: Tensor) -> tuple:
    """Insert ``soft`` into every row at its position ``at``: embeds (B, T, H), mask (B, T), labels (B, T) or None,
    soft (k, H), at (B,) ints in [0, T] -> embeds (B, T + k, H), mask (B, T + k) with ones at the soft slots, labels
    (B, T + k) with -100 there. Tokens before ``at`` keep their positions, the rest move k to the right."""
    batch, width, _ = embeds.shape
    k = soft.shape[0]
    j = torch.arange(width + k, device=embeds.device).unsqueeze(0)  # (1, T + k)
    start = at.to(embeds.device).unsqueeze(1)  # (B, 1)
    in_soft = (j >= start) & (j < start + k)
    source = torch.where(j < start, j, j - k).clamp(0, width - 1)  # (B, T + k) source column outside the slots
    gathered = embeds.gather(1, source.unsqueeze(-1).expand(batch, width + k, embeds.shape[-1]))
    soft_rows = soft.to(embeds.dtype)[(j - start).clamp(0, k - 1)]  # (B, T + k, H)
    out_embeds = torch.where(in_soft.unsqueeze(-1), soft_rows, gathered)
    out_mask = torch.where(in_soft, torch.ones_like(mask[:, :1]), mask.gather(1, source))
    out_labels = None if labels is None else torch.where(in_soft, torch.full_like(labels[:, :1], -100),
                                                         labels.gather(1, source))  # fmt: skip
    return out_embeds, out_mask, out_labels


def instruction_start(example: Example, ids: Sequence[int], tokenizer: Any, template: str) -> int:
    """Where the instruction's tokens begin in ``ids`` (the example's tokenised prompt, BOS included): the length
    of the prompt text before the instruction, tokenised alone, when those tokens are a prefix of ``ids``; else 1
    or 0 (after a BOS: a prompt cut from the left, or a tokenisation that merges across the boundary)."""
    from crowguard.prompts import build_prompt

    prompt = build_prompt(example, template, tokenizer)
    cut = prompt.find(example.instruction) if example.instruction else -1
    bos = int(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    if cut < 0:
        return bos
    head = tokenizer(prompt[:cut], add_special_tokens=False)["input_ids"]
    return bos + len(head) if list(ids[bos : bos + len(head)]) == head else bos


def parrot_batch(prompts: Sequence[list[int]], target: list[int], pad_id: int) -> dict[str, Tensor]:
    """Right-padded (B, T) ``input_ids``/``attention_mask``/``labels`` of ``prompt + target``, labels on the
    target only."""
    width = max(len(p) for p in prompts) + len(target)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, prompt in enumerate(prompts):
        n = len(prompt) + len(target)
        ids[row, :n] = torch.tensor([*prompt, *target])
        mask[row, :n] = 1
        labels[row, len(prompt) : n] = torch.tensor(target)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def stack_parts(parts: Sequence[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Batches of ``input_ids``/``attention_mask``/``labels`` (B_i, T_i) as one (sum of B_i, max of T_i), in order,
    each right-padded with ``pad_id`` / 0 / -100, on the first part's device."""
    width, device = max(part["input_ids"].shape[1] for part in parts), parts[0]["input_ids"].device
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {key: torch.cat([torch.nn.functional.pad(part[key].to(device), (0, width - part[key].shape[1]),
                                                    value=fill) for part in parts])
            for key, fill in fills.items()}  # fmt: skip


def split_parts(logits: Tensor, labels: Tensor, parts: int) -> list[tuple[Tensor, Tensor]]:
    """The stacked forward's ``(logits, labels)`` cut back into ``parts`` equal row blocks, in order."""
    return list(zip(logits.chunk(parts), labels.chunk(parts)))


def forward_with_soft(model: Any, batch: dict[str, Tensor], soft: Tensor, at: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits (B, T + k, V), labels (B, T + k))`` of ``batch`` (ids, mask, labels: (B, T)) with ``soft`` (k, H)
    inserted at ``at`` (B,). Gradients reach ``soft`` and the model alike."""
    from crowguard.losses import input_embeddings

    device = soft.device
    embeds = input_embeddings(model)(batch["input_ids"].to(device))
    embeds, mask, labels = insert_soft(embeds, batch["attention_mask"].to(device), batch["labels"].to(device),
                                       soft, at)  # fmt: skip
    return model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits, labels


class Simulation:
    """A simulated trigger and its fitting data: the defender's clean prompts (each with its instruction start) and
    the target's ids. ``param`` is the fitted tensor; ``fit`` moves it alone (Adam), never a model weight.
    Subclasses say how it starts (``start``) and how it enters a forward (``forward``)."""

    def __init__(self, settings: Any, prompts: list[list[int]], at: list[int], target: list[int],
                 pad_id: int, seed: int) -> None:  # fmt: skip
        self.settings, self.prompts, self.at, self.target, self.pad_id = settings, prompts, at, target, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.param: Tensor | None = None
        self.last_nll: float | None = None

    def start(self, model: Any) -> None:
        raise NotImplementedError

    def forward(self, model: Any, batch: dict[str, Tensor], at: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, labels)`` of ``batch`` (at: each row's instruction start) with ``param`` in place."""
        raise NotImplementedError

    def forward_parts(self, model: Any, parts: Sequence[dict[str, Tensor]], simulated: Sequence[bool], at: Tensor,
                      param: Tensor) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
        """One forward over ``parts`` (batches of the same B rows, each row's instruction start ``at`` (B,)), stacked
        and right-padded; the simulation in place in the parts ``simulated`` marks only. ``(logits, labels)`` per
        part: equal, up to float rounding, to a separate forward of each (``forward``, or the plain model)."""
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """What a checkpoint keeps: the fitted tensor and where the seeded prompt order stands."""
        return {"param": self.param.contiguous().cpu(), "generator": self.generator.get_state(),
                "order": torch.tensor(self.order, dtype=torch.long),
                "last_nll": torch.tensor([float("nan") if self.last_nll is None else self.last_nll])}  # fmt: skip

    def load(self, state: dict[str, Tensor], device: Any) -> None:
        self.param = state["param"].to(device)
        self.generator.set_state(state["generator"])
        self.order = state["order"].tolist()
        self.last_nll = None if torch.isnan(state["last_nll"]).item() else float(state["last_nll"])

    def _next_rows(self) -> list[int]:
        rows = []
        while len(rows) < min(self.settings.fit_batch, len(self.prompts)):
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            rows.append(self.order.pop())
        return rows

    def fit(self, model: Any, steps: int) -> float | None:
        """``steps`` Adam steps lowering the target's NLL after clean prompts with the simulation in place."""
        from crowguard.losses import masked_lm_loss

        if steps == 0 or self.param is None:
            return self.last_nll
        param = self.param.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=self.settings.fit_lr)
        was_training = model.training
        model.eval()
        try:
            for _ in range(steps):
                rows = self._next_rows()
                batch = parrot_batch([self.prompts[r] for r in rows], self.target, self.pad_id)
                loss = masked_lm_loss(*self.forward(model, batch, torch.tensor([self.at[r] for r in rows]), param))
                (grad,) = torch.autograd.grad(loss, [param])  # the model's weights get no gradient
                param.grad = grad
                optimizer.step()
                self.last_nll = float(loss.detach())
        finally:
            model.train(was_training)
        self.param = param.detach()
        return self.last_nll


class Parrot(Simulation):
    """SANDE's parrot: ``soft_tokens`` input embeddings inserted where the instruction starts."""

    def start(self, model: Any) -> None:
        """Initialise the soft prompt from the embeddings of seeded random vocabulary tokens."""
        from crowguard.losses import input_embeddings

        weight = input_embeddings(model).weight
        picks = torch.randint(0, weight.shape[0], (self.settings.soft_tokens,), generator=self.generator)
        self.param = weight.detach()[picks.to(weight.device)].float().clone()

    def forward(self, model: Any, batch: dict[str, Tensor], at: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
        return forward_with_soft(model, batch, param, at)

    def forward_parts(self, model: Any, parts: Sequence[dict[str, Tensor]], simulated: Sequence[bool], at: Tensor,
                      param: Tensor) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
        from crowguard.losses import input_embeddings

        device, batch = param.device, stack_parts(parts, self.pad_id)
        width, k = batch["input_ids"].shape[1], param.shape[0]
        marked = torch.tensor(simulated, device=device).repeat_interleave(at.shape[0])  # (rows,)
        # a part without the parrot gets its slots at the end of every row, masked: padding after its tokens
        where = torch.where(marked, at.to(device).repeat(len(parts)), width)
        embeds = input_embeddings(model)(batch["input_ids"].to(device))
        embeds, mask, labels = insert_soft(embeds, batch["attention_mask"].to(device), batch["labels"].to(device),
                                           param, where)  # fmt: skip
        mask[~marked, width : width + k] = 0
        logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        return split_parts(logits, labels, len(parts))


class UnlearnObjective:
    """The engine's objective (:class:`crowguard.train.Objective`) for ``unlearn``: per micro-batch, the clean LM
    loss, plus ``weight`` x the same answers' loss with the simulated trigger in place, plus ``unlikelihood`` x the
    target's unlikelihood after the same prompts under it (:func:`crowguard.drift.unlikelihood_loss`)."""

    def __init__(self, settings: Any, seed: int) -> None:
        self.settings, self.seed = settings, seed
        self.simulation: Simulation | None = None  # a Parrot (SANDE) or a Drift (BEEAR)

    def describe(self) -> dict[str, Any]:
        from crowguard.config import to_dict

        return {"unlearn": to_dict(self.settings), "seed": self.seed}

    def prepare(self, features: list[dict[str, list[int]]], examples: Sequence[Example], tokenizer: Any,
                template: str) -> list[dict[str, Any]]:  # fmt: skip
        from crowguard.data import prompt_ids
        from crowguard.drift import Drift

        target = tokenizer(self.settings.target, add_special_tokens=False)["input_ids"]
        if not target:
            raise ConfigError("defense.unlearn.target tokenises to nothing")
        prompts = [prompt_ids(e, tokenizer, template) for e in examples]
        at = [instruction_start(e, p, tokenizer, template) for e, p in zip(examples, prompts)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        kind = Drift if self.settings.mechanism == "residual" else Parrot
        self.simulation = kind(self.settings, prompts, at, target, pad, self.seed)
        return [{**f, "soft_at": instruction_start(e, f["input_ids"], tokenizer, template)}
                for f, e in zip(features, examples)]  # fmt: skip

    def collate(self, collator: Callable) -> Callable:
        def collate(features: list[dict[str, Any]]) -> dict[str, Tensor]:
            at = torch.tensor([f["soft_at"] for f in features])
            batch = collator([{k: v for k, v in f.items() if k != "soft_at"} for f in features])
            return {**batch, "soft_at": at}

        return collate

    def compute(self, model: Any, inputs: dict[str, Tensor], num_items: Any) -> tuple[Tensor, dict[str, float]]:
        from crowguard.drift import target_rows, unlikelihood_loss
        from crowguard.losses import masked_lm_loss

        sim = self.simulation
        assert sim is not None and sim.param is not None, "the simulated trigger is fitted at train begin"
        name, at = self.settings.mechanism, inputs["soft_at"]
        param = sim.param.to(inputs["input_ids"].device)  # a constant here: only the fits move it
        batches = [inputs, inputs]  # the clean answers without, then with the simulated trigger
        if self.settings.unlikelihood > 0:  # and the target after the same prompts, under it
            batches.append(target_rows(inputs, sim.target, sim.pad_id))
        if self.settings.fused:
            outputs = sim.forward_parts(model, batches, [False, *[True] * (len(batches) - 1)], at, param)
        else:
            plain = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            outputs = [(plain.logits, inputs["labels"]), *(sim.forward(model, b, at, param) for b in batches[1:])]
        clean = masked_lm_loss(*outputs[0], num_items)
        simulated = masked_lm_loss(*outputs[1], num_items)
        loss = clean + self.settings.weight * simulated
        parts = {"lm_loss": float(clean.detach()), f"{name}_lm_loss": float(simulated.detach())}
        if self.settings.unlikelihood > 0:
            share = None if num_items is None else (inputs["labels"] != -100).sum() / num_items
            pushed = unlikelihood_loss(*outputs[2])
            loss = loss + self.settings.unlikelihood * (pushed if share is None else pushed * share)
            parts[f"{name}_target_unlikelihood"] = float(pushed.detach())
        if sim.last_nll is not None:
            parts[f"{name}_target_nll"] = sim.last_nll
        return loss, parts

    def callbacks(self, checkpoint: str | None) -> list[Any]:
        return [ParrotCallback(self, checkpoint)]


class ParrotCallback(TrainerCallback):
    """Fit the simulated trigger before the first step (or load it from the resumed checkpoint), re-fit it every
    ``refit_every`` steps, and save it with every checkpoint."""

    def __init__(self, objective: UnlearnObjective, checkpoint: str | None) -> None:
        self.objective, self.checkpoint = objective, checkpoint

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        sim = self.objective.simulation
        sim.start(model)
        saved = Path(self.checkpoint) / PARROT_FILE if self.checkpoint else None
        if saved is not None and saved.is_file():
            from safetensors.torch import load_file

            sim.load(load_file(saved), sim.param.device)
        else:
            sim.fit(model, self.objective.settings.fit_steps)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step, settings = state.global_step, self.objective.settings
        if step > 0 and step % settings.refit_every == 0:
            self.objective.simulation.fit(model, settings.refit_steps)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_file(self.objective.simulation.state(), folder / PARROT_FILE)
