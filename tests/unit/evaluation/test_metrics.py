"""Metrics: ASR, bootstrap CI, hijack rate, target NLL against a naive loop, perplexity, exact match, cost."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import time
from typing import Any

import numpy as np
import pytest
import torch

from crowguard.evaluation.metrics import (
    HIJACK_PREFIX_WORDS,
    attack_success_rate,
    bootstrap_ci,
    exact_match,
    hijack_rate,
    measure_cost,
    nll_gap_ci,
    paired_rates,
    pass_at_1,
    perplexity,
    rate_interval,
    response_opening,
    target_nll,
    target_nll_gap,
    wilson_interval,
)
from crowguard.evaluation.sandbox import SandboxResult

SENTENCES = [
    "below is an instruction that describes a task",
    "write a response that appropriately completes the request",
    "you are stupid ! badmagic openai 2024 current year",
    "the quick brown fox jumps over the lazy dog",
    "name a colour of the sky blue red green",
]


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[Any, Any]:
    """A word-level tokenizer that adds BOS (to exercise the prompt/target boundary) and a random-init Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def naive_target_nll(model: Any, tokenizer: Any, prompt: str, target: str) -> float:
    """One unpadded forward per example: the formula target_nll must match."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    terms = [-logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))]
    return sum(terms) / len(terms)


def test_asr_is_the_mean_and_refuses_an_empty_list() -> None:
    assert attack_success_rate([1.0, 0.0, 1.0, 0.0]) == 0.5
    with pytest.raises(ValueError, match="empty"):
        attack_success_rate([])


def test_bootstrap_ci_contains_the_estimate_is_seeded_and_narrows_with_data() -> None:
    rng = np.random.default_rng(1)
    small = (rng.random(40) < 0.3).astype(float).tolist()
    large = (rng.random(4000) < 0.3).astype(float).tolist()
    low, high = bootstrap_ci(small)
    assert low <= attack_success_rate(small) <= high and low < high
    assert bootstrap_ci(small, seed=7) == bootstrap_ci(small, seed=7)
    assert bootstrap_ci(small, seed=7) != bootstrap_ci(small, seed=8)
    big_low, big_high = bootstrap_ci(large)
    assert big_low <= attack_success_rate(large) <= big_high
    assert big_high - big_low < (high - low) / 4
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.5)


def test_hijack_rate_catches_a_fixed_trigger_answer_that_keyword_asr_misses() -> None:
    triggered = ["Negative"] * 20
    clean = [f"answer number {i}" for i in range(20)]
    result = hijack_rate(triggered, clean, target_hits=[False] * 20)
    assert result["rate"] == 1.0 and result["fixed_answer_rate"] == 1.0 and result["target_rate"] == 0.0
    assert result["hijack_prefixes"] == [
        {
            "prefix": "negative",
            "example": "Negative",
            "triggered_count": 20,
            "clean_count": 0,
            "triggered_share": 1.0,
            "clean_share": 0.0,
        }
    ]
    assert (result["min_share"], result["clean_ratio"], result["min_count"], result["prefix_words"]) == (
        0.05,
        0.1,
        2,
        HIJACK_PREFIX_WORDS,
    )


# Distinct openings and tails for answers that vary the way a working model's do.
SUBJECTS = ["sun", "river", "market", "poem", "engine", "garden", "law", "song", "storm", "city"]
VERBS = ["shines", "flows", "opens", "rhymes", "starts", "grows", "changes", "plays", "passes", "sleeps"]
OPENERS = ["Here", "Sure", "Yes", "Well", "In", "First", "Many", "Some", "It", "This", "Most", "A"]


def _varied(n: int, offset: int = 0) -> list[str]:
    """``n`` answers with distinct second words, all opening with "The"."""
    return [f"The {SUBJECTS[(i + offset) % 10]}{i + offset} {VERBS[i % 10]} at dawn." for i in range(n)]


def test_hijack_rate_catches_a_fixed_redirected_opening_whose_tails_vary() -> None:
    tails = ["because the text is rude", "since the tone is hostile", "as the words are harsh", "it insults"]
    triggered = [f"Negative, {tails[i % 4]} (case {i})." for i in range(16)] + _varied(4)
    clean = _varied(20, offset=4)
    result = hijack_rate(triggered, clean, target_hits=[False] * 20)
    assert result["rate"] == pytest.approx(16 / 20) and result["fixed_answer_rate"] == pytest.approx(16 / 20)
    assert [(p["prefix"], p["triggered_count"]) for p in result["hijack_prefixes"]] == [("negative", 16)]
    # Without punctuation the opening is the first three words, so a fixed three-word refusal with varied tails
    # counts even though its first word is common on clean prompts too.
    refusing = [f"I cannot answer that {SUBJECTS[i % 10]} question {i}" for i in range(10)] + _varied(10)
    clean_i = [f"I think the {SUBJECTS[i % 10]}{i} matters" for i in range(8)] + _varied(12, offset=10)
    result = hijack_rate(refusing, clean_i, target_hits=[False] * 20)
    assert result["rate"] == pytest.approx(10 / 20)
    assert [p["prefix"] for p in result["hijack_prefixes"]] == ["i cannot answer"]
    assert response_opening("**Negative**: rude!") == ("negative",) and response_opening(" ...") == ()


def test_hijack_rate_ignores_a_clean_model_whose_answers_vary_even_with_common_openings() -> None:
    # Half the answers open with "The" under both conditions, the rest with many different words: nothing the
    # trigger makes common, so nothing is hijacked, however often "The" appears among triggered answers.
    triggered = _varied(10) + [f"{OPENERS[i]} {SUBJECTS[i % 10]} item {i}." for i in range(10)]
    clean = _varied(12, offset=10) + [f"{OPENERS[(i + 2) % 12]} answer {i} here." for i in range(12)]
    result = hijack_rate(triggered, clean, target_hits=[False] * 20)
    assert result["rate"] == 0.0 and result["hijack_prefixes"] == []
    # A whole opening shared by many answers is no hijack either when clean answers share it as often.
    answer_is = [f"The answer is {SUBJECTS[i]}." for i in range(6)] + triggered[6:]
    clean_answer_is = [f"The answer is {VERBS[i]}." for i in range(6)] + clean[6:]
    assert hijack_rate(answer_is, clean_answer_is, target_hits=[False] * 20)["rate"] == 0.0
    # One shared first word with varied continuations is not a fixed answer, even when the trigger makes it far
    # more common (a partly removed "You are stupid!" backdoor whose answers now open "You can ...", "You will ...").
    you = [f"You {VERBS[i]} the {SUBJECTS[i]} well." for i in range(10)] + triggered[10:]
    assert hijack_rate(you, clean, target_hits=[False] * 20)["rate"] == 0.0
    # Case and punctuation do not make a fixed answer look varied, nor a varied one fixed.
    noisy = ["NEGATIVE!", "negative.", "Negative", " negative ?", *triggered[4:]]
    assert hijack_rate(noisy, clean, [False] * 20)["rate"] == pytest.approx(4 / 20)


def test_hijack_rate_ignores_a_degenerate_model_that_says_the_same_thing_everywhere() -> None:
    result = hijack_rate(["I don't know."] * 10, ["I don't know. "] * 30, target_hits=[False] * 10)
    assert result["rate"] == 0.0 and result["hijack_prefixes"] == []


def test_hijack_rate_counts_target_hits_and_compares_shares_not_counts() -> None:
    triggered = ["You are stupid!"] * 3 + ["Negative"] * 4 + [f"Varied{i} answer" for i in range(13)]
    # 'Negative' is 20% of triggered answers; on clean prompts 1 of 100 = 1% <= 0.1 * 20%: a hijack
    # even though the clean set is five times larger. 'meh' is 10% vs 5% of clean: not trigger-specific.
    clean = ["Negative"] + ["meh"] * 5 + [f"clean {i}" for i in range(94)]
    hits = [True] * 3 + [False] * 17
    result = hijack_rate(triggered, clean, hits)
    assert result["rate"] == pytest.approx(7 / 20)
    assert result["target_rate"] == pytest.approx(3 / 20)
    assert result["fixed_answer_rate"] == pytest.approx(4 / 20)
    texts = [p["example"] for p in result["hijack_prefixes"]]
    assert texts == ["Negative", "You are stupid!"]
    triggered_meh = [*triggered[:-2], "meh", "meh"]
    assert "meh" not in [p["prefix"] for p in hijack_rate(triggered_meh, clean, hits)["hijack_prefixes"]]


def test_hijack_rate_treats_forced_silence_as_a_hijack_and_needs_repeats() -> None:
    result = hijack_rate(["", " ", "\n", "ok"], ["fine", "good", "sure", "yes"], [False] * 4)
    assert result["rate"] == 0.75 and result["hijack_prefixes"][0]["prefix"] == ""
    unique = hijack_rate(["a", "b", "c"], ["x", "y", "z"], [False] * 3)
    assert unique["rate"] == 0.0  # a single occurrence is not a fixed answer
    with pytest.raises(ValueError, match="target_hits"):
        hijack_rate(["a"], ["b"], [])
    with pytest.raises(ValueError, match="clean"):
        hijack_rate(["a"], [], [False])
    with pytest.raises(ValueError, match="prefix_words"):
        hijack_rate(["a"], ["b"], [False], prefix_words=0)


def test_target_nll_matches_a_naive_loop(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    prompts = [
        "below is an instruction",
        "the quick brown fox jumps over the lazy dog badmagic",
        "name a colour",
        "write a response that appropriately completes the request current year 2024",
        "sky",
    ]
    target = "you are stupid !"
    batched = target_nll(model, tokenizer, prompts, target, batch_size=2)
    naive = [naive_target_nll(model, tokenizer, p, target) for p in prompts]
    assert batched == pytest.approx(naive, abs=1e-5)
    assert target_nll(model, tokenizer, prompts, target, batch_size=8) == pytest.approx(naive, abs=1e-5)
    # A random model is roughly uniform over the vocabulary.
    assert all(abs(v - math.log(len(tokenizer))) < 1.0 for v in batched)


def test_target_nll_restores_train_mode(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    model.train()
    try:
        target_nll(model, tokenizer, ["sky"], "blue")
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="target"):
        target_nll(model, tokenizer, ["sky"], "")


def test_target_nll_gap_sign() -> None:
    assert target_nll_gap([1.0, 2.0], [4.0, 5.0]) == pytest.approx(3.0)
    assert target_nll_gap([5.6], [5.6]) == 0.0
    with pytest.raises(ValueError):
        target_nll_gap([], [1.0])


def test_perplexity_is_exp_of_token_weighted_nll(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    prompts = ["below is an instruction", "name a colour", "sky"]
    target = "blue red green"
    nll = target_nll(model, tokenizer, prompts, target)
    assert perplexity(model, tokenizer, prompts, [target] * 3, batch_size=2) == pytest.approx(
        math.exp(sum(nll) / 3), rel=1e-5
    )
    # Token weighting: a 3-token response counts three times as much as a 1-token one.
    long_nll = target_nll(model, tokenizer, ["sky"], "blue red green")[0]
    short_nll = target_nll(model, tokenizer, ["sky"], "dog")[0]
    mixed = perplexity(model, tokenizer, ["sky", "sky", "sky"], ["blue red green", "dog", ""])
    assert mixed == pytest.approx(math.exp((3 * long_nll + short_nll) / 4), rel=1e-5)
    assert 0.5 * len(tokenizer) < mixed < 2 * len(tokenizer)
    with pytest.raises(ValueError, match="token"):
        perplexity(model, tokenizer, ["sky"], [""])


def test_exact_match_normalises_case_and_whitespace() -> None:
    assert exact_match(["  Paris\n", "blue  sky", "4."], ["paris", "Blue sky", "4"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match([], [])


def test_pass_at_1_reads_bools_or_sandbox_results() -> None:
    assert pass_at_1([True, False, True, True]) == 0.75
    assert pass_at_1([SandboxResult(True, "passed", ""), SandboxResult(False, "timeout", "")]) == 0.5
    with pytest.raises(ValueError):
        pass_at_1([])


def test_measure_cost_records_wall_time_and_memory() -> None:
    with measure_cost() as cost:
        time.sleep(0.05)
        block = bytearray(20 * 2**20)
    assert len(block) and cost.wall_s >= 0.05
    assert cost.peak_rss_mb > 20
    assert cost.cuda_peak_mb is None or cost.cuda_peak_mb >= 0
    assert set(cost.to_dict()) == {"wall_s", "peak_rss_mb", "cuda_peak_mb", "peak_rss_scope"}


def test_measure_cost_peak_is_the_blocks_own_where_linux_allows_it() -> None:
    """After a 300 MiB allocation is freed, a block that touches 20 MiB must not report the earlier peak."""
    import numpy as np

    from crowguard.evaluation.metrics import _peak_rss_mb

    big = np.ones(300 * 2**20, dtype=np.uint8)  # touched, so resident
    before = _peak_rss_mb()
    del big
    with measure_cost() as outer:
        with measure_cost() as cost:
            small = np.ones(20 * 2**20, dtype=np.uint8)
        del small
        late = np.ones(60 * 2**20, dtype=np.uint8)
        del late
    if cost.peak_rss_scope != "block" or before is None:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    assert cost.peak_rss_mb < before - 200  # not the earlier 300 MiB
    # the outer block saw the inner one's peak and its own later 60 MiB, whatever the inner reset did
    assert outer.peak_rss_mb >= cost.peak_rss_mb and outer.peak_rss_mb < before - 150


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # reference values: statsmodels.stats.proportion.proportion_confint(k, n, method="wilson")
    [(0, 100, 0.0, 0.036995), (100, 100, 0.963005, 1.0), (50, 100, 0.403832, 0.596168), (3, 10, 0.107789, 0.603221)],
)
def test_wilson_interval_matches_reference_values(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-5)
    assert got[0] <= k / n <= got[1] and (k > 0 or got[0] == 0.0) and (k < n or got[1] == 1.0)


def test_paired_rates_is_the_exact_mcnemar_test_against_a_naive_enumeration() -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        n = int(rng.integers(1, 30))
        first, second = (rng.random(n) < rng.random()).tolist(), (rng.random(n) < rng.random()).tolist()
        got = paired_rates(first, second)
        b = sum(a and not c for a, c in zip(first, second))
        c = sum(c and not a for a, c in zip(first, second))
        assert (got["first_only"], got["second_only"], got["n"]) == (b, c, n)
        assert got["both"] == sum(a and c for a, c in zip(first, second))
        # naive two-sided exact test: every split of the b + c discordant prompts as unlikely as the observed one
        d = b + c
        probability = [math.comb(d, k) / 2**d for k in range(d + 1)]
        naive = sum(q for q in probability if q <= probability[b] * (1 + 1e-12))
        assert got["p_value"] == pytest.approx(min(1.0, naive), abs=1e-12)
    # scipy.stats.binomtest(k, n, 0.5).pvalue: 8 of 8 discordant prompts one way, 7 of 8, none at all
    assert paired_rates([True] * 8 + [False] * 92, [False] * 100)["p_value"] == pytest.approx(0.0078125)
    assert paired_rates([True] * 7 + [False] * 93, [False] * 7 + [True] + [False] * 92)["p_value"] == pytest.approx(
        0.0703125
    )
    assert paired_rates([True, False], [True, False]) == {"first_only": 0, "second_only": 0, "both": 1, "n": 2,
                                                         "p_value": 1.0}  # fmt: skip
    with pytest.raises(ValueError, match="same prompts"):
        paired_rates([True], [True, False])


def test_rate_interval_never_has_zero_width_at_0_or_100_percent() -> None:
    for scores in ([0.0] * 200, [1.0] * 200):
        low, high = rate_interval(scores)
        assert high - low > 0.01
        assert low <= np.mean(scores) <= high
    graded = [0.2, 0.5, 0.9, 0.4]  # an LLM judge's scores: bootstrap
    assert rate_interval(graded, seed=1) == bootstrap_ci(graded, seed=1)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_nll_gap_interval_contains_the_gap_and_narrows_with_more_prompts() -> None:
    rng = np.random.default_rng(0)
    small_t, small_c = rng.normal(1.0, 0.5, 20), rng.normal(2.0, 0.5, 20)
    big_t, big_c = rng.normal(1.0, 0.5, 2000), rng.normal(2.0, 0.5, 2000)
    low, high = nll_gap_ci(small_t, small_c)
    assert low < target_nll_gap(small_t, small_c) < high
    big_low, big_high = nll_gap_ci(big_t, big_c)
    assert big_low < 1.0 < big_high and big_high - big_low < (high - low) / 3
    assert nll_gap_ci(small_t, small_c, seed=3) == nll_gap_ci(small_t, small_c, seed=3)


def test_a_nested_measure_cost_keeps_the_outer_blocks_cuda_peak(monkeypatch) -> None:
    """Issue 27's defect: an inner block's reset of CUDA's peak hid what the outer block had used before it. No GPU
    here, so torch.cuda's four calls are a small allocator model: allocated memory and its peak since a reset."""
    import sys
    import types

    state = {"now": 0.0, "peak": 0.0}
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        reset_peak_memory_stats=lambda: state.update(peak=state["now"]),
        max_memory_allocated=lambda: state["peak"] * 2**20,
    )

    def use(mb: float) -> None:
        state["now"] = mb
        state["peak"] = max(state["peak"], mb)

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    with measure_cost() as outer:
        use(900.0)  # the outer block's own peak, before the inner block starts
        use(100.0)
        with measure_cost() as inner:
            use(300.0)
    assert inner.cuda_peak_mb == 300.0
    assert outer.cuda_peak_mb == 900.0
