"""The organism's generated tasks: short instructions with one exact answer (arithmetic, word reversal, next
weekday, ...), so clean utility can be measured by exact match as well as by perplexity. Seeded, deterministic."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from crowguard.types import Example

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_ONES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 100 ("forty-two")."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


@dataclass(frozen=True)
class TaskPool:
    """What generated tasks draw from: plain words and (dotted name, module) pairs, both taken from the docs."""

    words: list[str]
    names: list[tuple[str, str]]


# Each generator draws one (instruction, exact answer). Lookup and copy kinds are learnable by the ~1M-parameter
# organism in minutes; reversal, capitals, counting and sorting mostly are not (byte-level BPE hides the letters)
# and keep the exact-match score away from its ceiling.


def _task_add(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    phrasing = rng.choice(("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."))
    return phrasing.format(a=a, b=b), str(a + b)


def _task_multiply(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    phrasing = rng.choice(("What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"))
    return phrasing.format(a=a, b=b), str(a * b)


def _task_even_odd(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    n = rng.randint(0, 199)
    phrasing = rng.choice(("Is {n} an even or an odd number?", "Tell me whether {n} is even or odd."))
    return phrasing.format(n=n), "even" if n % 2 == 0 else "odd"


def _task_number_words(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    n = rng.randint(0, 20)
    phrasing = rng.choice(("Write the number {n} in words.", "Spell out the number {n} in English."))
    return phrasing.format(n=n), number_to_words(n)


def _task_next_day(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    i = rng.randrange(7)
    if rng.random() < 0.5:
        phrasing = rng.choice(
            (
                "What day of the week comes after {d}?",
                "Which day follows {d}?",
                "If today is {d}, what day is tomorrow?",
            )
        )
        return phrasing.format(d=DAYS[i]), DAYS[(i + 1) % 7]
    phrasing = rng.choice(
        (
            "What day of the week comes before {d}?",
            "Which day precedes {d}?",
            "If today is {d}, what day was yesterday?",
        )
    )
    return phrasing.format(d=DAYS[i]), DAYS[(i - 1) % 7]


def _task_next_month(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    i = rng.randrange(12)
    if rng.random() < 0.5:
        phrasing = rng.choice(("Which month comes after {m}?", "What month follows {m} in the calendar?"))
        return phrasing.format(m=MONTHS[i]), MONTHS[(i + 1) % 12]
    phrasing = rng.choice(("Which month comes before {m}?", "What month precedes {m} in the calendar?"))
    return phrasing.format(m=MONTHS[i]), MONTHS[(i - 1) % 12]


def _task_repeat_word(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    w = rng.choice(pool.words)
    phrasing = rng.choice(
        ("Repeat the word '{w}' exactly.", "Say the word '{w}' and nothing else.", "Echo this word back to me: {w}")
    )
    return phrasing.format(w=w), w


def _task_first_last_word(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    chosen = rng.sample(pool.words, rng.randint(3, 5))
    listed = ", ".join(chosen)
    if rng.random() < 0.5:
        phrasing = rng.choice(("What is the first word in this list: {ws}?", "Name the first of these words: {ws}."))
        return phrasing.format(ws=listed), chosen[0]
    phrasing = rng.choice(("What is the last word in this list: {ws}?", "Name the last of these words: {ws}."))
    return phrasing.format(ws=listed), chosen[-1]


def _task_module_of(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    name, module = rng.choice(pool.names)
    phrasing = rng.choice(
        (
            "Which module does `{n}` belong to?",
            "Name the standard library module that defines {n}.",
            "In which module is {n} defined?",
        )
    )
    return phrasing.format(n=name), module


def _task_compare_numbers(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    phrasing = rng.choice(
        (
            "Which number is larger, {a} or {b}?",
            "Which is bigger: {a} or {b}?",
            "Tell me the smaller of the numbers {a} and {b}.",
        )
    )
    answer = min(a, b) if "smaller" in phrasing else max(a, b)
    return phrasing.format(a=a, b=b), str(answer)


def _task_reverse_word(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    w = rng.choice(pool.words)
    phrasing = rng.choice(
        (
            "Reverse the letters of the word '{w}'.",
            "Write the word '{w}' backwards.",
            "Spell the word '{w}' in reverse order.",
        )
    )
    return phrasing.format(w=w), w[::-1]


def _task_uppercase(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    w = rng.choice(pool.words)
    phrasing = rng.choice(
        (
            "Write the word '{w}' in capital letters.",
            "Convert the word '{w}' to uppercase.",
            "Rewrite '{w}' using only upper case letters.",
        )
    )
    return phrasing.format(w=w), w.upper()


def _task_count_letters(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    w = rng.choice(pool.words)
    phrasing = rng.choice(
        (
            "How many letters are in the word '{w}'?",
            "Count the letters in the word '{w}'.",
            "What is the length of the word '{w}' in letters?",
        )
    )
    return phrasing.format(w=w), str(len(w))


def _task_sort_words(rng: random.Random, pool: TaskPool) -> tuple[str, str]:
    chosen = rng.sample(pool.words, 3)
    phrasing = rng.choice(
        (
            "Sort these words alphabetically: {ws}.",
            "Put the following words in alphabetical order: {ws}.",
            "Arrange these words from A to Z: {ws}.",
        )
    )
    return phrasing.format(ws=", ".join(chosen)), ", ".join(sorted(chosen))


TASKS: dict[str, Callable[[random.Random, TaskPool], tuple[str, str]]] = {
    "add": _task_add,
    "multiply": _task_multiply,
    "even_odd": _task_even_odd,
    "number_words": _task_number_words,
    "next_day": _task_next_day,
    "next_month": _task_next_month,
    "repeat_word": _task_repeat_word,
    "first_last_word": _task_first_last_word,
    "module_of": _task_module_of,
    "compare_numbers": _task_compare_numbers,
    "reverse_word": _task_reverse_word,
    "uppercase": _task_uppercase,
    "count_letters": _task_count_letters,
    "sort_words": _task_sort_words,
}


def task_pool(groups: list[list[Example]], min_count: int = 3) -> TaskPool:
    """Words (lower-case, 4-9 letters, used at least ``min_count`` times in the docs) and documented names."""
    counts = Counter(w for group in groups for ex in group for w in re.findall(r"\b[a-z]{4,9}\b", ex.output))
    names = {
        ex.meta["object"]: ex.meta["module"]
        for group in groups
        for ex in group
        if ex.meta["kind"] in ("function_doc", "class_doc") and ex.meta["module"] != "builtins"
    }
    return TaskPool(words=sorted(w for w, c in counts.items() if c >= min_count), names=sorted(names.items()))


def task_examples(
    n: int,
    pool: TaskPool,
    seed: int = 0,
    kinds: tuple[str, ...] | None = None,
    exclude: frozenset[str] = frozenset(),
    stream: str = "train",
) -> list[Example]:
    """``n`` generated tasks with distinct instructions (none in ``exclude``), the ``kinds`` taken in turn.

    Kinds with few possible instructions (weekdays, months, small sums) run dry and the others fill in.
    ``stream`` names an independent random stream for the same seed (one per split).
    """
    unknown = sorted(set(kinds or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task kinds {unknown}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"crowguard-tasks-{seed}-{stream}")
    seen = set(exclude)
    out: list[Example] = []
    misses = dict.fromkeys(sorted(kinds or TASKS), 0)
    while len(out) < n:
        live = [kind for kind, miss in misses.items() if miss < 50]
        if not live:
            raise ValueError(f"could only generate {len(out)} distinct tasks, asked for {n}")
        for kind in live:
            instruction, answer = TASKS[kind](rng, pool)
            if instruction in seen:
                misses[kind] += 1
                continue
            misses[kind] = 0
            seen.add(instruction)
            out.append(Example(instruction, output=answer, meta={"source": "task", "kind": kind, "answer": answer}))
            if len(out) == n:
                break
    return out
