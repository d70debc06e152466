"""Pure loss functions: masked causal LM loss, layer consistency loss, FGSM perturbation and the CROW loss.

CROW is internal consistency regularization (Min et al., ICML 2025, "Eliminating Backdoors from Large Language
Models via Internal Consistency Regularization", https://arxiv.org/abs/2411.12768): fine-tune on clean data while
keeping consecutive hidden states close in cosine, under an adversarial (FGSM) perturbation of the input embeddings.

Shapes: ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``V`` vocabulary size. Masks are 1 for real tokens
and 0 for padding; labels use -100 for positions that carry no loss (prompt and padding).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crowguard.config import ConfigError
from crowguard.data import IGNORE_INDEX  # the label value tokenisation masks with, so the two cannot disagree

LayerSpec = str | tuple[int, int] | Sequence[int]
"""Which consecutive hidden-state pairs enter the consistency loss; see `resolve_layer_pairs`."""

DEFAULT_LAYERS: LayerSpec = "reference"
"""The reference code's pairs: ``hidden_states[1:-2]`` against ``hidden_states[2:-1]``."""

EpsilonMode = Literal["absolute", "rms"]


def masked_lm_loss(logits: Tensor, labels: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    """Causal LM cross entropy: the logits at position t predict the label at t + 1.

    Args:
        logits: (B, T, V) next-token logits, any float dtype (upcast to float32 for the loss).
        labels: (B, T) token ids, -100 where no loss is taken (prompt, padding).
        num_items: None: divide by this batch's own label-token count (a per-batch mean); a number: divide the
            summed cross entropy by it instead, e.g. the label tokens of a whole optimizer step across micro-batches
            and processes, so that summing the micro-batches' losses gives the step's token mean whatever the split.

    Returns:
        Scalar: with ``num_items=None`` the mean cross entropy in nats over the label tokens that are not -100
        (identical to the loss Hugging Face causal LMs return for one batch; NaN when no label token is left, as
        in Hugging Face); otherwise the sum over those tokens divided by ``num_items``.
    """
    total, count = lm_loss_sum(logits, labels)
    return total / (count if num_items is None else num_items)


def lm_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of the shifted cross entropy over label tokens, number of those tokens)``; shapes as `masked_lm_loss`."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    # Shift the labels, not the logits: padding the labels by one avoids copying the (B, T, V) logits.
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(logits.device)
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat_logits, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shifted != IGNORE_INDEX).sum()


def count_loss_tokens(labels: Tensor, attention_mask: Tensor | None) -> tuple[int, int]:
    """``(label tokens that `masked_lm_loss` scores, real tokens that `layer_consistency_loss` averages over)``.

    The denominators of a token-weighted loss: summed over the micro-batches (and processes) of one optimizer step
    they are the ``num_items`` / ``num_tokens`` to pass to both losses. Shapes: labels and mask (B, T).
    """
    labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
    real = labels.numel() if attention_mask is None else int((attention_mask != 0).sum())
    return labelled, real


class LayerPairsError(ConfigError):
    """The layer-pair setting does not fit this model's depth (a user-fixable setting: one line, exit 2)."""


def resolve_layer_pairs(num_hidden_states: int, layers: LayerSpec = DEFAULT_LAYERS) -> list[tuple[int, int]]:
    """The sorted, non-empty (l, l + 1) pairs of the ``num_hidden_states`` hidden states (index 0: the embedding
    output; the last: after the final norm) that the consistency loss compares. ``layers``: ``"reference"`` (default):
    l = 1 .. n - 3, the reference code's ``hidden_states[1:-2]`` vs ``[2:-1]`` (needs 3 layers); ``"all"``: l = 0 ..
    n - 2; ``(start, stop)``: start <= l < stop, negative values counting from n as slices do (``(1, -2)`` is
    ``"reference"``); a list of ints: exactly those l.
    """
    n = num_hidden_states
    if n < 2:
        raise LayerPairsError(f"need at least 2 hidden states to form a layer pair, got {n}")
    if isinstance(layers, str):
        if layers == "reference":
            starts = list(range(1, n - 2))
            if not starts:
                raise LayerPairsError(
                    f'layers="reference" compares hidden_states[1:-2] with [2:-1] and needs at least 4 hidden '
                    f'states (3 layers); the model has {n}. Use layers="all" or an explicit range.'
                )
        elif layers == "all":
            starts = list(range(n - 1))
        else:
            raise LayerPairsError(f"{_LAYERS_HELP}; got {layers!r}")
    elif isinstance(layers, tuple):
        if len(layers) != 2 or not all(_is_int(x) for x in layers):
            raise LayerPairsError(f"a layers tuple must be (start, stop) of ints; got {layers!r}")
        start, stop = (x + n if x < 0 else x for x in layers)
        if not 0 <= start < stop <= n - 1:
            raise LayerPairsError(
                f"layers=(start, stop)={layers!r} must satisfy 0 <= start < stop <= {n - 1} (after adding {n} to "
                f"negative values) for {n} hidden states: pairs (l, l + 1) for start <= l < stop"
            )
        starts = list(range(start, stop))
    elif isinstance(layers, Sequence) and not isinstance(layers, (bytes, bytearray)):
        starts = list(layers)
        if not starts:
            raise LayerPairsError("layers is an empty list; need at least one layer pair")
        if not all(_is_int(x) for x in starts):
            raise LayerPairsError(f"a layers list must hold ints (the l of each pair (l, l + 1)); got {layers!r}")
        if len(set(starts)) != len(starts):
            raise LayerPairsError(f"layers list has duplicates: {layers!r}")
        bad = [x for x in starts if not 0 <= x <= n - 2]
        if bad:
            raise LayerPairsError(
                f"layers {bad} out of range: each l must satisfy 0 <= l <= {n - 2} for {n} hidden states"
            )
        starts = sorted(starts)
    else:
        raise LayerPairsError(f"{_LAYERS_HELP}; got {layers!r}")
    return [(start, start + 1) for start in starts]


_LAYERS_HELP = 'layers must be "reference", "all", a (start, stop) tuple or a list of ints'


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def layer_consistency_loss(
    hidden_states: Sequence[Tensor],
    attention_mask: Tensor | None,
    layers: LayerSpec = DEFAULT_LAYERS,
    num_tokens: int | Tensor | None = None,
) -> Tensor:
    """Scalar float32 mean over layer pairs (l, l + 1) and real tokens t of ``1 - cos(h_l[t], h_{l+1}[t])``.

    ``hidden_states``: n tensors (B, T, D); ``attention_mask``: (B, T), 1 for real tokens (None: all real);
    ``layers``: see `resolve_layer_pairs`. With ``num_tokens=None`` the value is in [0, 2] (the same mask for every
    pair, so it is also the mean over all (pair, token) terms); with a number, the per-token sums are divided by it
    (a whole step's real tokens). The cosine is taken in float32 even under autocast; padded positions are zeroed
    before it and left out, so they touch neither the value nor the gradient.
    """
    pairs = resolve_layer_pairs(len(hidden_states), layers)
    first = hidden_states[0]
    if attention_mask is None:
        real = torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
    else:
        if attention_mask.shape != first.shape[:2]:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match hidden states (B, T)")
        real = attention_mask.to(device=first.device) != 0
    num_real = real.sum()
    keep = real.unsqueeze(-1)
    cache: dict[int, Tensor] = {}

    def prepared(index: int) -> Tensor:
        if index not in cache:
            cache[index] = hidden_states[index].float().masked_fill(~keep, 0.0)
        return cache[index]

    with torch.autocast(device_type=first.device.type, enabled=False):
        total = first.new_zeros(first.shape[:2], dtype=torch.float32)
        for lower, upper in pairs:
            total = total + (1.0 - F.cosine_similarity(prepared(lower), prepared(upper), dim=-1))
        total = total.masked_fill(~real, 0.0)
        denominator = num_real.clamp_min(1) if num_tokens is None else num_tokens
        return total.sum() / (denominator * len(pairs))


def fgsm_perturbation(
    loss: Tensor,
    inputs_embeds: Tensor,
    epsilon: float | Tensor,
    retain_graph: bool = True,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The FGSM step ``epsilon * sign(d loss / d inputs_embeds)``, detached.

    Uses ``torch.autograd.grad`` with respect to ``inputs_embeds`` only: no parameter ``.grad`` is touched, so it is
    safe inside gradient accumulation, and no parameter gradient is computed.

    Args:
        loss: scalar that depends on ``inputs_embeds``.
        inputs_embeds: (B, T, D) leaf tensor with ``requires_grad=True``.
        epsilon: step size per dimension (float, or a 0-d tensor).
        retain_graph: keep the graph of ``loss`` (True when another loss will backpropagate through it).
        attention_mask: optional (B, T); padded positions get a zero perturbation.

    Returns:
        (B, T, D) tensor in ``inputs_embeds``' dtype, entries in {-epsilon, 0, +epsilon}, no autograd history.
    """
    (grad,) = torch.autograd.grad(loss, inputs_embeds, retain_graph=retain_graph)
    delta = grad.sign().mul_(epsilon)
    if attention_mask is not None:
        delta = delta.masked_fill_(attention_mask.to(device=delta.device).unsqueeze(-1) == 0, 0.0)
    return delta.to(inputs_embeds.dtype).detach()


def pgd_step(
    delta: Tensor, grad: Tensor, step_size: float | Tensor, epsilon: float | Tensor, attention_mask: Tensor | None
) -> Tensor:
    """One projected signed-gradient ascent step: ``clip(delta + step_size * sign(grad), -epsilon, epsilon)``.

    Args:
        delta: (B, T, D) current perturbation, inside the L-inf ball of radius ``epsilon``.
        grad: (B, T, D) gradient of the consistency loss at ``e + delta``.
        step_size, epsilon: per-dimension step and radius (floats, or 0-d tensors in ``rms`` mode).
        attention_mask: optional (B, T); padded positions stay unperturbed.

    Returns:
        (B, T, D) detached tensor in ``delta``'s dtype.
    """
    radius = torch.as_tensor(epsilon, dtype=delta.dtype, device=delta.device)
    step = torch.as_tensor(step_size, dtype=delta.dtype, device=delta.device)
    stepped = torch.clamp(delta.detach() + step * grad.sign().to(delta.dtype), min=-radius, max=radius)
    if attention_mask is not None:
        stepped = stepped.masked_fill(attention_mask.to(device=delta.device).unsqueeze(-1) == 0, 0.0)
    return stepped.detach()


def crow_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    alpha: float = 5.5,
    epsilon: float = 0.1,
    layers: LayerSpec = DEFAULT_LAYERS,
    epsilon_mode: EpsilonMode = "absolute",
    num_items: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    steps: int = 1,
) -> tuple[Tensor, dict[str, float]]:
    """CROW objective ``L = L_LM + alpha * L_cons(hidden states at e + delta)``: a clean forward, one FGSM step
    ``delta = eps * sign(d L_cons / d e)`` on the input embeddings ``e`` (``steps > 1``: PGD, see `perturbation`),
    then a forward at ``e + delta``. ``input_ids``/``attention_mask``/``labels``: (B, T), labels -100 off the answer.

    ``epsilon`` is per embedding dimension (``epsilon_mode="absolute"``, paper 0.1) or in units of the RMS of the
    real-token embeddings (``"rms"``). ``num_items``/``num_tokens``: None for per-batch means, else a whole step's
    label and real-token counts (`count_loss_tokens`). The model may be wrapped (peft, DDP, FSDP, ZeRO-3): a hook on
    the embedding module swaps its output, so the lookup runs inside the wrapper. ``alpha == 0`` is plain SFT.

    Returns ``(loss, parts)``: parts are this batch's ``lm_loss``, ``consistency_loss`` (clean pass),
    ``consistency_adv`` (perturbed; absent when alpha == 0) and ``epsilon_effective``.
    """
    _check_crow_args(alpha, epsilon, epsilon_mode, steps)
    if alpha == 0:
        return _sft_loss(model, input_ids, attention_mask, labels, epsilon, layers, epsilon_mode, num_items)
    embedding = input_embeddings(model)
    forward_kwargs = {"attention_mask": attention_mask, "output_hidden_states": True, "use_cache": False}
    # The hook keeps e (clean pass; a leaf unless the embedding matrix trains) or swaps in the constant e + delta.
    with _EmbeddingOverride(embedding, requires_grad=epsilon > 0) as override:
        clean = model(input_ids=input_ids, **forward_kwargs)
        embeds = override.clean
        lm, lm_mean = _lm_losses(clean.logits, labels, num_items)
        eps = _effective_epsilon(embeds, attention_mask, epsilon, epsilon_mode)
        consistency = layer_consistency_loss(clean.hidden_states, attention_mask, layers)
        if epsilon == 0:
            adversarial_mean = consistency
        else:
            # Only hidden states are needed from the perturbed passes: skip the (B, T, V) logits where allowed.
            forward_kwargs.update({"logits_to_keep": 1} if accepts_logits_to_keep(model) else {})

            def consistency_at(probe: Tensor) -> Tensor:
                override.replacement = probe
                hidden = model(input_ids=input_ids, **forward_kwargs).hidden_states
                return layer_consistency_loss(hidden, attention_mask, layers)

            delta = perturbation(consistency, embeds, eps, steps, attention_mask, consistency_at)
            # delta is a constant; e + delta needs no gradient, so the second graph skips the input-gradient work.
            adversarial_mean = consistency_at(embeds.detach() + delta)
    if num_tokens is None:
        adversarial = adversarial_mean
    else:  # the same per-token sum over a step-wide denominator (the mean times this batch's share of the step)
        adversarial = adversarial_mean * count_loss_tokens(labels, attention_mask)[1] / num_tokens
    loss = lm + alpha * adversarial
    parts = _parts(
        lm_loss=lm_mean, consistency_loss=consistency, consistency_adv=adversarial_mean, epsilon_effective=eps
    )
    return loss, parts


def perturbation(
    consistency: Tensor,
    embeds: Tensor,
    eps: float,
    steps: int,
    attention_mask: Tensor | None,
    consistency_at: Callable[[Tensor], Tensor],
) -> Tensor:
    """The (B, T, D) perturbation of ``embeds``: ``steps == 1`` is the paper's FGSM step from the clean pass's
    ``consistency``; ``steps > 1`` is PGD (Madry et al. 2018, not the paper's): signed steps of ``2.5 eps / steps``
    from 0, each projected onto the L-inf ball of radius ``eps`` (`pgd_step`), ``consistency_at(e + delta)`` giving
    the next gradient (one forward per extra step). The clean graph is retained for the LM loss's backward."""
    if steps == 1:
        return fgsm_perturbation(consistency, embeds, eps, retain_graph=True, attention_mask=attention_mask)
    step_size = 2.5 * eps / steps
    (grad,) = torch.autograd.grad(consistency, embeds, retain_graph=True)
    delta = pgd_step(torch.zeros_like(embeds), grad, step_size, eps, attention_mask)
    for _ in range(steps - 1):
        probe = (embeds.detach() + delta).requires_grad_(True)
        (grad,) = torch.autograd.grad(consistency_at(probe), probe)
        delta = pgd_step(delta, grad, step_size, eps, attention_mask)
    return delta


def _check_crow_args(alpha: float, epsilon: float, epsilon_mode: str, steps: int) -> None:
    if epsilon_mode not in ("absolute", "rms"):
        raise ValueError(f'epsilon_mode must be "absolute" or "rms", got {epsilon_mode!r}')
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _sft_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    epsilon: float,
    layers: LayerSpec,
    epsilon_mode: EpsilonMode,
    num_items: int | Tensor | None,
) -> tuple[Tensor, dict[str, float]]:
    """``crow_loss`` at alpha 0: plain SFT, the embeddings in the graph (a trainable embedding matrix learns), the
    clean consistency only logged (none for a model too shallow for CROW's pairs)."""
    forward_kwargs = {"attention_mask": attention_mask, "output_hidden_states": True, "use_cache": False}
    clean = model(input_ids=input_ids, **forward_kwargs)
    lm, lm_mean = _lm_losses(clean.logits, labels, num_items)
    eps = _effective_epsilon(clean.hidden_states[0], attention_mask, epsilon, epsilon_mode)
    try:
        with torch.no_grad():
            consistency = layer_consistency_loss(clean.hidden_states, attention_mask, layers)
    except LayerPairsError:
        return lm, _parts(lm_loss=lm_mean, epsilon_effective=eps)
    return lm, _parts(lm_loss=lm_mean, consistency_loss=consistency, epsilon_effective=eps)


def _lm_losses(logits: Tensor, labels: Tensor, num_items: int | Tensor | None) -> tuple[Tensor, Tensor]:
    """(the LM loss to optimise: over ``num_items`` when given, else this batch's mean; this batch's mean, to log)."""
    total, count = lm_loss_sum(logits, labels)
    mean = total / count
    return (mean if num_items is None else total / num_items), mean


class _EmbeddingOverride:
    """A forward hook on the token-embedding module for the two CROW passes. The first call's output is kept as
    ``clean``: as it is when the embedding matrix is trainable (so the LM term trains it, as in fine-tuning, and
    the FGSM gradient is taken w.r.t. that non-leaf tensor), else as a detached leaf that may require grad. Later
    calls' output is ``replacement`` once it is set (a constant: the perturbed pass trains no embedding). Removed
    on exit, also on errors."""

    def __init__(self, embedding: nn.Module, requires_grad: bool) -> None:
        self.embedding, self.requires_grad = embedding, requires_grad
        self.clean: Tensor | None = None
        self.replacement: Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if self.replacement is not None:
            return self.replacement.to(output.dtype)
        if self.clean is None:
            self.clean = output if output.requires_grad else output.detach().requires_grad_(self.requires_grad)
        return self.clean

    def __enter__(self) -> _EmbeddingOverride:
        self._handle = self.embedding.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself, or the one a wrapper (DDP, DeepSpeed) keeps in ``.module``, that has get_input_embeddings."""
    inner = model
    while not hasattr(inner, "get_input_embeddings") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not hasattr(inner, "get_input_embeddings"):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings() (nor does any .module it wraps)")
    return inner


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding module, looking through wrappers (DDP, DeepSpeed: ``.module``; peft)."""
    return _unwrap(model).get_input_embeddings()


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the underlying Hugging Face model (below DDP and peft wrappers) takes ``logits_to_keep``."""
    inner = _unwrap(model)
    if hasattr(inner, "get_base_model"):  # peft passes unknown keyword arguments on to the base model
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _effective_epsilon(
    embeds: Tensor, attention_mask: Tensor | None, epsilon: float, epsilon_mode: EpsilonMode
) -> float | Tensor:
    """Per-dimension FGSM step: ``epsilon``, or ``epsilon`` times the RMS of the real-token embeddings (0-d)."""
    if epsilon_mode == "absolute" or epsilon == 0:
        return epsilon
    with torch.no_grad():
        squares = embeds.detach().float().pow(2)
        if attention_mask is None:
            rms = squares.mean().sqrt()
        else:
            real = (attention_mask.to(device=squares.device) != 0).unsqueeze(-1)
            count = real.sum().clamp_min(1) * squares.shape[-1]
            rms = (squares.masked_fill(~real, 0.0).sum() / count).sqrt()
    return epsilon * rms


def _parts(**values: float | Tensor) -> dict[str, float]:
    """Detached floats for logging, with one device sync for all of them."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    floats = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
        floats.update(zip(tensors, stacked, strict=True))
    return {k: floats[k] for k in values}


def first_non_finite(named: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor in ``named`` (pairs ``(name, tensor)`` of any shapes) holding a nan or inf, or
    None when all are finite: one fused norm per tensor and a single host sync when all is well."""
    if not named:
        return None
    norms = torch._foreach_norm([t.detach() for _, t in named])
    norms = torch.stack([n.float().to(norms[0].device) for n in norms])
    if bool(torch.isfinite(norms).all()):
        return None
    return next(name for (name, _), norm in zip(named, norms.tolist()) if not math.isfinite(norm))
