"""PGD in CROW's loss (``crow.steps > 1``; Madry et al. 2018, not the paper's method): the projected step, the
two-forward loss against a naive loop, and one step being exactly the paper's FGSM."""

from __future__ import annotations

import pytest
import torch

from crowguard.losses import crow_loss, layer_consistency_loss, masked_lm_loss, pgd_step
from unit.test_losses import batch, one_thread, three_forward_crow, tiny_llama, trainable  # noqa: F401 (fixture)

# --- PGD (crow.steps > 1; not the paper's method) -----------------------------------------------------------------


def test_pgd_step_is_a_clipped_signed_step_that_leaves_padding_alone():
    torch.manual_seed(0)
    delta = torch.empty(2, 3, 4).uniform_(-0.1, 0.1)
    grad = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = pgd_step(delta, grad, 0.08, 0.1, mask)
    for b, t, d in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        value = delta[b, t, d].item() + 0.08 * (1.0 if grad[b, t, d] > 0 else -1.0)
        expected = 0.0 if mask[b, t] == 0 else min(0.1, max(-0.1, value))
        assert out[b, t, d].item() == pytest.approx(expected, abs=1e-7)
    radius = torch.tensor(0.05)  # rms mode passes a 0-d tensor
    assert pgd_step(delta, grad, 0.5, radius, None).abs().max().item() == pytest.approx(0.05)


def naive_pgd_crow(model, input_ids, attention_mask, labels, alpha, epsilon, steps, layers="reference"):
    """CROW with a PGD perturbation, written plainly: every step a fresh forward on inputs_embeds."""
    embeds = model.get_input_embeddings()(input_ids).detach()
    real = attention_mask.unsqueeze(-1).float()
    delta = torch.zeros_like(embeds)
    for _ in range(steps):
        probe = (embeds + delta).requires_grad_()
        out = model(inputs_embeds=probe, attention_mask=attention_mask, output_hidden_states=True)
        (grad,) = torch.autograd.grad(layer_consistency_loss(out.hidden_states, attention_mask, layers), probe)
        delta = ((delta + 2.5 * epsilon / steps * grad.sign()).clamp(-epsilon, epsilon) * real).detach()
    clean = model(input_ids=input_ids, attention_mask=attention_mask)
    perturbed = model(inputs_embeds=embeds + delta, attention_mask=attention_mask, output_hidden_states=True)
    adversarial = layer_consistency_loss(perturbed.hidden_states, attention_mask, layers)
    return masked_lm_loss(clean.logits, labels) + alpha * adversarial, adversarial


@pytest.mark.parametrize("padding", ["right", "left"])
def test_pgd_crow_equals_the_naive_loop_in_value_and_gradients(padding):
    model = tiny_llama()
    input_ids, attention_mask, labels = batch(padding)
    loss, parts = crow_loss(model, input_ids, attention_mask, labels, alpha=5.5, epsilon=0.1, steps=3)
    loss.backward()
    ours = {name: p.grad for name, p in trainable(model).items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected, adversarial = naive_pgd_crow(model, input_ids, attention_mask, labels, 5.5, 0.1, 3)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts["consistency_adv"] == pytest.approx(adversarial.item(), abs=1e-7)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, trainable(model)[name].grad, rtol=0, atol=1e-6, msg=name)


def test_pgd_with_one_step_is_the_papers_fgsm_and_more_steps_find_a_more_inconsistent_point():
    model = tiny_llama()
    input_ids, attention_mask, labels = batch("right")
    one, again = (crow_loss(model, input_ids, attention_mask, labels, steps=1)[1] for _ in range(2))
    assert one == again
    expected = three_forward_crow(model, input_ids, attention_mask, labels, 5.5, 0.1)
    assert one["lm_loss"] + 5.5 * one["consistency_adv"] == pytest.approx(expected.item(), abs=1e-5)
    # At epsilon 0.1 (5x this random model's embedding scale) one signed step is no ascent: it lowers the
    # consistency loss below the clean one, while ten projected steps climb well above it.
    ten = crow_loss(model, input_ids, attention_mask, labels, steps=10)[1]
    assert one["consistency_adv"] < one["consistency_loss"] < ten["consistency_adv"]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        crow_loss(model, input_ids, attention_mask, labels, steps=0)


def test_the_crow_config_refuses_zero_steps_and_passes_steps_to_the_loss():
    from crowguard import config
    from crowguard.schemas import ExperimentConfig

    cfg = config.load(ExperimentConfig, None, ["defense.method=crow", "defense.crow.steps=3"])
    assert cfg.defense.section("crow").steps == 3
    assert config.load(ExperimentConfig, None, []).defense.section("crow").steps == 1  # the paper's FGSM
    with pytest.raises(config.ConfigError, match=r"defense\.crow.*steps must be >= 1"):
        config.load(ExperimentConfig, None, ["defense.crow.steps=0"])
