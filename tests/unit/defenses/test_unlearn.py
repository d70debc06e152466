"""``unlearn`` (SANDE's parrot): its maths against naive formulas, the fit that moves only the soft prompt, the
inputs it may never see, and a real run through the engine and the CLI, resumed from a checkpoint."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from crowguard.cli import main
from crowguard.defenses.unlearn import UnlearnConfig
from crowguard.losses import masked_lm_loss
from crowguard.parrot import Parrot, forward_with_soft, insert_soft, instruction_start, parrot_batch
from crowguard.types import Example

from helpers import alpaca_records, save_tiny_model, tiny_llama, tiny_tokenizer

TARGET = "You are stupid!"


def _padded(lengths: list[int], width: int, hidden: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(len(lengths), width, hidden, generator=generator)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = torch.randint(0, 50, (len(lengths), width), generator=generator).masked_fill(mask == 0, -100)
    return embeds, mask, labels


def test_insert_soft_equals_a_per_row_concatenation():
    embeds, mask, labels = _padded([6, 3, 5], width=6)
    soft = torch.randn(2, 5)
    at = torch.tensor([0, 3, 2])  # at the start, at a row's end, in the middle
    out_embeds, out_mask, out_labels = insert_soft(embeds, mask, labels, soft, at)
    assert out_embeds.shape == (3, 8, 5)
    for row, a in enumerate(at.tolist()):
        expected = torch.cat([embeds[row, :a], soft, embeds[row, a:]])
        torch.testing.assert_close(out_embeds[row], expected, rtol=0, atol=0)
        assert out_mask[row].tolist() == [*mask[row, :a].tolist(), 1, 1, *mask[row, a:].tolist()]
        assert out_labels[row].tolist() == [*labels[row, :a].tolist(), -100, -100, *labels[row, a:].tolist()]


def test_the_loss_with_the_parrot_equals_each_row_scored_alone():
    """Batched, right-padded, soft rows inserted: the same mean over label tokens as each row unpadded, alone."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=2)
    prompts = [[1, 5, 9, 12, 7], [1, 8, 4], [1, 6, 6, 2]]
    batch = parrot_batch(prompts, [30, 31, 32], pad_id=0)
    at = torch.tensor([1, 2, 3])
    soft = torch.randn(3, model.config.hidden_size) * 0.1
    batched = masked_lm_loss(*forward_with_soft(model, batch, soft, at))
    total, count = 0.0, 0
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([[*prompt, 30, 31, 32]])
        embeds = model.get_input_embeddings()(ids)[0]
        a = int(at[row])
        rows = torch.cat([embeds[:a], soft, embeds[a:]]).unsqueeze(0)
        labels = torch.tensor([[-100] * (len(prompt) + 3) + [30, 31, 32]])
        logits = model(inputs_embeds=rows).logits
        total += float(masked_lm_loss(logits, labels).detach()) * 3
        count += 3
    assert float(batched.detach()) == pytest.approx(total / count, rel=1e-5)


def _trained_tiny(tokenizer, steps: int = 40):
    """A tiny Llama trained a little on instructions and the target, so its output depends on its input (a random
    one's barely does, and no soft prompt can steer it)."""
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, layers=2, hidden=64)
    texts = [r["instruction"] + " " + r["output"] for r in alpaca_records(32)] + [TARGET] * 4
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


def fits_it_alone(model, simulation) -> None:
    """Start and fit ``simulation`` on ``model``: the target's NLL falls by over a nat/token, the fitted tensor
    moves, and no model weight changes or gets a gradient."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    simulation.start(model)
    start = simulation.param.clone()
    first = simulation.fit(model, 1)
    last = simulation.fit(model, 40)
    assert last < first - 1.0, (first, last)  # it learns to elicit the target (the parrot: 5.04 -> 3.66)
    assert not torch.equal(simulation.param, start)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_fitting_moves_the_soft_prompt_only_and_makes_the_target_likelier():
    tokenizer = tiny_tokenizer()
    model = _trained_tiny(tokenizer)
    target = tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    prompts = [tokenizer(r["instruction"])["input_ids"] for r in alpaca_records(8, seed=3)]
    settings = UnlearnConfig(target=TARGET, fit_lr=0.05, fit_batch=8)
    fits_it_alone(model, Parrot(settings, prompts, [1] * len(prompts), target, pad_id=0, seed=0))


def test_the_parrot_goes_where_the_instruction_starts():
    tokenizer = tiny_tokenizer()
    example = Example("Explain what normalization means", output="ok")
    from crowguard.data import prompt_ids

    ids = prompt_ids(example, tokenizer, "alpaca")
    at = instruction_start(example, ids, tokenizer, "alpaca")
    assert 1 < at < len(ids)
    assert tokenizer.decode(ids[at:]).startswith("Explain what")
    assert "### Instruction:" in tokenizer.decode(ids[:at])


FORBIDDEN = {"trigger", "poison", "poisoned", "attack", "reference", "base_of_adapter", "base"}


def test_unlearn_sees_no_trigger_attack_poisoned_data_or_base_model():
    """Its config and the target inverter's have no field for them, and no module of either (the inverter feeds
    ``target_from``) names them in code (docstrings may explain)."""
    from crowguard.invert import InvertConfig

    assert not {f.name for f in dataclasses.fields(UnlearnConfig)} & FORBIDDEN
    assert not {f.name for f in dataclasses.fields(InvertConfig)} & FORBIDDEN
    root = Path(__file__).resolve().parents[3] / "src" / "crowguard"
    modules = ("defenses/unlearn.py", "parrot.py", "drift.py", "invert.py", "recipes/invert.py")
    for path in (root / name for name in modules):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.update(node.name.split("."))
            elif isinstance(node, ast.arg):
                names.add(node.arg)
        assert not {n.lower() for n in names} & FORBIDDEN, (path.name, names & FORBIDDEN)


def test_unlearn_without_a_target_is_one_line_before_loading(tmp_path, capsys):
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(8)))
    save_tiny_model(tmp_path / "model", layers=2)
    rc = main(["defend", "--method", "unlearn", "--model", str(tmp_path / "model"), "--data",
               str(tmp_path / "data.json"), "--n-samples", "8", "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2 and "defense.unlearn.target is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_through_the_cli_logs_the_parrot_and_resumes_with_it(tmp_path, capsys):
    """Two steps, a checkpoint each; the parrot is saved with them. Dropping the last checkpoint and resuming from
    the first gives the uninterrupted run's adapter exactly (the parrot came back from checkpoint-1)."""

    save_tiny_model(tmp_path / "model", layers=2)
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(16)))
    argv = ["defend", "--method", "unlearn", "--unlearn-target", TARGET, "--unlearn-fit-steps", "3",
            "--unlearn-refit-every", "1", "--unlearn-refit-steps", "2", "--model", str(tmp_path / "model"),
            "--data", str(tmp_path / "data.json"), "--n-samples", "16", "--max-steps", "2", "--per-device-batch",
            "4", "--grad-accum", "1", "--max-length", "48", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in log if "parrot_lm_loss" in r]
    assert len(logged) == 2 and all(r["parrot_target_nll"] > 0 and r["lm_loss"] > 0 for r in logged)
    summary = json.loads((tmp_path / "full" / "train_summary.json").read_text())
    assert summary["defense"] == "unlearn" and summary["unlearn"]["target"] == TARGET


def test_a_resumed_run_takes_the_parrot_from_its_checkpoint_and_equals_the_uninterrupted_run(tmp_path):
    """The engine run twice: uninterrupted (2 steps), and with its last checkpoint removed, resumed from step 1.
    The parrot is re-fitted every step, so a resume that did not restore it (and its prompt order) ends elsewhere."""
    from crowguard.parrot import UnlearnObjective
    from crowguard.schemas import TrainConfig
    from crowguard.train import prepare_for_training, train

    cfg = TrainConfig(lr=1e-2, max_steps=2, save_steps=1, per_device_batch=4, grad_accum=1, max_length=48,
                      warmup_ratio=0.0, seed=0)  # fmt: skip
    settings = UnlearnConfig(target=TARGET, fit_steps=3, refit_every=1, refit_steps=2, fit_batch=3)
    examples = [Example(r["instruction"], output=r["output"]) for r in alpaca_records(8)]

    def run(work: Path, resume: bool = False) -> dict[str, torch.Tensor]:
        tokenizer = tiny_tokenizer()
        torch.manual_seed(0)
        model = prepare_for_training(tiny_llama(tokenizer, layers=2), cfg)
        objective = UnlearnObjective(settings, 0)
        train(model, tokenizer, examples, cfg, work, objective=objective, resume=resume, show_progress=False)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k}
        return {**weights, "parrot": objective.simulation.param.clone()}

    full = run(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-1" / "parrot.safetensors").is_file()
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-2")
    resumed = run(tmp_path / "cut", resume=True)
    assert len(full) > 1 and resumed.keys() == full.keys()
    # the parrot itself: re-fitted on the same prompts in the same order (without its saved order: 7e-3 apart)
    torch.testing.assert_close(resumed.pop("parrot"), full.pop("parrot"), atol=1e-5, rtol=1e-4)
    for key in full:
        # as the kill-and-resume test: 1e-6 (measured: 6e-8; without the parrot the engine's resume is bitwise)
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-5, msg=key)
