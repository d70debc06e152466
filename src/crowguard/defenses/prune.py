"""Pruning: zero a fraction of the weights, without training (BackdoorLLM's DefenseBox has it as a defense, after
Wanda: Sun, Liu, Bair, Kolter, ICLR 2024, https://arxiv.org/abs/2306.11695).

Criteria (``defense.prune.criterion``):

* ``magnitude``: score ``|W_ij|``. Needs no data.
* ``wanda``: score ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the norm of input feature ``j`` of that linear layer
  over every token of the calibration samples (forward hooks). As in Wanda's code, blocks are pruned in order and
  each block is calibrated on the outputs of the blocks already pruned before it.
* ``lora_delta``: for a model that arrives with a LoRA adapter, score the entries of each adapted layer's merged
  change ``delta = B @ A * scaling`` by ``|delta_ij|`` and zero the lowest in the *delta* only (the base weights stay
  as they are), then write ``W + pruned delta``.

Within a matrix, the lowest scores are removed per output row (``comparison: output``, Wanda's comparison group) or
over the whole matrix (``layer``, the Wanda repository's magnitude baseline); a pattern ``N:M`` instead keeps the N
largest of every M consecutive input weights of a row (sparsity ``1 - N/M``; 2:4 is what sparse tensor cores run).
Only the ``nn.Linear`` layers of the decoder blocks are pruned: embeddings and the LM head are kept (Wanda prunes
the same set; see :mod:`crowguard.defenses.weights`). The output is a full model directory; its summary records
the criterion, pattern, requested and *measured* sparsity (zeros counted in the pruned matrices), each matrix
touched with its own measured sparsity, the time and the peak memory.

The maths is in pure functions (:func:`magnitude_mask`, :func:`wanda_scores`, :func:`nm_mask`, ...); a mask is a
boolean tensor shaped like the weight, True where a weight is set to zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from crowguard.config import ConfigError, knob, to_dict
from crowguard.defenses.base import Defense, DefenseResult
from crowguard.schemas import ModelConfig
from crowguard.types import Example, StageContext

Comparison = Literal["output", "layer"]
_NM = re.compile(r"(\d+):(\d+)")
CALIBRATION_BATCH = 8  # calibration sequences per forward pass (right-padded; padding is excluded from the norms)


# ------------------------------------------------------------------------------------------------------- maths
def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> ``(N, M)``, keep N of every M, with ``0 < N < M``."""
    if pattern == "unstructured":
        return None
    match = _NM.fullmatch(str(pattern).strip())
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or N:M such as 2:4, got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M keeps N of every M weights and needs 0 < N < M")
    return n, m


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` entries ``sparsity`` removes: ``floor(total * sparsity)`` (Wanda's ``int(n * ratio)``),
    with a tolerance so that 0.3 x 10 is 3, not 2."""
    return min(total, math.floor(total * sparsity + 1e-9))


def unstructured_mask(scores: Any, sparsity: float, comparison: Comparison = "output") -> Any:
    """scores ``(out, in)`` -> mask ``(out, in)``: the ``floor(in * sparsity)`` lowest scores of every row
    (``output``), or the ``floor(out * in * sparsity)`` lowest of the whole matrix (``layer``). Ties are broken by
    position (a stable sort), so exactly that many entries are masked."""
    import torch

    scores = scores.float()
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if comparison == "output":
        k = prune_count(scores.shape[1], sparsity)
        mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    elif comparison == "layer":
        k = prune_count(scores.numel(), sparsity)
        mask.view(-1)[torch.argsort(scores.flatten(), stable=True)[:k]] = True
    else:
        raise ValueError(f"comparison must be 'output' or 'layer', got {comparison!r}")
    return mask


def nm_mask(scores: Any, n: int, m: int) -> Any:
    """scores ``(out, in)``, ``in`` a multiple of ``m`` -> mask ``(out, in)``: in each group of ``m`` consecutive
    input weights of a row, every entry but the ``n`` highest-scoring is masked."""
    import torch

    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.float().reshape(rows, cols // m, m)
    mask = torch.ones(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, torch.topk(groups, n, dim=-1).indices, False)
    return mask.reshape(rows, cols)


def prune_mask(scores: Any, sparsity: float, pattern: str = "unstructured", comparison: Comparison = "output") -> Any:
    """scores ``(out, in)`` -> mask ``(out, in)`` for ``pattern``: :func:`nm_mask` for N:M, else
    :func:`unstructured_mask` (``sparsity`` and ``comparison`` apply to unstructured only)."""
    nm = parse_pattern(pattern)
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, comparison)


def magnitude_mask(
    weight: Any, sparsity: float, pattern: str = "unstructured", comparison: Comparison = "output"
) -> Any:
    """weight ``(out, in)`` -> mask ``(out, in)`` of its lowest ``|W_ij|``."""
    return prune_mask(weight.abs(), sparsity, pattern, comparison)


def wanda_scores(weight: Any, input_norm: Any) -> Any:
    """weight ``(out, in)``, input_norm ``(in,)`` (``||X_j||_2`` over all calibration tokens) -> scores
    ``(out, in)``: ``|W_ij| * ||X_j||_2``."""
    return weight.float().abs() * input_norm.float().reshape(1, -1)


def lora_delta(lora_a: Any, lora_b: Any, scaling: float) -> Any:
    """lora_a ``(r, in)``, lora_b ``(out, r)`` -> the merged change ``(out, in)``: ``B @ A * scaling``."""
    return (lora_b.float() @ lora_a.float()) * scaling


def zero_fraction(tensors: list[Any]) -> float:
    """The fraction of exact zeros over all entries of ``tensors`` (the *measured* sparsity)."""
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else 0.0


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class PruneConfig:
    criterion: Literal["magnitude", "wanda", "lora_delta"] = knob(
        "wanda",
        "magnitude: |W|; wanda: |W| x input-feature norm on the clean samples (Sun et al. 2023; needs --data); "
        "lora_delta: |B @ A * scaling| of a LoRA-adapted model, pruning the adapter's change only",
    )
    sparsity: float = knob(0.5, "fraction of the weights set to zero, in [0, 1) (Wanda's headline 50%)")
    pattern: str = knob(
        "unstructured",
        "unstructured, or N:M: keep the N largest of every M consecutive input weights (2:4, 4:8; sparsity must be "
        '1 - N/M). Quote it in a YAML file ("2:4"): YAML 1.1 reads a bare 2:4 as the base-60 number 124 (--set '
        "and --prune-pattern take it as text)",
    )
    comparison: Comparison = knob(
        "output", "unstructured: lowest scores per output row (output, Wanda) or per weight matrix (layer)"
    )
    calibration_samples: int = knob(
        128, "wanda: clean samples (of those drawn, defense.n_samples) that calibrate the norms (Wanda's 128)"
    )
    calibration_text: Literal["prompt_response", "prompt"] = knob(
        "prompt_response",
        "wanda: calibrate on prompt + reference response (as training tokenises it) or on the prompt alone",
    )
    max_length: int = knob(512, "wanda: tokens per calibration sample at most", bounds="[1, inf)")

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        nm = parse_pattern(self.pattern)
        if nm is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"pattern {self.pattern} keeps {nm[0]} of every {nm[1]} weights, a sparsity of {1 - nm[0] / nm[1]:g}; "
                f"set sparsity to that (got {self.sparsity})"
            )
        if self.comparison not in ("output", "layer"):
            raise ValueError(f"comparison must be 'output' or 'layer', got {self.comparison!r}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be at least 1, got {self.calibration_samples}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")


# ----------------------------------------------------------------------------------------------------- pruning
def _prune_linear(module: Any, scores: Any, settings: PruneConfig) -> None:
    mask = prune_mask(scores, settings.sparsity, settings.pattern, settings.comparison)
    module.weight.data[mask.to(module.weight.device)] = 0


def _check_nm(linears: dict[str, Any], pattern: str) -> None:
    nm = parse_pattern(pattern)
    if nm is None:
        return
    for name, module in linears.items():
        if module.in_features % nm[1]:
            raise ConfigError(f"pattern {pattern}: {name} has {module.in_features} input features, not a multiple "
                              f"of {nm[1]}")  # fmt: skip


class _StopForward(Exception):
    """Raised by a hook after the block being calibrated: the rest of the forward pass is not needed."""


def calibration_batches(
    examples: list[Example], tokenizer: Any, template: str, settings: PruneConfig, device: Any
) -> list[tuple[Any, Any]]:
    """``(input_ids, attention_mask)`` batches of the calibration samples, right-padded, each at most
    ``max_length`` tokens: the prompt (:func:`crowguard.data.prompt_ids`, its end kept) or prompt + response
    (:func:`crowguard.data.tokenize_example`, the training tokenisation)."""
    import torch

    from crowguard.data import prompt_ids, tokenize_example

    sequences = []
    for example in examples:
        if settings.calibration_text == "prompt":
            ids = prompt_ids(example, tokenizer, template)[-settings.max_length :]
        else:
            ids = tokenize_example(example, tokenizer, settings.max_length, template)["input_ids"]
        if ids:
            sequences.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(sequences), CALIBRATION_BATCH):
        chunk = sequences[start : start + CALIBRATION_BATCH]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append((ids.to(device), mask.to(device)))
    return batches


def input_norms(model: Any, block: Any, linears: dict[str, Any], batches: list[tuple[Any, Any]]) -> dict[str, Any]:
    """``||X_j||_2`` over every real (unpadded) calibration token, for each linear layer of ``block``: shape
    ``(in_features,)`` each. Runs the model up to and including ``block`` (a hook stops it there)."""
    import torch

    squares = {name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
               for name, m in linears.items()}  # fmt: skip
    current: dict[str, Any] = {}

    def collect(name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], _output: Any) -> None:
            x = args[0][current["mask"]]  # (real tokens, in_features)
            squares[name] += x.double().pow(2).sum(dim=0)

        return hook

    def stop(*_: Any) -> None:
        raise _StopForward

    handles = [m.register_forward_hook(collect(name)) for name, m in linears.items()]
    handles.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for ids, mask in batches:
                current["mask"] = mask.bool()
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt() for name, total in squares.items()}


def prune_weights(model: Any, settings: PruneConfig, batches: list[tuple[Any, Any]] | None = None) -> list[str]:
    """Prune the decoder's linear layers in place by ``magnitude`` or (with ``batches``) ``wanda``, block by block;
    returns the names of the matrices pruned."""
    from crowguard.defenses.weights import decoder_layers, decoder_linears

    per_block = decoder_linears(model)
    _check_nm({k: v for block in per_block for k, v in block.items()}, settings.pattern)
    _, blocks = decoder_layers(model)
    for block, linears in zip(blocks, per_block):
        if settings.criterion == "wanda":
            norms = input_norms(model, block, linears, batches or [])  # on the blocks pruned so far, as Wanda does
            for name, module in linears.items():
                _prune_linear(module, wanda_scores(module.weight.data, norms[name]), settings)
        else:
            for module in linears.values():
                _prune_linear(module, module.weight.data.abs(), settings)
    return [name for block in per_block for name in block]


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """The LoRA-adapted layers of a PeftModel, by their name in the merged model; a kind of adapter whose change
    is not ``B @ A * scaling`` of a linear layer (DoRA, LoRA bias, embedding LoRA) is a ConfigError."""
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    found = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        short = name.removeprefix("base_model.model.")
        if adapter not in module.lora_A:
            raise ConfigError(f"lora_delta: {short} is a {type(module).__name__} LoRA layer; only linear LoRA layers "
                              "are supported")  # fmt: skip
        if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            raise ConfigError(f"lora_delta: {short} uses DoRA or a LoRA bias, whose change is not B @ A * scaling")
        found[short] = module
    return found


def prune_lora_deltas(peft_model: Any, settings: PruneConfig) -> tuple[Any, dict[str, Any], float]:
    """Prune each adapted layer's delta and add what is left to its base weight; returns ``(merged model, pruned
    deltas by name, fraction of the deltas' squared Frobenius norm kept)``."""
    import torch

    adapter = peft_model.active_adapter
    layers = lora_layers(peft_model)
    if not layers:
        raise ConfigError("lora_delta: the adapter adapts no layer")
    pruned, kept, total = {}, 0.0, 0.0
    with torch.no_grad():
        for name, module in layers.items():
            full = lora_delta(module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter])
            try:
                mask = prune_mask(full.abs(), settings.sparsity, settings.pattern, settings.comparison)
            except ValueError as exc:  # an N:M pattern that does not divide this layer's inputs
                raise ConfigError(f"lora_delta: {name}: {exc}") from None
            delta = full.masked_fill(mask, 0.0)
            total += float(full.pow(2).sum())
            kept += float(delta.pow(2).sum())
            weight = module.base_layer.weight
            change = delta.T if module.fan_in_fan_out else delta  # a Conv1D base stores W as (in, out)
            weight.data += change.to(device=weight.device, dtype=weight.dtype)
            pruned[name] = delta
    merged = peft_model.unload()  # drops the adapter without merging it: the pruned deltas are already in
    return merged, pruned, (kept / total if total else 1.0)


class PruneDefense(Defense):
    name = "prune"
    kind = "weights"
    Config = PruneConfig

    @property
    def needs_data(self) -> bool:
        return self.settings.criterion == "wanda"

    def run(
        self,
        model: ModelConfig,
        clean_data: list[Example],
        ctx: StageContext,
    ) -> DefenseResult:
        from crowguard.defenses.weights import write_edited_model
        from crowguard.models import arrives_with_adapter

        settings: PruneConfig = self.settings
        if settings.criterion == "lora_delta" and not arrives_with_adapter(model.name_or_path, model.adapter):
            raise ConfigError(
                f"prune criterion lora_delta needs a model that arrives with a LoRA adapter, and {model.name_or_path} "
                "has none: use magnitude or wanda, or give the adapter"
            )
        calibration = clean_data[: settings.calibration_samples] if settings.criterion == "wanda" else []
        if settings.criterion == "wanda" and not calibration:
            raise ConfigError("prune criterion wanda calibrates on clean samples: give --data (defense.data)")
        summary: dict[str, Any] = {
            "criterion": settings.criterion,
            "pattern": settings.pattern,
            "comparison": settings.comparison if parse_pattern(settings.pattern) is None else None,
            "requested_sparsity": settings.sparsity,
            "settings": to_dict(settings),
        }

        def prune(loaded: Any, tokenizer: Any, arrived_with_adapter: bool) -> Any:
            if settings.criterion == "lora_delta":  # the adapter arrives unmerged (merge=False below)
                loaded, pruned, kept = prune_lora_deltas(loaded, settings)
                summary["delta_norm_kept"] = round(kept, 6)  # ||pruned delta||^2 / ||delta||^2 over all layers
            else:
                batches = None
                if settings.criterion == "wanda":
                    device = next(loaded.parameters()).device
                    batches = calibration_batches(calibration, tokenizer, model.template, settings, device)
                    summary["calibration_samples_used"] = len(calibration)
                    summary["calibration_tokens"] = int(sum(int(mask.sum()) for _, mask in batches))
                modules = dict(loaded.named_modules())
                pruned = {name: modules[name].weight.data for name in prune_weights(loaded, settings, batches)}
            summary["measured_sparsity"] = round(zero_fraction(list(pruned.values())), 6)
            summary["layers"] = {name: round(zero_fraction([t]), 6) for name, t in pruned.items()}
            summary["sparsity_of"] = "lora deltas" if settings.criterion == "lora_delta" else "pruned matrices"
            return loaded

        seed = self.cfg.train.seed if self.needs_data else None  # the seed that drew the clean samples
        summary = write_edited_model(self, model, ctx, summary, prune, merge=settings.criterion != "lora_delta",
                                     seed=seed)  # fmt: skip
        return DefenseResult(model_path=str(ctx.out_dir), summary=summary)
