"""The training engine on tiny random models: LoRA/full behaviour, adapter modes, resume, gradient accumulation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from crowguard.defenses.crow import CrowConfig
from crowguard.models import ModelLoadError, load_model, save_model
from crowguard.resume import ResumeError
from crowguard.schemas import ModelConfig, TrainConfig
from crowguard.stage import run_training_stage, work_dir_for
from crowguard.train import prepare_for_training, train
from crowguard.types import Example, StageContext

from helpers import alpaca_records, save_tiny_model, tiny_llama, tiny_tokenizer, unequal_examples

CROW = CrowConfig(alpha=5.5, epsilon=0.1, layers="all")


def _examples(n: int = 8) -> list[Example]:
    return [Example(r["instruction"], r["input"], r["output"]) for r in alpaca_records(n)]


def _equal_length_examples(tokenizer, n: int = 4) -> list[Example]:
    """Examples whose tokenised lengths are all equal (so per-micro-batch means average exactly)."""
    out, lengths = [], set()
    for r in alpaca_records(200):
        example = Example(r["instruction"], output=r["output"])
        length = len(tokenizer(r["instruction"])["input_ids"]), len(tokenizer(r["output"])["input_ids"])
        if not out or length in lengths:
            lengths.add(length)
            out.append(example)
        if len(out) == n:
            return out
    raise AssertionError("could not find equal-length examples")


def _cfg(**kw) -> TrainConfig:
    base = {"lr": 1e-2, "epochs": 1, "per_device_batch": 2, "grad_accum": 1, "warmup_ratio": 0.0,
            "scheduler": "constant", "max_length": 96, "seed": 0}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_changes_adapter_not_base(tmp_path: Path):
    tokenizer = tiny_tokenizer()
    model = prepare_for_training(tiny_llama(tokenizer, layers=3), _cfg())
    before = _state(model)
    result = train(model, tokenizer, _examples(8), _cfg(max_steps=3), tmp_path / "w", crow=CROW, show_progress=False)
    after = _state(result.model)
    assert result.steps == 3
    lora_b = [k for k in before if "lora_B" in k]
    base = [k for k in before if "lora_" not in k]
    assert lora_b and base
    assert any(not torch.equal(before[k], after[k]) for k in lora_b)
    assert all(torch.equal(before[k], after[k]) for k in base)
    log = [json.loads(line) for line in (tmp_path / "w/metrics.jsonl").read_text().splitlines()]
    logged = [r for r in log if "loss" in r]
    assert logged and all({"lm_loss", "consistency_loss", "consistency_adv"} <= set(r) for r in logged)
    elapsed = [r["elapsed_s"] for r in logged]  # wall time since training began, for step costs
    assert elapsed[0] > 0 and all(a < b for a, b in itertools.pairwise(elapsed))


def test_full_finetuning_changes_every_weight(tmp_path: Path):
    """Plain SFT gives every weight a gradient (embeddings tied to the head, every layer, every norm)."""
    tokenizer = tiny_tokenizer()
    model = prepare_for_training(tiny_llama(tokenizer, layers=3), _cfg(finetune="full"))
    before = _state(model)
    result = train(model, tokenizer, _examples(8), _cfg(finetune="full", max_steps=2), tmp_path, show_progress=False)
    after = _state(result.model)
    unchanged = [k for k in before if torch.equal(before[k], after[k]) and "rotary" not in k]
    assert not unchanged


def test_lora_init_follows_the_seed_whatever_the_global_rng(tmp_path: Path):
    """Before: get_peft_model drew lora_A from the global RNG, so what ran earlier in the process decided it."""
    tokenizer = tiny_tokenizer()

    def lora_a(seed: int, disturb: int) -> dict[str, torch.Tensor]:
        base = tiny_llama(tokenizer, layers=3)
        torch.manual_seed(disturb)
        torch.rand(1000)  # whatever ran before: another defense, a data draw
        model = prepare_for_training(base, _cfg(seed=seed))
        return {k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k}

    first, disturbed, other = lora_a(0, 1), lora_a(0, 2), lora_a(1, 1)
    assert first and all(torch.equal(first[k], disturbed[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("mode", ["new", "continue"])
def test_every_lora_module_trains_and_the_saved_adapter_reproduces_the_model(tmp_path: Path, backdoored, mode):
    """Every LoRA-targeted module's weights move, and the adapter as saved gives the in-memory model's logits."""
    from crowguard.models import save_model

    base, adapter = backdoored
    model, tokenizer = load_model(str(adapter if mode == "continue" else base), trainable_adapter=mode == "continue")
    cfg = _cfg(max_steps=3, adapter_mode="continue")
    model = prepare_for_training(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    train(model, tokenizer, _examples(8), cfg, tmp_path / "w", crow=CROW, show_progress=False)
    after = model.state_dict()
    modules = {k.rsplit(".lora_", 1)[0] for k in before}
    assert len(modules) >= 3 * 7  # every linear of every layer (q, k, v, o, gate, up, down)
    moved = {k.rsplit(".lora_", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == modules
    model.eval()
    expected = _logits(model, tokenizer)
    save_model(model, tokenizer, tmp_path / "saved", str(base))
    reloaded, _ = load_model(str(tmp_path / "saved"))
    torch.testing.assert_close(_logits(reloaded, tokenizer), expected, atol=1e-5, rtol=1e-5)


def _one_step_weights(tmp: Path, batch: int, accum: int, optim: str):
    tokenizer = tiny_tokenizer()
    examples = _equal_length_examples(tokenizer, 4)
    cfg = _cfg(per_device_batch=batch, grad_accum=accum, max_steps=2, optim=optim, lr=0.05, finetune="full")
    model = prepare_for_training(tiny_llama(tokenizer, layers=3), cfg)
    train(model, tokenizer, examples * 2, cfg, tmp, crow=CROW, show_progress=False)
    return _state(model)


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_gradient_accumulation_equivalence(tmp_path: Path, optim: str):
    """Batch 4 x accumulation 1 equals batch 2 x accumulation 2 (catches zero_grad inside the loss)."""
    a = _one_step_weights(tmp_path / "a", 4, 1, optim)
    b = _one_step_weights(tmp_path / "b", 2, 2, optim)
    init = tiny_llama(tiny_tokenizer(), layers=3).state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in a)  # training did something
    # Adam's first steps move each weight by about lr * sign(g): where a gradient is near 0, float-summation noise
    # between the two splits shows up (measured: up to 2e-4 on a handful of elements). A real accumulation bug
    # moves weights by ~lr = 0.05; SGD, which is sensitive to the loss scale (Adam is not), is checked to 1e-5.
    atol = 1e-5 if optim == "sgd" else 1e-3
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def _update(tmp: Path, batch: int, accum: int, loss_average: str, crow: CrowConfig | None, unequal: int = 4,
            **kw) -> dict[str, torch.Tensor]:  # fmt: skip
    """One SGD step (no clipping, so a loss-scale error shows) of full fine-tuning on ``unequal`` examples of
    different lengths."""
    tokenizer = tiny_tokenizer()
    cfg = _cfg(per_device_batch=batch, grad_accum=accum, max_steps=1, optim="sgd", lr=0.05, finetune="full",
               max_grad_norm=0.0, loss_average=loss_average, **kw)  # fmt: skip
    model = prepare_for_training(tiny_llama(tokenizer, layers=3), cfg)
    init = _state(model)
    train(model, tokenizer, unequal_examples(unequal), cfg, tmp, crow=crow, show_progress=False)
    return {k: v - init[k] for k, v in _state(model).items()}


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b if b[k].any())


@pytest.mark.parametrize("crow", [CROW, None], ids=["crow", "sft"])
def test_token_average_makes_accumulation_split_invisible_with_unequal_lengths(tmp_path: Path, crow):
    """Batch 4 vs 2 x 2 (and 1 x 4) on unequal lengths: the token average gives one update; the per-micro-batch
    mean (the reference code's) does not, and says by how much."""
    whole = _update(tmp_path / "w", 4, 1, "token", crow)
    assert any(v.abs().max() > 1e-4 for v in whole.values())
    for batch, accum in ((2, 2), (1, 4)):
        split = _update(tmp_path / f"t{batch}", batch, accum, "token", crow)
        assert _relative_gap(split, whole) < 1e-3, (batch, accum)  # measured: 9e-6 (CROW), 8e-5 (SFT)
    micro = _update(tmp_path / "m", 1, 4, "micro_batch", crow)
    assert _relative_gap(micro, whole) > 0.03  # measured: 0.09 (CROW), 0.09 (SFT)


def test_trainer_does_its_own_accumulation_scaling_on_every_transformers_version(tmp_path: Path):
    """Pins what makes the scaling version-independent: the Trainer neither counts tokens nor skips dividing by
    the accumulation steps (before 5.19 it skipped when model_accepts_loss_kwargs and a count existed)."""
    from crowguard.train import CrowTrainer, training_arguments

    tokenizer = tiny_tokenizer()
    trainer = CrowTrainer(model=tiny_llama(tokenizer), args=training_arguments(_cfg(), tmp_path))
    assert trainer.model_accepts_loss_kwargs is False
    assert trainer.loss_is_scaled_for_ga is False
    assert trainer.compute_loss_func is None


def test_resume_matches_uninterrupted_run(tmp_path: Path):
    tokenizer = tiny_tokenizer()
    examples = _examples(16)
    cfg = _cfg(max_steps=6, save_steps=3, lr=5e-3)  # AdamW + cosine-free constant schedule
    full = prepare_for_training(tiny_llama(tokenizer, layers=3), cfg)
    train(full, tokenizer, examples, cfg, tmp_path / "full", crow=CROW, show_progress=False)

    half_cfg = _cfg(max_steps=6, save_steps=3, lr=5e-3)
    interrupted = prepare_for_training(tiny_llama(tokenizer, layers=3), half_cfg)

    class Stop(Exception):
        pass

    from transformers import TrainerCallback

    class CrashAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Stop

    import crowguard.train as engine

    original = engine.MetricsFileCallback
    try:
        engine.MetricsFileCallback = lambda path: _Both(original(path), CrashAfterCheckpoint())  # type: ignore
        with pytest.raises(Stop):
            train(interrupted, tokenizer, examples, half_cfg, tmp_path / "half", crow=CROW, show_progress=False)
    finally:
        engine.MetricsFileCallback = original
    assert (tmp_path / "half/checkpoint-3").is_dir()
    # The same base (a resumed run reloads it from disk), but scrambled adapter weights: only the checkpoint
    # can bring them back.
    resumed = prepare_for_training(tiny_llama(tokenizer, layers=3), half_cfg)
    with torch.no_grad():
        for name, param in resumed.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param))
    result = train(resumed, tokenizer, examples, half_cfg, tmp_path / "half", crow=CROW, resume=True,
                   show_progress=False)  # fmt: skip
    assert result.steps == 6
    a, b = _state(full), _state(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)


class _Both:
    """Forward every callback event to two callbacks (the metrics file and a crash injector)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __getattr__(self, name):
        def call(*args, **kwargs):
            getattr(self.first, name)(*args, **kwargs)
            return getattr(self.second, name)(*args, **kwargs)

        return call


def test_resume_without_checkpoint_is_an_error(tmp_path: Path):
    tokenizer = tiny_tokenizer()
    model = prepare_for_training(tiny_llama(tokenizer, layers=3), _cfg())
    with pytest.raises(ResumeError, match="no checkpoint"):
        train(model, tokenizer, _examples(4), _cfg(max_steps=1), tmp_path / "w", resume=True, show_progress=False)
    assert not (tmp_path / "w").exists()  # nothing left behind


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base model directory and a LoRA adapter trained on it (the 'backdoored' input)."""
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_model(root / "base", layers=3)
    run_training_stage("backdoor", ModelConfig(name_or_path=str(base)), _cfg(max_steps=2), _examples(8),
                       StageContext(root / "adapter", show_progress=False))  # fmt: skip
    return base, root / "adapter"


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Explain the database in a short sentence", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("mode", ["continue", "merge", "full"])
def test_adapter_modes_save_and_reload(tmp_path: Path, backdoored, mode: str):
    base, adapter = backdoored
    cfg = _cfg(max_steps=2, adapter_mode=mode)
    summary = run_training_stage("defend", ModelConfig(name_or_path=str(adapter)), cfg, _examples(8),
                                 StageContext(tmp_path / "out", show_progress=False), crow=CROW)  # fmt: skip
    assert summary["artefact"] == ("model" if mode == "full" else "adapter")
    for name in ("manifest.json", "train_summary.json", "metrics.jsonl"):
        assert (tmp_path / "out" / name).exists(), name
    assert not list((tmp_path / "out").glob("*.bin")) and list((tmp_path / "out").glob("*.safetensors"))
    assert not work_dir_for(tmp_path / "out").exists()
    reloaded, tokenizer = load_model(str(tmp_path / "out"))
    start, _ = load_model(str(adapter))
    assert not torch.allclose(_logits(reloaded, tokenizer), _logits(start, tokenizer))
    if mode == "continue":  # the same adapter trained further: it names the original base
        config = json.loads((tmp_path / "out/adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]) == base.resolve()


@pytest.mark.parametrize("mode", ["continue", "merge", "full"])
def test_gradient_checkpointing_is_on_in_every_adapter_mode(backdoored, mode: str):
    """``continue`` returned before enabling it; now every mode honours ``gradient_checkpointing``."""
    _, adapter = backdoored
    model, _ = load_model(str(adapter))
    prepared = prepare_for_training(model, _cfg(adapter_mode=mode, gradient_checkpointing=True))
    inner = prepared.get_base_model() if hasattr(prepared, "get_base_model") else prepared
    assert inner.is_gradient_checkpointing
    assert not inner.config.use_cache


@pytest.mark.parametrize("mode", ["continue", "merge", "full"])
def test_bf16_autocast_and_checkpointing_train_crow_in_every_adapter_mode(tmp_path: Path, backdoored, mode: str):
    """bf16 autocast (these CPUs have AVX512-bf16; on GPUs the same flag) with gradient checkpointing, through the
    Trainer, on every way of treating an attached adapter: finite losses, weights in float32, the stage written."""
    _, adapter = backdoored
    cfg = _cfg(max_steps=2, adapter_mode=mode, precision="bf16", gradient_checkpointing=True)
    summary = run_training_stage("defend", ModelConfig(name_or_path=str(adapter)), cfg, _examples(8),
                                 StageContext(tmp_path / "out", show_progress=False), crow=CROW)  # fmt: skip
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    log = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert all(r["consistency_adv"] > 0 for r in log if "consistency_adv" in r)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["precision"] == "bf16" and manifest["dtype"] == "torch.float32"


def test_adapter_that_does_not_fit_is_a_clear_error(tmp_path: Path, backdoored):
    _, adapter = backdoored
    other = save_tiny_model(tmp_path / "other", layers=3, hidden=64)
    with pytest.raises(ModelLoadError, match="does not fit the base model"):
        load_model(str(other), adapter=str(adapter))


def test_pickled_weights_refused_by_default(tmp_path: Path):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for path in tmp_path.glob("*.safetensors"):  # a legacy checkpoint: pickled weights only
        path.unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.warns(UserWarning, match="allow_pickle"):
        load_model(str(tmp_path), allow_pickle=True)


def test_save_model_records_base(tmp_path: Path, backdoored):
    base, adapter = backdoored
    model, tokenizer = load_model(str(adapter))
    assert save_model(model, tokenizer, tmp_path / "copy", base_name_or_path=str(base)) == "adapter"
    config = json.loads((tmp_path / "copy/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())


def test_an_optimizer_whose_package_is_missing_is_refused_before_loading(tmp_path: Path):
    import importlib.util

    from crowguard.config import ConfigError

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ConfigError, match="needs the bitsandbytes package"):
        run_training_stage("defend", ModelConfig(name_or_path=str(tmp_path / "not-loaded")),
                           _cfg(optim="paged_adamw_8bit"), _examples(2), StageContext(tmp_path / "out"))  # fmt: skip
    assert not (tmp_path / "out").exists()


def _right_padded(rows: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One collated micro-batch as ``DataCollatorForSeq2Seq`` makes it: right-padded, prompt token 0 masked."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, 1 : len(r)] = torch.tensor(r[1:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_regroup_by_length_deals_the_same_rows_longest_first_with_less_padding():
    """Against the naive rule: the same rows (ids and labels), the same micro-batch sizes, longest first, each
    micro-batch padded to its own longest row; never more padded positions than before."""
    from crowguard.train import regroup_by_length

    generator = torch.Generator().manual_seed(0)
    lengths = [5, 17, 9, 3, 12, 12, 1]
    rows = [torch.randint(1, 50, (n,), generator=generator).tolist() for n in lengths]
    rows[5][0] = 99  # the two rows of length 12 differ from their first token on: their order is visible
    sizes = [2, 2, 2, 1]
    starts = list(itertools.accumulate([0, *sizes]))
    batches = [_right_padded(rows[a:b], pad_id=7) for a, b in itertools.pairwise(starts)]
    out = regroup_by_length(batches, pad_id=7)

    want = sorted(rows, key=len, reverse=True)  # stable: the two 12s keep the sampler's order
    naive = [_right_padded(want[a:b], pad_id=7) for a, b in itertools.pairwise(starts)]
    assert [b["input_ids"].shape for b in out] == [(2, 17), (2, 12), (2, 5), (1, 1)]
    for got, expected in zip(out, naive, strict=True):
        assert set(got) == set(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    assert sum(b["input_ids"].numel() for b in out) < sum(b["input_ids"].numel() for b in batches)
    left = {k: v.flip(-1) for k, v in batches[0].items()}
    with pytest.raises(ValueError, match="right-padded"):
        regroup_by_length([left, batches[1]], 7)
    with pytest.raises(ValueError, match="keys"):
        regroup_by_length([{**batches[0], "position_ids": batches[0]["attention_mask"]}], 7)


@pytest.mark.parametrize("crow", [CROW, None], ids=["crow", "sft"])
def test_regrouped_micro_batches_give_the_same_update(tmp_path: Path, crow):
    """Token mode: the step's micro-batches re-dealt by length (the default) give the update of the sampler's own
    grouping, on unequal lengths in 2 x 4, where the regrouping changes which rows share a micro-batch."""
    regrouped = _update(tmp_path / "r", 2, 4, "token", crow, unequal=8, max_length=256)
    plain = _update(tmp_path / "p", 2, 4, "token", crow, unequal=8, max_length=256, regroup_micro_batches=False)
    assert any(v.abs().max() > 1e-4 for v in plain.values())
    # Measured: 6e-4 (CROW: rounding that differs with the padded shapes flips the sign of a few near-zero input
    # gradients, moving delta there by 2 eps), 2e-4 (SFT); weighting the rows differently (the per-micro-batch
    # mean, below) moves it by 0.029.
    assert _relative_gap(regrouped, plain) < 2e-3
    micro = _update(tmp_path / "m", 2, 4, "micro_batch", crow, unequal=8, max_length=256)
    assert _relative_gap(micro, plain) > 1e-2  # measured: 0.029 (both)


def test_trainer_regroups_each_step_in_token_mode_only(tmp_path: Path):
    """The Trainer's micro-batches of a step, as the training loop asks for them: re-dealt by length in token
    mode, left as drawn in micro_batch mode (there the grouping is part of the loss)."""
    from crowguard.train import CrowTrainer, training_arguments

    tokenizer = tiny_tokenizer()
    batches = [_right_padded([[5] * 3, [6] * 20]), _right_padded([[7] * 19, [8] * 2])]
    for mode, regrouped in (("token", True), ("micro_batch", False)):
        trainer = CrowTrainer(model=tiny_llama(tokenizer), args=training_arguments(_cfg(grad_accum=2), tmp_path),
                              loss_average=mode, regroup_pad_id=0)  # fmt: skip
        got, _ = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
        assert [b["input_ids"].shape[1] for b in got] == ([20, 3] if regrouped else [20, 19]), mode


def test_a_training_section_passes_the_trainer_arguments_a_user_reaches_for(tmp_path):
    """Issue 27: report_to, save_total_limit, loader workers were fixed and torch_compile unreachable. They pass
    through train.trainer_args (checked against TrainingArguments; keys crowguard sets from its knobs refused)."""
    from crowguard import config
    from crowguard.schemas import ExperimentConfig
    from crowguard.train import training_arguments

    cfg = config.load(ExperimentConfig, None, ["defense.train.trainer_args={save_total_limit: 5, adam_beta2: 0.99}"])
    args = training_arguments(cfg.defense.train, tmp_path)
    assert (args.save_total_limit, args.adam_beta2, args.dataloader_num_workers) == (5, 0.99, 0)
    assert args.report_to in ("none", [], ["none"])  # crowguard's default where the user gave none
    with pytest.raises(config.ConfigError, match="learning_rate is set by crowguard from lr"):
        config.load(ExperimentConfig, None, ["defense.train.trainer_args={learning_rate: 0.1}"])
    with pytest.raises(config.ConfigError, match=r"report_too is not a TrainingArguments field.*report_to"):
        config.load(ExperimentConfig, None, ["backdoor.trainer_args={report_too: none}"])
