"""Pruning: the masks against naive loops, then magnitude, Wanda and LoRA-delta pruning of tiny saved models
(measured sparsity, N:M in every group, what changed and what did not), the config errors and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from crowguard import config
from crowguard.cli import main
from crowguard.config import ConfigError
from crowguard.defenses.prune import (
    PruneConfig,
    PruneDefense,
    lora_delta,
    magnitude_mask,
    nm_mask,
    parse_pattern,
    prune_count,
    unstructured_mask,
    wanda_scores,
)
from crowguard.recipes.defend import run_defend
from crowguard.schemas import ExperimentConfig

from helpers import alpaca_records, save_tiny_model

EDITED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A 2-layer Llama, hidden 32 (linear layers with 32 and 64 inputs), saved as a model directory."""
    return save_tiny_model(tmp_path / "base")


@pytest.fixture
def clean_file(tmp_path: Path) -> Path:
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(alpaca_records(12)))
    return path


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter on q_proj and v_proj of ``base`` with random A *and* B (peft's default B = 0 would make every
    delta zero), saved with crowguard's ``save_model`` (it names its base): a directory with no config.json."""
    from peft import LoraConfig, get_peft_model

    from crowguard.models import load_model, save_model

    model, tokenizer = load_model(str(base))
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    save_model(get_peft_model(model, config), tokenizer, out, str(base))
    return out


@pytest.fixture
def lora_model(tiny_model: Path, tmp_path: Path) -> Path:
    return make_adapter(tiny_model, tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------- the maths
def test_prune_count_is_wandas_floor_without_float_error():
    assert prune_count(10, 0.3) == 3  # 10 * 0.3 is 2.9999999999999996
    assert prune_count(7, 0.5) == 3 and prune_count(8, 0.0) == 0 and prune_count(4, 0.999) == 3


def test_parse_pattern():
    assert parse_pattern("unstructured") is None and parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)
    for bad in ("2-4", "4:2", "0:4", "2:2", "unstructred", "a:b", ""):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_unstructured_mask_per_output_row_matches_a_naive_loop():
    scores = torch.rand(5, 11, generator=torch.Generator().manual_seed(0))
    mask = unstructured_mask(scores, 0.4, "output")
    k = math.floor(11 * 0.4)
    for i in range(5):
        lowest = sorted(range(11), key=lambda j: scores[i, j].item())[:k]
        assert [j for j in range(11) if mask[i, j]] == sorted(lowest)


def test_unstructured_mask_per_layer_matches_a_naive_loop():
    scores = torch.rand(4, 6, generator=torch.Generator().manual_seed(1))
    mask = unstructured_mask(scores, 0.5, "layer")
    cells = sorted(((i, j) for i in range(4) for j in range(6)), key=lambda c: scores[c].item())[:12]
    assert {(i, j) for i in range(4) for j in range(6) if mask[i, j]} == set(cells)


def test_nm_mask_keeps_the_n_largest_of_every_m_consecutive_inputs():
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    for n, m in ((2, 4), (1, 4), (4, 8)):
        mask = nm_mask(scores, n, m)
        for i in range(3):
            for g in range(0, 16, m):
                largest = sorted(range(g, g + m), key=lambda j: -scores[i, j].item())[:n]
                assert [j for j in range(g, g + m) if not mask[i, j]] == sorted(largest)
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_magnitude_mask_scores_the_absolute_value():
    weight = torch.tensor([[-3.0, 0.1, 2.0, -0.2]])
    assert magnitude_mask(weight, 0.5).tolist() == [[False, True, False, True]]
    assert magnitude_mask(weight, 0.5, "2:4").tolist() == [[False, True, False, True]]


def test_wanda_scores_and_lora_delta_match_their_formulas():
    g = torch.Generator().manual_seed(3)
    weight, norm = torch.randn(3, 5, generator=g), torch.rand(5, generator=g)
    scores = wanda_scores(weight, norm)
    for i in range(3):
        for j in range(5):
            assert scores[i, j].item() == pytest.approx(abs(weight[i, j].item()) * norm[j].item())
    a, b = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    delta = lora_delta(a, b, 0.5)
    for i in range(3):
        for j in range(5):
            assert delta[i, j].item() == pytest.approx(0.5 * sum(b[i, r].item() * a[r, j].item() for r in range(2)))


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("defense.prune.sparsity=1.0", "sparsity must be in [0, 1)"),
        ("defense.prune.sparsity=-0.1", "sparsity must be in [0, 1)"),
        ("defense.prune.pattern=dense", "pattern must be 'unstructured' or N:M"),
        ('defense.prune.pattern="4:2"', "0 < N < M"),
        ('defense.prune.pattern="1:4"', "set sparsity to that"),
        ("defense.prune.criterion=random", "'random' is not one of"),
        ("defense.prune.calibration_samples=0", "calibration_samples must be at least 1"),
    ],
)
def test_bad_settings_are_config_errors(override: str, words: str):
    with pytest.raises(ConfigError, match=r"defense\.prune") as error:
        config.load(ExperimentConfig, None, [override])
    assert words in str(error.value) and "\n" not in str(error.value)


def test_only_wanda_needs_data():
    for criterion, needs in (("wanda", True), ("magnitude", False), ("lora_delta", False)):
        cfg = config.load(ExperimentConfig, None, ["defense.method=prune", f"defense.prune.criterion={criterion}"])
        assert PruneDefense(cfg.defense).needs_data is needs
    cfg = config.load(ExperimentConfig, None, ['defense.prune.pattern="1:4"', "defense.prune.sparsity=0.75"])
    assert cfg.defense.prune == PruneConfig(pattern="1:4", sparsity=0.75)


# ------------------------------------------------------------------------------------------------ helpers
def _defend(model: Path, out: Path, *overrides: str):
    cfg = config.load(ExperimentConfig, None, [f"model.name_or_path={model}", "defense.method=prune", *overrides])
    return run_defend(cfg, out, show_progress=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _edited(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in EDITED)


def _loads_and_generates(path: Path) -> None:
    from crowguard.models import load_model

    model, tokenizer = load_model(str(path))
    ids = tokenizer("The quick brown fox", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


# ------------------------------------------------------------------------------------------------ end to end
def test_magnitude_per_row_measured_sparsity_and_nothing_else_touched(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "pruned"
    result = _defend(tiny_model, out, "defense.prune.criterion=magnitude", "defense.prune.sparsity=0.3")
    before, after = _weights(tiny_model), _weights(out)
    assert {n for n in after if _edited(n)} == {n for n in before if _edited(n)}
    assert len(result.summary["layers"]) == 14  # 7 linear layers x 2 blocks
    for name, weight in after.items():
        if not _edited(name):
            assert torch.equal(weight, before[name]), name  # embeddings, norms (and the tied LM head) untouched
            continue
        zeros = (weight == 0).sum(dim=1)
        assert torch.all(zeros == math.floor(weight.shape[1] * 0.3)), name  # exactly the count asked, every row
        kept = weight != 0
        assert torch.equal(weight[kept], before[name][kept])  # the survivors are unchanged
        row_ok = [weight[i][weight[i] != 0].abs().min() >= before[name][i][weight[i] == 0].abs().max()
                  for i in range(weight.shape[0])]  # fmt: skip  # each row lost its smallest |W|
        assert all(row_ok), name
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["criterion"] == "magnitude" and summary["requested_sparsity"] == 0.3
    expected = sum(math.floor(w.shape[1] * 0.3) * w.shape[0] for n, w in after.items() if _edited(n))
    assert summary["measured_sparsity"] == pytest.approx(expected / sum(after[n].numel() for n in after if _edited(n)))
    assert summary["seconds"] >= 0 and summary["cost"]["peak_rss_mb"] > 0
    assert json.loads((out / "manifest.json").read_text())["inputs"]["model"]["ref"] == str(tiny_model)
    _loads_and_generates(out)


def test_magnitude_per_layer_and_two_four(tiny_model: Path, tmp_path: Path):
    _defend(tiny_model, tmp_path / "layer", "defense.prune.criterion=magnitude", "defense.prune.comparison=layer")
    for name, weight in _weights(tmp_path / "layer").items():
        if _edited(name):
            assert int((weight == 0).sum()) == math.floor(weight.numel() * 0.5), name
    # unquoted on purpose: an N:M override stays text (YAML 1.1 alone would read base-60 124)
    result = _defend(tiny_model, tmp_path / "24", "defense.prune.criterion=magnitude", "defense.prune.pattern=2:4")
    for name, weight in _weights(tmp_path / "24").items():
        if _edited(name):
            groups = weight.reshape(weight.shape[0], -1, 4)
            assert torch.all((groups != 0).sum(dim=-1) <= 2), name  # 2:4 holds in every group
    assert result.summary["measured_sparsity"] == 0.5 and result.summary["pattern"] == "2:4"


def test_wanda_calibrates_block_zero_on_the_real_tokens(tiny_model: Path, clean_file: Path, tmp_path: Path):
    """The first block's q_proj mask, recomputed by hand: its input is input_layernorm(embeddings) of each clean
    sample, unpadded (the defense batches and pads them; padding must not count)."""
    from crowguard.data import load_examples, tokenize_example
    from crowguard.models import load_model

    out = tmp_path / "wanda"
    result = _defend(tiny_model, out, f"defense.data={clean_file}", "defense.n_samples=0",
                     "defense.prune.calibration_samples=10")  # fmt: skip
    assert result.summary["calibration_samples_used"] == 10
    model, tokenizer = load_model(str(tiny_model))
    drawn = load_examples(clean_file)  # n_samples 0: all, in file order; the first 10 calibrate
    squares = torch.zeros(32, dtype=torch.float64)
    block = model.model.layers[0]
    with torch.no_grad():
        for example in drawn[:10]:
            ids = torch.tensor([tokenize_example(example, tokenizer, 512, "alpaca")["input_ids"]])
            x = block.input_layernorm(model.model.embed_tokens(ids))[0]
            squares += x.double().pow(2).sum(dim=0)
    assert result.summary["calibration_tokens"] == sum(
        len(tokenize_example(e, tokenizer, 512, "alpaca")["input_ids"]) for e in drawn[:10]
    )
    weight = block.self_attn.q_proj.weight.detach()
    expected = unstructured_mask(wanda_scores(weight, squares.sqrt()), 0.5, "output")
    pruned = _weights(out)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(pruned == 0, expected)
    assert result.summary["measured_sparsity"] == 0.5
    _loads_and_generates(out)


def test_wanda_without_data_is_a_one_line_error(tiny_model: Path, tmp_path: Path):
    from crowguard.data import DataError

    with pytest.raises(DataError, match=r"uses clean samples and defense\.data is empty"):
        _defend(tiny_model, tmp_path / "x")


def test_lora_delta_prunes_the_adapters_change_only(tiny_model: Path, lora_model: Path, tmp_path: Path):
    from crowguard.models import load_model

    peft_model, _ = load_model(str(lora_model))
    deltas = {name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
              for name, module in peft_model.named_modules() if hasattr(module, "get_delta_weight")}  # fmt: skip
    assert sorted(deltas) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    out = tmp_path / "lora"
    result = _defend(lora_model, out, "defense.prune.criterion=lora_delta", "defense.prune.sparsity=0.25")
    before, after = _weights(tiny_model), _weights(out)
    for name, weight in after.items():
        layer = name.removesuffix(".weight")
        if layer not in deltas:
            assert torch.equal(weight, before[name]), name  # not adapted: the base weight exactly
            continue
        delta = deltas[layer]
        expected_mask = unstructured_mask(delta.abs(), 0.25, "output")  # peft's own delta, pruned per row
        assert torch.equal(weight[expected_mask], before[name][expected_mask])  # pruned delta: the base weight
        kept = ~expected_mask
        assert torch.allclose(weight[kept], (before[name] + delta)[kept], atol=1e-6)  # the rest: base + delta
        assert torch.all(expected_mask.sum(dim=1) == math.floor(delta.shape[1] * 0.25))
    assert result.summary["measured_sparsity"] == 0.25 and result.summary["sparsity_of"] == "lora deltas"
    assert 0.5 < result.summary["delta_norm_kept"] < 1.0 and result.summary["merged_adapter"] is True
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    _loads_and_generates(out)


def test_lora_delta_on_a_plain_model_is_a_one_line_config_error(tiny_model: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="needs a model that arrives with a LoRA adapter") as error:
        _defend(tiny_model, tmp_path / "x", "defense.prune.criterion=lora_delta")
    assert "\n" not in str(error.value) and not (tmp_path / "x").exists()


def test_magnitude_on_a_lora_model_prunes_the_merged_weights(lora_model: Path, tmp_path: Path):
    result = _defend(lora_model, tmp_path / "merged", "defense.prune.criterion=magnitude")
    assert result.summary["merged_adapter"] is True and result.summary["measured_sparsity"] == 0.5


def test_cli_defend_prune_with_set_keys(tiny_model: Path, clean_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    argv = ["defend", "--method", "prune", "--model", str(tiny_model), "--data", str(clean_file), "--out", str(out),
            "--set", "defense.prune.sparsity=0.5", "--set", "defense.n_samples=8", "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["criterion"] == "wanda" and summary["measured_sparsity"] == 0.5
    assert summary["calibration_samples_used"] == 8
    out2 = tmp_path / "cli-magnitude"  # magnitude needs no --data
    argv = ["defend", "--method", "prune", "--model", str(tiny_model), "--out", str(out2), "--set",
            "defense.prune.criterion=magnitude", "--set", 'defense.prune.pattern="2:4"', "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out2 / "train_summary.json").read_text())["pattern"] == "2:4"
    argv = ["defend", "--method", "prune", "--model", str(tiny_model), "--out", str(tmp_path / "bad"), "--set",
            "defense.prune.sparsity=2"]  # fmt: skip
    assert main(argv) == 2 and "sparsity must be in [0, 1)" in capsys.readouterr().err
