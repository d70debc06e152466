"""``unlearn``'s BEEAR mechanism (``mechanism: residual``, :mod:`crowguard.drift`): the drift against naive formulas,
the unlikelihood against a per-token loop, the fit that moves only the vector, and a run through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crowguard.cli import main
from crowguard.defenses.unlearn import UnlearnConfig
from crowguard.drift import (
    Drift,
    decoder_block,
    drifted,
    forward_with_drift,
    prompt_positions,
    target_rows,
    unlikelihood_loss,
)
from crowguard.parrot import parrot_batch
from unit.defenses.test_unlearn import TARGET, _trained_tiny, fits_it_alone

from helpers import alpaca_records, save_tiny_model, tiny_llama, tiny_tokenizer


def _batch():
    """Two right-padded rows: prompt [1, 5, 9] + answer [20, 21], and prompt [1, 8] + answer [22]."""
    ids = torch.tensor([[1, 5, 9, 20, 21], [1, 8, 22, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 20, 21], [-100, -100, 22, -100, -100]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_prompt_positions_are_the_real_tokens_before_the_first_label():
    batch = _batch()
    where = prompt_positions(batch["labels"], batch["attention_mask"])
    assert where.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    no_labels = prompt_positions(torch.full((1, 3), -100), torch.tensor([[1, 1, 0]]))
    assert no_labels.tolist() == [[True, True, False]]


def test_a_drift_at_layer_0_equals_adding_it_to_the_input_embeddings_over_the_prompt():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=3).eval()
    batch = _batch()
    delta = torch.randn(model.config.hidden_size) * 0.5
    logits, labels = forward_with_drift(model, batch, delta, decoder_block(model, 0))
    where = prompt_positions(batch["labels"], batch["attention_mask"]).unsqueeze(-1).float()
    embeds = model.get_input_embeddings()(batch["input_ids"]) + where * delta
    naive = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, naive, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, batch["labels"])


def test_a_drift_deeper_moves_that_layers_input_by_the_vector_over_the_prompt_only():
    """At layer 2 of 3 the layer receives its unperturbed input plus delta at the prompt positions, nothing else."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=3).eval()
    batch, block = _batch(), model.model.layers[2]

    def capture(into: list):
        def hook(module, args, kwargs):
            into.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        return hook

    plain, moved = [], []
    handle = block.register_forward_pre_hook(capture(plain), with_kwargs=True)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    delta = torch.randn(model.config.hidden_size)
    where = prompt_positions(batch["labels"], batch["attention_mask"])
    with drifted(decoder_block(model, 2), delta, where):
        handle = block.register_forward_pre_hook(capture(moved), with_kwargs=True)  # runs after the drift's hook
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
    torch.testing.assert_close(moved[0], plain[0] + where.unsqueeze(-1).float() * delta, rtol=0, atol=1e-6)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # the hook is gone afterwards
    assert not block._forward_pre_hooks
    with pytest.raises(ValueError, match="decoder layers 0-2"):
        decoder_block(model, 3)


def test_unlikelihood_equals_a_per_token_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator) * 3
    labels = torch.tensor([[-100, -100, 4, 7, 1], [-100, 2, 9, -100, -100]])
    total, count = 0.0, 0
    for row in range(2):
        for t in range(1, 5):
            if labels[row, t] == -100:
                continue
            p = torch.softmax(logits[row, t - 1].double(), -1)[labels[row, t]].item()
            total += -math.log(1 - p)
            count += 1
    assert unlikelihood_loss(logits, labels).item() == pytest.approx(total / count, rel=1e-5)
    sure = torch.full((1, 2, 3), -50.0)
    sure[0, 0, 1] = 50.0  # p(label) rounds to 1: finite, large
    assert math.isfinite(unlikelihood_loss(sure, torch.tensor([[-100, 1]])).item())


def test_target_rows_are_each_rows_prompt_followed_by_the_target():
    rows = target_rows(_batch(), [30, 31], pad_id=0)
    expected = parrot_batch([[1, 5, 9], [1, 8]], [30, 31], pad_id=0)
    for key in expected:
        assert torch.equal(rows[key], expected[key]), key


def test_fitting_moves_the_vector_only_and_makes_the_target_likelier():
    tokenizer = tiny_tokenizer()
    model = _trained_tiny(tokenizer)
    target = tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    prompts = [tokenizer(r["instruction"])["input_ids"] for r in alpaca_records(8, seed=3)]
    settings = UnlearnConfig(target=TARGET, mechanism="residual", layer=1, fit_lr=0.05, fit_batch=8)
    drift = Drift(settings, prompts, [1] * len(prompts), target, pad_id=0, seed=0)
    drift.start(model)
    assert torch.equal(drift.param, torch.zeros(model.config.hidden_size))  # it starts at zero
    fits_it_alone(model, drift)


def test_a_run_through_the_cli_logs_the_drift_and_the_pushed_down_target(tmp_path, capsys):
    save_tiny_model(tmp_path / "model", layers=2)
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(16)))
    argv = ["defend", "--config", "defenses/unlearn-beear", "--unlearn-target", TARGET, "--unlearn-fit-steps", "3",
            "--unlearn-refit-every", "1", "--unlearn-refit-steps", "2", "--model", str(tmp_path / "model"),
            "--data", str(tmp_path / "data.json"), "--n-samples", "16", "--max-steps", "2", "--per-device-batch",
            "4", "--grad-accum", "1", "--max-length", "48", "--quiet", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in log if "residual_lm_loss" in r]
    assert len(logged) == 2 and all(r["residual_target_unlikelihood"] > 0 for r in logged)
    assert all(r["residual_target_nll"] > 0 for r in logged)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["unlearn"]["mechanism"] == "residual" and summary["unlearn"]["unlikelihood"] == 1.0
    card = (tmp_path / "out" / "README.md").read_text()  # the model card says what was unlearned and whence
    assert f"| target unlearned | {TARGET} |" in card and "| given |" in card


@pytest.mark.parametrize("mechanism", ["parrot", "residual"])
def test_the_fused_forward_gives_the_separate_forwards_loss_and_gradients(mechanism):
    """``fused``: the clean, simulated and target rows stacked in one forward give each part's loss and the weights'
    gradients of three separate forwards (float rounding apart), on a right-padded batch of unequal rows."""
    from transformers import DataCollatorForSeq2Seq

    from crowguard.data import tokenize_examples
    from crowguard.parrot import UnlearnObjective

    from helpers import grad_dict, unequal_examples

    tokenizer = tiny_tokenizer()
    examples = unequal_examples(4)
    features = tokenize_examples(examples, tokenizer, 1024, "alpaca")
    results = []
    for fused in (False, True):
        model = _trained_tiny(tokenizer)
        settings = UnlearnConfig(target=TARGET, mechanism=mechanism, unlikelihood=0.5, layer=1, fused=fused)
        objective = UnlearnObjective(settings, seed=0)
        prepared = objective.prepare(features, examples, tokenizer, "alpaca")
        inputs = objective.collate(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))(prepared)
        objective.simulation.start(model)
        shift = torch.randn(objective.simulation.param.shape, generator=torch.Generator().manual_seed(1))
        objective.simulation.param = objective.simulation.param + 20 * shift  # a simulation that moves the outputs
        loss, parts = objective.compute(model, inputs, num_items=None)
        loss.backward()
        results.append((float(loss.detach()), parts, grad_dict(model)))
    (loss0, parts0, grads0), (loss1, parts1, grads1) = results
    assert inputs["input_ids"].shape[0] == 4 and len(set(map(len, (f["input_ids"] for f in features)))) > 1
    assert parts0[f"{mechanism}_lm_loss"] != pytest.approx(parts0["lm_loss"], rel=1e-3)  # it acts: 100x the tolerance
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for key in parts0:
        assert parts1[key] == pytest.approx(parts0[key], rel=1e-5), key
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)
