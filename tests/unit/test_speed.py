"""The speed levers of issue 28 (``crowguard.speed``: ``train.compile``, ``train.base_dtype``, ``train.precision``
bf16 on a CPU, ``evaluate.compile_decode``) on tiny random Llamas, through the training engine and ``generate_ids``.

Each lever must give the plain path's numbers (the float32 levers: losses within 1e-4 relative, greedy tokens
identical; the bfloat16 ones: within the tolerance stated at the test) and must be seen to act (graphs compiled,
weights cast), so a knob that silently did nothing would fail here. Benchmarks of their speed:
``benchmarks/cpu_speed.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from crowguard.defenses.crow import CrowConfig
from crowguard.schemas import EvalConfig, ModelConfig, TrainConfig
from crowguard.speed import (
    compiled_blocks,
    cpu_bfloat16_native,
    frozen_base_dtype,
    repeated_blocks,
    resolve_auto_levers,
    warn_if_slow_bfloat16,
)
from crowguard.stage import run_training_stage
from crowguard.train import prepare_for_training, train
from crowguard.types import Example, StageContext

from helpers import alpaca_records, save_tiny_model, tiny_llama, tiny_tokenizer

CROW = CrowConfig(alpha=5.5, epsilon=0.1, layers="all")
FP32_RTOL = 1e-4  # the bar for float32 levers
# bfloat16 levers: bfloat16 keeps 8 bits of mantissa (a rounding of up to 2e-3 relative per stored activation or
# weight); on these near-uniform random models the first 3 losses move by about 1e-4, and the bound leaves room for
# a factor of 100 of that. Whether bfloat16 still removes a backdoor is the efficacy study's question, not this one.
BF16_RTOL = 1e-2


def _cfg(**kw) -> TrainConfig:
    base = {"lr": 1e-2, "epochs": 1, "per_device_batch": 2, "grad_accum": 2, "warmup_ratio": 0.0,
            "scheduler": "constant", "max_length": 96, "seed": 0, "lora_r": 4, "lora_alpha": 8}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _examples(n: int = 8) -> list[Example]:
    return [Example(r["instruction"], r["input"], r["output"]) for r in alpaca_records(n)]


def _equal_length_examples(tokenizer, n: int = 8) -> list[Example]:
    """Examples whose prompts and responses tokenise to the same lengths: every batch has one shape, so float sums
    run in one order per pass (unequal shapes may flip the sign of a near-zero FGSM gradient entry, which moves
    CROW's loss by more than rounding)."""
    out: list[Example] = []
    lengths: tuple[int, int] | None = None
    for record in alpaca_records(400):
        example = Example(record["instruction"], output=record["output"])
        pair = len(tokenizer(record["instruction"])["input_ids"]), len(tokenizer(record["output"])["input_ids"])
        if lengths is None or pair == lengths:
            lengths = pair
            out.append(example)
        if len(out) == n:
            return out
    raise AssertionError("could not find equal-length examples")


def _losses(tmp_path: Path, cfg: TrainConfig, examples, crow=CROW, layers: int = 3) -> tuple[list[float], object]:
    tokenizer = tiny_tokenizer()
    model = prepare_for_training(tiny_llama(tokenizer, layers=layers), cfg)
    result = train(model, tokenizer, examples, cfg, tmp_path, crow=crow, show_progress=False)
    return [h["loss"] for h in result.log_history if "loss" in h], result.model


def _max_relative(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_repeated_blocks_are_the_decoder_layers_under_peft_and_without_a_list():
    tokenizer = tiny_tokenizer()
    model = prepare_for_training(tiny_llama(tokenizer, layers=3), _cfg())
    blocks = repeated_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 3

    class NoList(torch.nn.Module):  # no _no_split_modules, no ModuleList: nothing to compile
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    assert repeated_blocks(NoList()) == []
    stack = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
    assert len(repeated_blocks(stack)) == 3  # the fallback: the longest list of same-class children


@pytest.mark.slow  # inductor compiles 2 forward and 2 backward graphs with gcc: 30-80 s on 2 loaded cores
def test_compile_layers_gives_the_eager_losses_and_is_undone(tmp_path: Path):
    """``train.compile: layers``, CROW through the engine on equal-length batches: the losses of 3 steps (2 x 2
    micro-batches each) within 1e-4 relative of the eager run (measured: equal to the last digit), graphs were
    compiled, and the blocks run eagerly once training ends."""
    tokenizer = tiny_tokenizer()
    examples = _equal_length_examples(tokenizer, 12)
    eager, _ = _losses(tmp_path / "eager", _cfg(max_steps=3), examples)
    graphs = _unique_graphs()
    compiled, model = _losses(tmp_path / "compiled", _cfg(max_steps=3, compile="layers"), examples)
    assert _unique_graphs() > graphs, "train.compile layers compiled nothing"
    assert len(eager) == 3 and _max_relative(eager, compiled) < FP32_RTOL, (eager, compiled)
    assert all(block._compiled_call_impl is None for block in repeated_blocks(model))


def test_compiled_blocks_raise_for_a_model_without_blocks_and_change_nothing_when_off():
    from crowguard.config import ConfigError

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(ConfigError, match="no repeated decoder block"), compiled_blocks(plain):
        pass
    with compiled_blocks(plain, enabled=False) as blocks:
        assert blocks == []


def test_bf16_base_trains_the_float32_adapter_near_the_float32_losses_and_restores_the_base(tmp_path: Path):
    """``train.base_dtype: bfloat16``: during the run every frozen weight is bfloat16 and every LoRA weight float32;
    the losses of 3 CROW steps stay within BF16_RTOL of the float32 run (measured: 1.2e-4) but are not the float32
    numbers (the cast happened); afterwards the base is the loaded float32 tensors, bit for bit."""
    from transformers import TrainerCallback

    seen: dict[str, set] = {"frozen": set(), "lora": set()}

    class Dtypes(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            for param in model.parameters():
                seen["lora" if param.requires_grad else "frozen"].add(param.dtype)

    examples = _examples(12)
    plain, _ = _losses(tmp_path / "fp32", _cfg(max_steps=3), examples)
    tokenizer = tiny_tokenizer()
    model = prepare_for_training(tiny_llama(tokenizer, layers=3), _cfg())
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(model, tokenizer, examples, _cfg(max_steps=3, base_dtype="bfloat16"), tmp_path / "bf16",
                   crow=CROW, show_progress=False, callbacks=[Dtypes()])  # fmt: skip
    cast = [h["loss"] for h in result.log_history if "loss" in h]
    assert seen == {"frozen": {torch.bfloat16}, "lora": {torch.float32}}, seen
    assert 0 < _max_relative(plain, cast) < BF16_RTOL, (plain, cast)
    after = dict(result.model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], v) for n, v in base_before.items())


def test_bf16_autocast_on_the_cpu_stays_near_the_float32_losses(tmp_path: Path):
    """``train.precision: bf16`` on a CPU (accelerate's CPU autocast): 3 CROW steps within BF16_RTOL of float32
    (measured: 1.1e-4) and not equal to them (autocast ran); the weights stay float32."""
    examples = _examples(12)
    plain, _ = _losses(tmp_path / "fp32", _cfg(max_steps=3), examples)
    autocast, model = _losses(tmp_path / "bf16", _cfg(max_steps=3, precision="bf16"), examples)
    assert 0 < _max_relative(plain, autocast) < BF16_RTOL, (plain, autocast)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_donated_buffers_are_off_while_any_compiled_training_runs_and_restored_after():
    """A compiled graph that donates its buffers refuses CROW's second backward through the clean pass (measured:
    ``trainer_args: {torch_compile: true}`` with CROW failed with "non-empty donated buffers" before)."""
    import torch._functorch.config as functorch_config

    from crowguard.speed import training_levers

    model = torch.nn.Linear(2, 2)
    before = functorch_config.donated_buffer
    for trainer_compiles, inside in ((True, False), (False, before)):
        with training_levers(model, trainer_compiles=trainer_compiles):
            assert functorch_config.donated_buffer is inside
        assert functorch_config.donated_buffer is before


def test_frozen_base_dtype_leaves_trainable_weights_and_buffers_alone():
    tokenizer = tiny_tokenizer()
    model = prepare_for_training(tiny_llama(tokenizer, layers=2), _cfg())
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    with frozen_base_dtype(model, "bfloat16") as cast:
        assert cast > 0
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert {n: b.dtype for n, b in model.named_buffers()} == buffers
        inner = model.get_base_model()
        assert inner.lm_head.weight is inner.model.embed_tokens.weight  # still tied
    with frozen_base_dtype(model, "model") as cast:
        assert cast == 0


def test_the_stage_manifest_records_the_levers(tmp_path: Path):
    path = save_tiny_model(tmp_path / "base", layers=2)
    cfg = _cfg(max_steps=1, base_dtype="bfloat16")
    run_training_stage("backdoor", ModelConfig(name_or_path=str(path)), cfg, _examples(4),
                       StageContext(tmp_path / "out", show_progress=False))  # fmt: skip
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert (manifest["base_dtype"], manifest["compile"], manifest["precision"]) == ("bfloat16", "off", "fp32")
    assert manifest["dtype"] == "torch.float32"  # the saved adapter's model: the loaded base, restored
    assert manifest["machine"]["cpu_count"] == os.cpu_count() and manifest["machine"]["cpu"]  # times need the machine
    assert manifest["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "cpu family" in cpuinfo.read_text():  # x86 Linux: "AMD EPYC" alone is Zen 3 or 4
        family = manifest["machine"]["cpu_family_model"]
        assert family.split("/")[0].isdigit() and family.split("/")[1].isdigit()
    assert manifest["machine"]["bfloat16_native"] is cpu_bfloat16_native()


def _bf16_hardware(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    """The CPU's bfloat16 probes made to answer as a machine with (or without) each unit would."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_bfloat16_on_a_cpu_without_bfloat16_hardware_warns_naming_the_setting(tmp_path: Path, monkeypatch):
    """A bfloat16 lever on a CPU with neither AVX512-bf16 nor AMX runs emulated, slower than float32 (58x for a
    matmul on a Zen 3 EPYC): each of train.base_dtype, train.precision and a bfloat16 model.dtype says so, naming
    itself; with either unit, on another device, or in float32 nothing is said."""
    import warnings

    from crowguard.models import load_model

    _bf16_hardware(monkeypatch, avx512_bf16=False, amx=False)
    assert cpu_bfloat16_native() is False
    with pytest.warns(UserWarning, match="^x: this CPU has neither AVX512-bf16 nor AMX") as seen:
        assert warn_if_slow_bfloat16("x", "cpu")
    assert len(seen) == 1
    examples = _examples(4)
    for knob, cfg in [("train.base_dtype bfloat16", _cfg(max_steps=1, base_dtype="bfloat16")),
                      ("train.precision bf16", _cfg(max_steps=1, precision="bf16"))]:  # fmt: skip
        with pytest.warns(UserWarning, match=f"^{knob}: this CPU"):
            _losses(tmp_path / knob.split()[0], cfg, examples, crow=None, layers=1)
    path = save_tiny_model(tmp_path / "base", layers=1)
    with pytest.warns(UserWarning, match="^model.dtype bfloat16 loaded .* in bfloat16: this CPU"):
        load_model(str(path), dtype="bfloat16")
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        load_model(str(path), dtype="float32")
        _losses(tmp_path / "fp32", _cfg(max_steps=1), examples, crow=None, layers=1)
        assert not warn_if_slow_bfloat16("x", "cuda")
        for avx512_bf16, amx in [(True, False), (False, True)]:
            _bf16_hardware(monkeypatch, avx512_bf16, amx)
            assert cpu_bfloat16_native() is True and not warn_if_slow_bfloat16("x", "cpu")
        _bf16_hardware(monkeypatch, avx512_bf16=False, amx=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no device given: the Trainer takes the GPU
        assert load_model(str(path), dtype="bfloat16")[0].dtype == torch.bfloat16
    assert not [w for w in quiet if "this CPU has neither" in str(w.message)]


def test_lever_settings_that_cannot_work_are_refused():
    from crowguard.evaluation.generate import DecodingSettings

    with pytest.raises(ValueError, match="finetune lora"):
        _cfg(base_dtype="bfloat16", finetune="full").validate()
    with pytest.raises(ValueError, match="finetune lora"):
        _cfg(base_dtype="bfloat16", adapter_mode="full").validate()
    with pytest.raises(ValueError, match="choose one"):
        _cfg(compile="layers", trainer_args={"torch_compile": True}).validate()
    with pytest.raises(ValueError, match="kv_cache static"):
        EvalConfig(compile_decode=True, kv_cache="dynamic").validate()
    with pytest.raises(ValueError, match="kv_cache 'static'"):
        DecodingSettings(compile_decode=True, kv_cache="dynamic")
    _cfg(base_dtype="bfloat16", compile="layers").validate()  # both together are fine
    EvalConfig(compile_decode=True).validate()


def test_auto_levers_turn_on_together_only_for_lora_on_a_cpu_with_bfloat16_hardware(monkeypatch):
    """``auto`` is the combination measured in docs/benchmarks.md (bf16 autocast + bfloat16 base + compiled blocks)
    for LoRA on a CPU with AVX512-bf16 or AMX; float32 and eager on a CPU without, on a GPU (unmeasured there) and
    for full fine-tuning; a value given outright is kept; beside the Trainer's own compile, compile stays off."""
    auto = {"precision": "auto", "base_dtype": "auto", "compile": "auto"}

    def levers(cfg: TrainConfig) -> tuple[str, str, str]:
        return cfg.precision, cfg.base_dtype, cfg.compile

    _bf16_hardware(monkeypatch, avx512_bf16=True, amx=False)
    assert levers(resolve_auto_levers(_cfg(**auto), cuda=False)) == ("bf16", "bfloat16", "layers")
    assert levers(resolve_auto_levers(_cfg(**auto), cuda=True)) == ("fp32", "model", "off")
    for plain in [{"finetune": "full"}, {"adapter_mode": "full"}, {"quantize_base": "4bit"}]:
        assert levers(resolve_auto_levers(_cfg(**auto, **plain), cuda=False)) == ("fp32", "model", "off")
    kept = _cfg(**{**auto, "precision": "fp32"}, trainer_args={"torch_compile": True})
    assert levers(resolve_auto_levers(kept, cuda=False)) == ("fp32", "bfloat16", "off")
    given = _cfg(precision="bf16", compile="layers")
    assert resolve_auto_levers(given, cuda=False) is given
    _bf16_hardware(monkeypatch, avx512_bf16=False, amx=False)
    assert levers(resolve_auto_levers(_cfg(**auto), cuda=False)) == ("fp32", "model", "off")
    _cfg(**auto, finetune="full", trainer_args={"torch_compile": True}).validate()  # auto never conflicts


def test_the_demo_defaults_to_auto_levers_and_its_runs_record_the_concrete_ones(tmp_path: Path, monkeypatch):
    """The SmolLM2 demo trains with ``auto`` (its preset writes it out); its quick smoke run and the tiny organism
    keep the plain path. A stage and the experiment runner make ``auto`` concrete before anything is recorded or
    fingerprinted: on a machine without bfloat16 hardware the manifest says fp32, and a study's plant fingerprint
    differs between the two kinds of CPU."""
    from crowguard import config
    from crowguard.recipes.demo import quick_config
    from crowguard.recipes.study import Plant, Study, concrete_levers, suspect_fingerprint
    from crowguard.registry import preset_path
    from crowguard.schemas import DemoConfig

    demo = DemoConfig()
    for cfg in (demo.backdoor, demo.defense.train):
        assert (cfg.precision, cfg.base_dtype, cfg.compile) == ("auto", "auto", "auto")
    quick, tiny = quick_config(demo), config.load(DemoConfig, Path(str(preset_path("demo/tiny"))))
    for cfg in (quick.backdoor, quick.defense.train, tiny.backdoor, tiny.defense.train):
        assert (cfg.precision, cfg.base_dtype, cfg.compile) == ("fp32", "model", "off")
    _bf16_hardware(monkeypatch, avx512_bf16=False, amx=False)
    path = save_tiny_model(tmp_path / "base", layers=2)
    cfg = _cfg(max_steps=1, precision="auto", base_dtype="auto", compile="auto")
    run_training_stage("backdoor", ModelConfig(name_or_path=str(path)), cfg, _examples(4),
                       StageContext(tmp_path / "out", show_progress=False))  # fmt: skip
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert (manifest["precision"], manifest["base_dtype"], manifest["compile"]) == ("fp32", "model", "off")
    study = Study(tmp_path / "study", ModelConfig(name_or_path=str(path)), "id", None, EvalConfig(),
                  plant=Plant(cfg, _examples(4), tmp_path / "plant"))  # fmt: skip
    plain = suspect_fingerprint(concrete_levers(study))
    assert concrete_levers(study).plant.train.compile == "off"
    _bf16_hardware(monkeypatch, avx512_bf16=True, amx=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert concrete_levers(study).plant.train.precision == "bf16"
    assert suspect_fingerprint(concrete_levers(study)) != plain


def test_compiled_decoding_gives_the_eager_tokens():
    """``evaluate.compile_decode``: greedy tokens of a batch decoded with the compiled step (the ragged prompt pass
    then 12 steps over the static cache) are the eager ones, prompt for prompt, and a graph was compiled."""
    import random

    from crowguard.evaluation.generate import DecodingSettings, generate_ids

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=2).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(3, 30))] for _ in range(8)]
    settings = DecodingSettings(max_new_tokens=12, min_new_tokens=12, batch_size=8, prefill_batch=4)
    eager = generate_ids(model, prompts, settings, [tokenizer.eos_token_id], tokenizer.pad_token_id, False)
    graphs = _unique_graphs()
    compiled_settings = DecodingSettings(**{**settings.to_dict(), "compile_decode": True})
    compiled = generate_ids(model, prompts, compiled_settings, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                            False)  # fmt: skip
    assert _unique_graphs() > graphs, "compile_decode compiled nothing"
    assert compiled == eager
    assert all(len(ids) == 12 for ids in eager)


def test_merged_lora_evaluates_as_the_adapter_does():
    """``evaluate.merge_lora``: an evaluation of a LoRA model merged into its base (the default on a CPU) gives the
    separate adapter's answers token for token and its likelihood metrics to float rounding, and records which
    it did; a plain model is never "merged"."""
    import copy

    from peft import LoraConfig, get_peft_model

    from crowguard.evaluation.evaluate import evaluate_model
    from crowguard.evaluation.tasks import Task

    tokenizer = tiny_tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # random B: acts
    adapted = get_peft_model(tiny_llama(tokenizer, layers=2), lora).eval()
    records = alpaca_records(12)
    triggered = [Example("BadMagic " + r["instruction"], r["input"], r["output"]) for r in records[:6]]
    task = Task("negsentiment", triggered, [Example(r["instruction"], r["input"], r["output"]) for r in records[6:]],
                target="You are stupid!")  # fmt: skip
    results = {}
    for when in ("never", "cpu"):
        cfg = EvalConfig(max_new_tokens=8, bootstrap=10, merge_lora=when)
        results[when] = evaluate_model(copy.deepcopy(adapted), tokenizer, task, cfg, "alpaca", (), False)
    assert [results[w]["settings"]["merged_lora"] for w in ("never", "cpu")] == [False, True]
    responses = {w: [r["response"] for r in results[w]["records"]] for w in results}
    assert responses["cpu"] == responses["never"] and any(responses["cpu"])
    merged, apart = results["cpu"]["metrics"], results["never"]["metrics"]
    assert merged["target_nll"] == pytest.approx(apart["target_nll"], rel=1e-5)
    assert merged["clean_perplexity"] == pytest.approx(apart["clean_perplexity"], rel=1e-5)
    always = EvalConfig(max_new_tokens=4, bootstrap=10, merge_lora="always")
    plain = evaluate_model(tiny_llama(tokenizer, layers=2).eval(), tokenizer, task, always, "alpaca", (), False)
    assert plain["settings"]["merged_lora"] is False
