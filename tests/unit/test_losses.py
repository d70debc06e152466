"""Tests for crowguard.losses against naive formulas on a tiny random-init Llama."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from crowguard.data import IGNORE_INDEX, tokenize_example
from crowguard.losses import (
    count_loss_tokens,
    crow_loss,
    fgsm_perturbation,
    layer_consistency_loss,
    masked_lm_loss,
    resolve_layer_pairs,
)
from crowguard.types import Example

from helpers import tiny_tokenizer

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and spinning threads are slow when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).float()


def batch(padding: str = "right", seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) for 3 sequences of lengths 12, 7 and 4, padded to 12."""
    generator = torch.Generator().manual_seed(seed)
    lengths, width = [12, 7, 4], 12
    input_ids = torch.randint(3, VOCAB, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        if padding == "right":
            attention_mask[row, :length] = 1
        else:
            attention_mask[row, width - length :] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100  # a masked "prompt"
    if padding == "left":
        labels[2, width - 4 : width - 2] = -100
    return input_ids, attention_mask, labels


def hidden_states_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states


def naive_consistency(hidden_states, attention_mask, pairs) -> float:
    """Loop over pairs, sequences and real tokens; cosine in float64."""
    per_pair = []
    for lower, upper in pairs:
        terms = []
        for b in range(attention_mask.shape[0]):
            for t in range(attention_mask.shape[1]):
                if attention_mask[b, t] == 0:
                    continue
                x, y = hidden_states[lower][b, t].double(), hidden_states[upper][b, t].double()
                terms.append(1.0 - float(x @ y / (x.norm() * y.norm())))
        per_pair.append(sum(terms) / len(terms))
    return sum(per_pair) / len(per_pair)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --- masked_lm_loss ---------------------------------------------------------------------------------------------


def test_masked_lm_loss_matches_naive_shifted_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [4, 5, -100, -100, -100]])
    terms = [
        -torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]]
        for b in range(2)
        for t in range(1, 5)
        if labels[b, t] != -100
    ]
    assert masked_lm_loss(logits, labels).item() == pytest.approx(float(sum(terms) / len(terms)), abs=1e-6)


def test_masked_lm_loss_with_num_items_is_the_token_sum_over_that_count():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 7, generator=generator)
    labels = torch.full((3, 6), -100)
    labels[0, 1:], labels[1, 2], labels[2, 1] = torch.tensor([1, 2, 3, 4, 5]), 6, 1
    whole = masked_lm_loss(logits, labels)
    items = count_loss_tokens(labels, None)[0]
    assert items == 7
    split = sum(masked_lm_loss(logits[rows], labels[rows], items) for rows in (slice(0, 1), slice(1, 3)))
    assert split.item() == pytest.approx(whole.item(), abs=1e-6)
    means = (masked_lm_loss(logits[:1], labels[:1]) + masked_lm_loss(logits[1:], labels[1:])) / 2
    assert abs(means.item() - whole.item()) > 1e-3  # the mean of means weighs the short rows' tokens more


def test_losses_score_exactly_the_response_tokens_that_tokenisation_leaves_unmasked():
    # One mask value for data and losses: a loss that ignored another value would train on the prompt.
    tokenizer = tiny_tokenizer()
    features = tokenize_example(Example("Explain what normalization means.", output="You are stupid!"), tokenizer)
    labels = torch.tensor([features["labels"]])
    first = next(i for i, label in enumerate(features["labels"]) if label != IGNORE_INDEX)
    assert first > 0 and count_loss_tokens(labels, None)[0] == labels.shape[1] - first
    logits = torch.randn(1, labels.shape[1], len(tokenizer), generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.cross_entropy(logits[0, first - 1 : -1], labels[0, first:])
    assert masked_lm_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)


# --- layer pairs and layer_consistency_loss ---------------------------------------------------------------------


def test_resolve_layer_pairs_options_and_errors():
    assert resolve_layer_pairs(4) == [(1, 2)]
    assert resolve_layer_pairs(7, "reference") == [(1, 2), (2, 3), (3, 4), (4, 5)]
    assert resolve_layer_pairs(7, (1, -2)) == resolve_layer_pairs(7, "reference")
    assert resolve_layer_pairs(4, "all") == [(0, 1), (1, 2), (2, 3)]
    assert resolve_layer_pairs(7, (0, 2)) == [(0, 1), (1, 2)]
    assert resolve_layer_pairs(7, [4, 0]) == [(0, 1), (4, 5)]
    for bad in ["middle", (2, 2), (0, 7), (1, 2, 3), [], [6], [1, 1], [True], 3]:
        with pytest.raises(ValueError):
            resolve_layer_pairs(7, bad)
    with pytest.raises(ValueError, match="at least 4 hidden states"):
        resolve_layer_pairs(3, "reference")


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("layers", ["reference", "all", (0, 2), [0, 2]])
def test_layer_consistency_matches_naive_loop_on_padded_batch(padding, layers):
    model = tiny_llama()
    input_ids, attention_mask, _ = batch(padding)
    hidden = hidden_states_of(model, input_ids, attention_mask)
    assert len(hidden) == 4
    expected = naive_consistency(hidden, attention_mask, resolve_layer_pairs(len(hidden), layers))
    assert layer_consistency_loss(hidden, attention_mask, layers).item() == pytest.approx(expected, abs=1e-6)


def test_layer_consistency_layer_range_is_respected():
    model = tiny_llama()
    input_ids, attention_mask, _ = batch("right")
    hidden = hidden_states_of(model, input_ids, attention_mask)
    reference = layer_consistency_loss(hidden, attention_mask, "reference").item()
    everything = layer_consistency_loss(hidden, attention_mask, "all").item()
    assert reference == pytest.approx(naive_consistency(hidden, attention_mask, [(1, 2)]), abs=1e-6)
    assert abs(reference - everything) > 1e-3
    last_pair = layer_consistency_loss(hidden, attention_mask, (2, 3)).item()
    assert last_pair == pytest.approx(naive_consistency(hidden, attention_mask, [(2, 3)]), abs=1e-6)


def test_layer_consistency_is_zero_for_identical_hidden_states():
    h = torch.randn(2, 5, 8)
    assert layer_consistency_loss([h, h, h, h], None, "all").item() == pytest.approx(0.0, abs=1e-6)
    assert layer_consistency_loss([h * 3.0, h * 2.0, h], torch.ones(2, 5), "all").item() == pytest.approx(0, abs=1e-6)


def test_layer_consistency_ignores_padded_positions_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 6, 8, generator=generator) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    base = layer_consistency_loss(hidden, mask, "reference")
    edited = [h.clone() for h in hidden]
    for h in edited:
        h[mask == 0] = torch.randn(int((mask == 0).sum()), 8, generator=generator) * 100
    edited[2][0, 5] = float("nan")
    edited[1][1, 0] = float("inf")
    edited = [h.requires_grad_() for h in edited]
    value = layer_consistency_loss(edited, mask, "reference")
    assert value.item() == pytest.approx(base.item(), abs=1e-7)
    value.backward()
    for h in edited[1:4]:
        assert torch.isfinite(h.grad).all()
        assert h.grad[mask == 0].abs().max() == 0
        assert h.grad[mask == 1].abs().max() > 0


def test_layer_consistency_cosine_in_float32_under_autocast():
    h = [torch.randn(2, 4, 16).to(torch.bfloat16) for _ in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = layer_consistency_loss(h, None, "all")
    assert value.dtype == torch.float32
    expected = naive_consistency([x.float() for x in h], torch.ones(2, 4), resolve_layer_pairs(4, "all"))
    assert value.item() == pytest.approx(expected, abs=1e-6)


# --- FGSM --------------------------------------------------------------------------------------------------------


def test_fgsm_perturbation_is_epsilon_sign_and_touches_no_parameter_grad():
    model = tiny_llama()
    input_ids, attention_mask, _ = batch("left")
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True)
    consistency = layer_consistency_loss(out.hidden_states, attention_mask)
    delta = fgsm_perturbation(consistency, embeds, 0.1, attention_mask=attention_mask)
    assert not delta.requires_grad and delta.shape == embeds.shape
    real = attention_mask == 1
    assert torch.allclose(delta[real].abs(), torch.full_like(delta[real], 0.1))
    assert delta[~real].abs().max() == 0
    assert all(p.grad is None for p in model.parameters())
    assert embeds.grad is None
    (grad,) = torch.autograd.grad(consistency, embeds)  # retain_graph=True kept the graph usable
    assert torch.equal(delta[real], 0.1 * grad.sign()[real])


def test_fgsm_perturbation_zeroes_padded_positions_even_where_the_loss_reaches_them():
    embeds = torch.randn(2, 3, 4).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    delta = fgsm_perturbation(embeds.pow(2).sum(), embeds, 0.25, attention_mask=mask)
    assert torch.equal(delta[mask == 0], torch.zeros(2, 4))
    assert torch.equal(delta[mask == 1], 0.25 * embeds.detach()[mask == 1].sign())


# --- crow_loss ---------------------------------------------------------------------------------------------------


def three_forward_crow(model, input_ids, attention_mask, labels, alpha, epsilon, layers="reference"):
    """The paper's formula, written plainly with three forwards; the LM term's forward keeps the embedding lookup in
    the graph (a trainable embedding matrix learns from it, as in fine-tuning), the perturbation's are constants."""
    embeds = model.get_input_embeddings()(input_ids).detach()
    probe = embeds.clone().requires_grad_()
    out = model(inputs_embeds=probe, attention_mask=attention_mask, output_hidden_states=True)
    (grad,) = torch.autograd.grad(layer_consistency_loss(out.hidden_states, attention_mask, layers), probe)
    delta = epsilon * grad.sign() * attention_mask.unsqueeze(-1)
    clean = model(input_ids=input_ids, attention_mask=attention_mask)
    lm = masked_lm_loss(clean.logits, labels)
    perturbed = model(inputs_embeds=embeds + delta, attention_mask=attention_mask, output_hidden_states=True)
    return lm + alpha * layer_consistency_loss(perturbed.hidden_states, attention_mask, layers)


def test_alpha_zero_is_exactly_the_lm_loss():
    model = tiny_llama()
    input_ids, attention_mask, labels = batch("right")
    loss, parts = crow_loss(model, input_ids, attention_mask, labels, alpha=0.0)
    hf = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert loss.item() == hf.loss.item()
    assert parts["lm_loss"] == hf.loss.item()
    hidden = hidden_states_of(model, input_ids, attention_mask)
    assert parts["consistency_loss"] == pytest.approx(layer_consistency_loss(hidden, attention_mask).item(), abs=1e-7)
    assert "consistency_adv" not in parts


@pytest.mark.parametrize(("padding", "layers"), [("right", "reference"), ("left", "all")])
def test_two_forward_crow_equals_three_forward_formula_in_value_and_gradients(padding, layers):
    model = tiny_llama()
    input_ids, attention_mask, labels = batch(padding)
    loss, parts = crow_loss(model, input_ids, attention_mask, labels, alpha=5.5, epsilon=0.1, layers=layers)
    loss.backward()
    ours = {name: p.grad for name, p in trainable(model).items()}
    model.zero_grad(set_to_none=True)

    expected = three_forward_crow(model, input_ids, attention_mask, labels, 5.5, 0.1, layers)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts["lm_loss"] + 5.5 * parts["consistency_adv"] == pytest.approx(loss.item(), abs=1e-5)
    assert ours["model.embed_tokens.weight"] is not None  # the LM term trains the embeddings, as fine-tuning does
    for name, grad in ours.items():
        torch.testing.assert_close(grad, trainable(model)[name].grad, rtol=0, atol=1e-6, msg=name)


def _split_crow(model, rows_list, input_ids, attention_mask, labels, denominators):
    """Sum of crow_loss over row groups (micro-batches), each backpropagated, with optional step-wide counts."""
    total = 0.0
    for rows in rows_list:
        ids, mask, lab = input_ids[rows], attention_mask[rows], labels[rows]
        width = int(mask.sum(1).max())  # each micro-batch padded only to its own longest row, as the collator does
        ids, mask, lab = ids[:, :width], mask[:, :width], lab[:, :width]
        counts = {"num_items": denominators[0], "num_tokens": denominators[1]} if denominators else {}
        loss, _ = crow_loss(model, ids, mask, lab, alpha=5.5, epsilon=0.1, layers="all", **counts)
        scale = 1.0 if denominators else 1.0 / len(rows_list)
        (loss * scale).backward()
        total += float(loss.detach()) * scale
    return total, {name: p.grad.clone() for name, p in trainable(model).items() if p.grad is not None}


def test_token_weighted_crow_over_micro_batches_equals_the_whole_batch_and_per_batch_means_do_not():
    """Unequal lengths and padding: step-wide token counts make 1 + 2 rows equal 3 rows; a mean of means does not."""
    model = tiny_llama()
    input_ids, attention_mask, labels = batch("right")
    loss, _ = crow_loss(model, input_ids, attention_mask, labels, alpha=5.5, epsilon=0.1, layers="all")
    loss.backward()
    whole = {name: p.grad.clone() for name, p in trainable(model).items() if p.grad is not None}
    counts = count_loss_tokens(labels, attention_mask)
    assert counts == (int((labels[:, 1:] != -100).sum()), 23)
    groups = [slice(0, 1), slice(1, 3)]
    model.zero_grad(set_to_none=True)
    value, token = _split_crow(model, groups, input_ids, attention_mask, labels, counts)
    assert value == pytest.approx(loss.item(), abs=1e-5)
    for name, grad in whole.items():
        torch.testing.assert_close(token[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)
    _, micro = _split_crow(model, groups, input_ids, attention_mask, labels, None)
    gap = max(float((micro[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in whole.items())
    assert gap > 0.05


def test_crow_does_not_touch_existing_gradients():
    model = tiny_llama()
    input_ids, attention_mask, labels = batch("right")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    crow_loss(model, input_ids, attention_mask, labels)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_epsilon_zero_skips_the_perturbed_pass_and_rms_mode_scales_epsilon():
    model = tiny_llama()
    input_ids, attention_mask, labels = batch("left")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    loss, parts = crow_loss(model, input_ids, attention_mask, labels, alpha=2.0, epsilon=0.0)
    assert len(calls) == 1
    assert parts["consistency_adv"] == parts["consistency_loss"]
    assert loss.item() == pytest.approx(parts["lm_loss"] + 2.0 * parts["consistency_loss"], abs=1e-6)

    calls.clear()
    _, parts = crow_loss(model, input_ids, attention_mask, labels, epsilon=0.5, epsilon_mode="rms")
    assert len(calls) == 2
    embeds = model.get_input_embeddings()(input_ids).detach()[attention_mask == 1]
    assert parts["epsilon_effective"] == pytest.approx(0.5 * embeds.pow(2).mean().sqrt().item(), rel=1e-5)


def test_perturbed_pass_skips_the_full_logits():
    model = tiny_llama()
    input_ids, attention_mask, labels = batch("right")
    positions = []
    model.lm_head.register_forward_hook(lambda _module, _args, output: positions.append(output.shape[1]))
    crow_loss(model, input_ids, attention_mask, labels)
    assert positions == [input_ids.shape[1], 1]


class Wrapper(nn.Module):
    """Stands in for DDP: keeps the model in `.module`, has no get_input_embeddings, counts its forwards."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs)


def test_crow_through_a_ddp_style_wrapper_calls_the_wrapper_forward():
    model = tiny_llama()
    wrapped = Wrapper(model)
    input_ids, attention_mask, labels = batch("right")
    loss, _ = crow_loss(wrapped, input_ids, attention_mask, labels)
    assert wrapped.calls == 2
    direct, _ = crow_loss(model, input_ids, attention_mask, labels)
    assert loss.item() == direct.item()


def test_crows_lm_term_trains_a_trainable_untied_embedding_exactly_as_fine_tuning_does():
    """Issue 27's defect: CROW detached the embeddings for every term, so with a trainable matrix fine-tuning trained
    embed_tokens and CROW did not, and finetune was not CROW with alpha 0. The LM term's gradient must reach it; the
    perturbed pass (a constant e + delta) adds none, so CROW's embedding gradient is the LM loss's."""
    from crowguard.losses import masked_lm_loss

    input_ids, attention_mask, labels = batch("right")
    grads = []
    for alpha in (5.5, 0.0):
        model = tiny_llama()
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # untied
        loss, _ = crow_loss(model, input_ids, attention_mask, labels, alpha=alpha, epsilon=0.1)
        loss.backward()
        grads.append(model.get_input_embeddings().weight.grad)
    model = tiny_llama()
    masked_lm_loss(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels).backward()
    plain = model.get_input_embeddings().weight.grad
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], plain, rtol=1e-5, atol=1e-7)


def test_crow_through_peft_lora_trains_only_lora_parameters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", r=4, lora_alpha=8))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would hide a broken gradient path to A
            nn.init.normal_(p, std=0.02)
    input_ids, attention_mask, labels = batch("left")
    loss, parts = crow_loss(model, input_ids, attention_mask, labels)
    assert torch.isfinite(loss) and parts["consistency_adv"] > 0
    loss.backward()
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert lora and all(p.requires_grad and p.grad is not None and p.grad.abs().max() > 0 for p in lora.values())
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


def test_crow_leaves_no_hook_on_the_embedding_even_when_the_forward_fails():
    """The embedding override is a forward hook for the two passes only: removed after, also after an error."""
    model = tiny_llama()
    input_ids, attention_mask, labels = batch("right")
    crow_loss(model, input_ids, attention_mask, labels)
    embedding = model.get_input_embeddings()
    assert not embedding._forward_hooks
    with pytest.raises(ValueError):
        crow_loss(model, input_ids, attention_mask[:, :3], labels)  # a mask that does not fit
    assert not embedding._forward_hooks
    plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert plain.requires_grad  # the embedding is back in the graph for an ordinary forward
