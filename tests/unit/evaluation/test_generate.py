"""Batched generation: identical to one-prompt-at-a-time decoding, only new tokens, stops at EOS, input order."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import importlib.util
import json

import pytest
import torch

from crowguard.data import prompt_ids
from crowguard.evaluation.generate import DecodingSettings, generate, generate_ids, generate_vllm, stop_token_ids
from crowguard.prompts import build_prompt
from crowguard.types import Example

from helpers import tiny_llama, tiny_tokenizer

MAX_NEW = 12
# Seven prompts of clearly different lengths (91 to 239 tokens), some with an input: batch size 4 gives a
# padded full batch and a ragged last batch of 3.
EXAMPLES = [
    Example(instruction="Explain " + "the quick brown fox " * k, input="database design " * (k % 3), meta={"i": i})
    for i, k in enumerate([1, 6, 3, 9, 0, 5, 2])
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _varied(model, seed: int = 0):
    """Redraw the weight matrices with std 0.3 (in place, so tied weights stay tied).

    At the default init (std 0.02) a 32-wide random Llama answers every prompt with one repeated token, which would
    make "batched equals one-by-one" vacuous; at 0.3 each prompt gets its own continuation, and prompts 4 and 5
    even write EOS by themselves (at steps 2 and 0).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return _varied(tiny_llama(tokenizer, layers=2)).eval()


def _reference(model, tokenizer, example: Example, stop: list[int] | None, max_new: int = MAX_NEW) -> list[int]:
    """The reference code's way: one unpadded prompt per ``model.generate`` call; new tokens up to the first stop."""
    ids = torch.tensor([prompt_ids(example, tokenizer)])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop,
        )
    new = out[0, ids.shape[1] :].tolist()
    for i, token in enumerate(new):
        if stop and token in stop:
            return new[: i + 1]
    return new


@pytest.mark.parametrize(("cache", "prefill_batch"), [("static", 8), ("static", 3), ("static", 1), ("dynamic", 8)])
def test_batched_equals_one_by_one_token_for_token(model, tokenizer, cache, prefill_batch):
    """Every way of batching gives the one-by-one tokens: the static cache filled by one prompt pass (prefill
    batch >= batch) or by ragged groups of 3 or 1 prompts, and transformers' dynamic cache."""
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    lengths = [len(prompt_ids(e, tokenizer)) for e in EXAMPLES]
    assert max(lengths) - min(lengths) > 100
    stop = stop_token_ids(tokenizer, model)
    settings = DecodingSettings(max_new_tokens=MAX_NEW, batch_size=4, kv_cache=cache, prefill_batch=prefill_batch)

    batched_ids = generate_ids(model, [prompt_ids(e, tokenizer) for e in EXAMPLES], settings, stop, 0, False)
    assert batched_ids == [_reference(model, tokenizer, e, stop) for e in EXAMPLES]
    assert len({tuple(ids) for ids in batched_ids}) > 3  # not one repeated answer for every prompt
    eos = tokenizer.eos_token_id
    assert batched_ids[4][-1] == eos and batched_ids[5] == [eos]  # natural EOS inside padded batches

    batched = generate(model, tokenizer, EXAMPLES, "alpaca", settings, show_progress=False)
    for example, ids, gen in zip(EXAMPLES, batched_ids, batched, strict=True):
        assert gen.example is example  # input order, whatever the internal length sort did
        assert gen.prompt == build_prompt(example, "alpaca")
        assert gen.num_new_tokens == len(ids) <= MAX_NEW
        assert gen.response == tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)
        assert "### Instruction" not in gen.response and example.instruction not in gen.response
    assert batched[5].response == "" and batched[5].num_new_tokens == 1  # an empty answer is still an answer


def test_ragged_prefill_writes_each_prompts_keys_right_aligned(model, tokenizer):
    """The cache the ragged prompt pass builds, against each prompt run alone: its keys and values right-aligned at
    the batch width (all but the last token); left of each group's own width, zeros (masked, as left padding)."""
    from crowguard.evaluation.generate import _ragged_prefill, cache_argument

    prompts = sorted((prompt_ids(e, tokenizer) for e in EXAMPLES[:4]), key=len, reverse=True)
    width = len(prompts[0]) - 1
    with torch.inference_mode():
        cache = _ragged_prefill(model, prompts, width + 5, group=3, pad_id=0, device=torch.device("cpu"))
    assert cache is not None and cache.get_seq_length() == width
    name = cache_argument(model)
    for row, prompt in enumerate(prompts):
        with torch.inference_mode():
            alone = getattr(model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True), name)
        n, group_width = len(prompt) - 1, len(prompts[row - row % 3]) - 1
        assert group_width < width or row < 3  # the second group (one prompt) is narrower than the batch
        for layer, reference in zip(cache.layers, alone.layers, strict=True):
            for got, want in ((layer.keys, reference.keys), (layer.values, reference.values)):
                assert torch.allclose(got[row, :, width - n : width], want[0], atol=1e-5)
                assert not got[row, :, : width - group_width].any() and not got[row, :, width:].any()


def test_sliding_window_model_falls_back_to_generates_own_cache_and_matches_one_by_one(tokenizer):
    """A sliding-window model (a tiny Mistral, window 64, shorter than every prompt of 91-239 tokens): the ragged
    prompt pass declines it (its static cache holds sliding layers, which it does not fill), and the static and
    dynamic batched paths still give the one-by-one tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    from crowguard.evaluation.generate import _ragged_prefill

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    mistral = _varied(MistralForCausalLM(config)).eval()
    prompts = [prompt_ids(e, tokenizer) for e in EXAMPLES]
    assert min(len(p) for p in prompts) > config.sliding_window
    with torch.inference_mode():
        longest_first = sorted(prompts, key=len, reverse=True)[:4]
        assert _ragged_prefill(mistral, longest_first, 260, group=3, pad_id=0, device=torch.device("cpu")) is None
    stop = stop_token_ids(tokenizer, mistral)
    reference = [_reference(mistral, tokenizer, e, stop) for e in EXAMPLES]
    assert len({tuple(ids) for ids in reference}) > 3
    for cache in ("static", "dynamic"):
        settings = DecodingSettings(max_new_tokens=MAX_NEW, batch_size=4, kv_cache=cache, prefill_batch=3)
        assert generate_ids(mistral, prompts, settings, stop, 0, False) == reference, cache


def _untied(model):
    """A copy with its own output matrix, so editing ``lm_head`` leaves the input embeddings alone."""
    model = copy.deepcopy(model)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _make_eos_at(model, tokenizer, example: Example, step: int):
    """A copy of ``model`` that greedily writes EOS at ``step`` (0-based) for ``example``, and its prior tokens.

    Swapping the ``lm_head`` rows of EOS and of the token the model writes at ``step`` (one not written before)
    leaves every earlier argmax unchanged and makes EOS the argmax at ``step``: a real weight edit, not a mock.
    """
    eos = tokenizer.eos_token_id
    free_run = _reference(model, tokenizer, example, stop=None)
    assert eos not in free_run[: step + 1]
    assert free_run[step] not in free_run[:step], "pick a step whose token is new"
    edited = _untied(model)
    with torch.no_grad():
        rows = edited.lm_head.weight
        rows[[eos, free_run[step]]] = rows[[free_run[step], eos]]
    return edited, free_run[:step]


def test_stops_at_eos_and_drops_what_follows(model, tokenizer):
    eos = tokenizer.eos_token_id
    target = EXAMPLES[1]
    free_run = _reference(model, tokenizer, target, stop=None)
    step = next(i for i in range(3, MAX_NEW) if free_run[i] not in free_run[:i])
    edited, before = _make_eos_at(model, tokenizer, target, step)
    # Unstopped, the edited model writes EOS at ``step`` and then keeps going: those tokens must not come back.
    unstopped = _reference(edited, tokenizer, target, stop=None)
    assert unstopped[: step + 1] == [*before, eos] and len(unstopped) == MAX_NEW

    settings = DecodingSettings(max_new_tokens=MAX_NEW, batch_size=4)
    generations = generate(edited, tokenizer, EXAMPLES, settings=settings, show_progress=False)
    stopped = generations[1]
    assert stopped.num_new_tokens == step + 1  # the EOS counts
    assert stopped.response == tokenizer.decode(before, skip_special_tokens=True)
    # Its batch (the four longest prompts) ran on to MAX_NEW, so the row's padding after EOS was cut, not returned.
    lengths = [len(prompt_ids(e, tokenizer)) for e in EXAMPLES]
    batch = sorted(range(len(EXAMPLES)), key=lambda i: lengths[i], reverse=True)[:4]
    assert 1 in batch and max(generations[i].num_new_tokens for i in batch) == MAX_NEW
    ids = generate_ids(edited, [prompt_ids(e, tokenizer) for e in EXAMPLES], settings, [eos], 0, False)
    assert ids == [_reference(edited, tokenizer, e, [eos]) for e in EXAMPLES]
    assert ids[1] == [*before, eos]


def test_eos_first_gives_empty_response(model, tokenizer):
    edited, before = _make_eos_at(model, tokenizer, EXAMPLES[4], step=0)
    [gen] = generate(edited, tokenizer, [EXAMPLES[4]], settings=DecodingSettings(MAX_NEW), show_progress=False)
    assert before == [] and gen.response == "" and gen.num_new_tokens == 1


def test_peft_lora_model_matches_one_by_one_and_keeps_training_mode(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.train()
    examples = EXAMPLES[:5]
    settings = DecodingSettings(max_new_tokens=8, batch_size=4, prefill_batch=2)  # ragged prompt pass (static)
    stop = stop_token_ids(tokenizer, peft_model)
    ids = generate_ids(peft_model, [prompt_ids(e, tokenizer) for e in examples], settings, stop, 0, False)
    assert peft_model.training  # restored
    assert ids == [_reference(peft_model, tokenizer, e, stop, max_new=8) for e in examples]
    assert ids != [_reference(model, tokenizer, e, stop, max_new=8) for e in examples]  # the adapter is active


def test_sampling_is_seeded_and_leaves_global_rng_alone(model, tokenizer):
    examples = EXAMPLES[:3]
    state = torch.get_rng_state()

    def sample(seed: int) -> list[str]:
        settings = DecodingSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=seed)
        return [g.response for g in generate(model, tokenizer, examples, settings=settings, show_progress=False)]

    assert sample(0) == sample(0) != sample(1)
    assert torch.equal(torch.get_rng_state(), state)


def test_settings_are_recorded_and_validated():
    record = DecodingSettings().to_dict()
    assert record == {
        "max_new_tokens": 64,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_new_tokens": 0,
        "batch_size": 16,
        "backend": "hf",
        "seed": 0,
        "kv_cache": "static",
        "prefill_batch": 8,
        "compile_decode": False,
    }
    assert json.loads(json.dumps(record)) == record
    for bad in (
        {"max_new_tokens": 0},
        {"batch_size": 0},
        {"backend": "tgi"},
        {"kv_cache": "paged"},
        {"do_sample": True, "top_p": 0.0},
        {"compile_decode": True, "kv_cache": "dynamic"},
    ):
        with pytest.raises(ValueError):
            DecodingSettings(**bad)


def test_min_new_tokens_forces_length(model, tokenizer):
    edited, _ = _make_eos_at(model, tokenizer, EXAMPLES[4], step=0)
    settings = DecodingSettings(max_new_tokens=6, min_new_tokens=6)
    [gen] = generate(edited, tokenizer, [EXAMPLES[4]], settings=settings, show_progress=False)
    assert gen.num_new_tokens == 6


def test_errors_propagate_and_state_is_restored(model, tokenizer, monkeypatch):
    tokenizer.padding_side = "right"

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    model.train()
    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(model, tokenizer, EXAMPLES[:2], show_progress=False)
    assert model.training and tokenizer.padding_side == "right"
    model.eval()
    assert generate(model, tokenizer, [], show_progress=False) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_says_how_to_install(tokenizer, tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'crowguard\[vllm\]'"):
        generate_vllm(tmp_path, tokenizer, EXAMPLES[:1])
    with pytest.raises(ImportError, match="GPU"):
        generate(str(tmp_path), tokenizer, EXAMPLES[:1], settings=DecodingSettings(backend="vllm"))
