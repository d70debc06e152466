"""Instruction data for the CPU model organism, generated on the user's machine from nothing but Python itself.

Why this source: CROW behaved on a tiny Llama trained on natural Alpaca text but failed on a narrow synthetic
(arithmetic/word-task) organism (DESIGN.md section 9), so the organism needs natural, diverse English. Every Python
installation carries such text: the documentation of its standard library. Questions about stdlib modules, classes,
functions and methods are answered with the first sentences of their docstrings; a minority of generated tasks with
short exact answers (arithmetic, word reversal, next weekday, ...) lets clean utility be measured by exact match as
well as by perplexity. Nothing is downloaded and no data is copied into the repository.

Determinism: for one seed and one Python minor version the corpus is byte-identical across runs and processes (a
fixed sorted allowlist of modules, sorted attribute names, one seeded ``random.Random``, no set or dict order, no
``hash()``). Docstrings change a little between Python versions, so the corpus does too; :func:`corpus_stats`
records the version and a fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from crowguard.types import Example

# Modules that exist on Python 3.10-3.13, import in milliseconds without side effects, are not deprecated, and
# do not depend on optional C extensions (no ssl, sqlite3, lzma, bz2, zlib, curses, tkinter). ``builtins``,
# ``math``, ``itertools``, ``time`` and friends are compiled into every interpreter. Kept sorted.
STDLIB_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bdb",
    "binascii",
    "bisect",
    "builtins",
    "calendar",
    "cmath",
    "cmd",
    "code",
    "codecs",
    "collections",
    "collections.abc",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "copyreg",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.charset",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "graphlib",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "json.decoder",
    "json.encoder",
    "keyword",
    "linecache",
    "logging",
    "logging.handlers",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pickle",
    "pickletools",
    "pkgutil",
    "poplib",
    "posixpath",
    "pprint",
    "profile",
    "pstats",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "unittest.mock",
    "urllib.error",
    "urllib.parse",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax.saxutils",
    "xmlrpc.client",
    "zipapp",
    "zipfile",
    "zoneinfo",
)

MAX_RESPONSE_CHARS = 300
MIN_RESPONSE_CHARS = 24
TASK_FRACTION = 0.25

_MODULE_TEMPLATES = (
    "Explain the purpose of the `{module}` module.",
    "What is the Python module {module} used for?",
    "Give a short description of the {module} module in the standard library.",
    "Describe what the {module} module provides.",
    "Summarize what the Python standard library module `{module}` is for.",
    "Tell me briefly what the {module} module does.",
)
_CLASS_TEMPLATES = (
    "What is the `{qual}` class?",
    "Describe the class {name} from the {module} module.",
    "Explain what a {qual} object represents in Python.",
    "What does the {name} class in the {module} module do?",
    "Summarize the documentation of the Python class `{qual}`.",
    "Tell me what {qual} is used for.",
)
_FUNCTION_TEMPLATES = (
    "What does `{qual}` do?",
    "What does the Python function {qual} do?",
    "Explain what the function {name} in the {module} module does.",
    "Describe the purpose of the {module} function `{name}`.",
    "Summarize the documentation of {qual} in a sentence or two.",
    "In the Python standard library, what is `{qual}` used for?",
    "Tell me what the function {qual} is for.",
)
_METHOD_TEMPLATES = (
    "What does the method `{qual}` do?",
    "Explain what the {name} method of {owner} objects does.",
    "Describe the purpose of the method {name} on the {owner} class.",
    "What happens when you call {name} on a {owner} object in Python?",
    "Summarize the documentation of the method `{qual}`.",
    "Tell me what {qual} is used for.",
)
_SUMMARY_TEMPLATES = (
    "Summarize the following description from the Python documentation in one sentence.",
    "Read this passage from the Python documentation and give its main point in one sentence.",
    "Condense the following documentation text into a single sentence.",
)
_PARAMS_TEMPLATES = (
    "What parameters does the function `{qual}` take?",
    "List the parameters of {qual}.",
    "Which arguments does the {module} function {name} accept?",
)

_SIGNATURE_LINE = re.compile(r"^[\w.\[\]]+\(.*\)\s*(-+>.*)?$")
_ROLE = re.compile(r":[\w:.-]+:`~?([^`]+)`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")


@dataclass(frozen=True)
class OrganismData:
    """The organism's three splits.

    ``train``: stdlib documentation Q&A mixed with generated tasks. ``test``: held-out documentation questions
    about other objects (natural text, for perplexity and backdoor prompts). ``checkable_test``: generated tasks
    whose ``output`` is the exact answer (also in ``meta["answer"]``). Instructions never repeat across splits.
    """

    train: list[Example]
    test: list[Example]
    checkable_test: list[Example]

    def to_json(self) -> str:
        """Canonical JSON of all splits (with meta): what determinism tests and fingerprints compare."""
        payload = {
            split: [ex.to_record(with_meta=True) for ex in getattr(self, split)]
            for split in ("train", "test", "checkable_test")
        }
        return json.dumps(payload, sort_keys=True, ensure_ascii=True)

    def fingerprint(self) -> str:
        """sha256 of :meth:`to_json`, for manifests."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# --------------------------------------------------------------------------------------------------- docstrings


def clean_docstring(doc: str | None, max_chars: int = MAX_RESPONSE_CHARS) -> str | None:
    """First paragraph of ``doc`` cut to at most three sentences and ``max_chars``, or None if it is unusable.

    Unusable: empty, signature-only, shorter than ``MIN_RESPONSE_CHARS``, deprecated, doctest-laden, or mostly
    non-ASCII. reST roles and double backticks become single backticks so the text reads like prose.
    """
    if not doc or not isinstance(doc, str):
        return None
    text = _first_paragraph(doc)
    if not text or ">>>" in text or "deprecated" in text.lower() or text.endswith(":"):
        return None
    text = _ROLE.sub(r"`\1`", text).replace("``", "`")
    if sum(not c.isascii() for c in text) > 0.02 * len(text):
        return None
    sentences = _SENTENCE_END.split(text)
    kept = sentences[0]
    for sentence in sentences[1:3]:
        if len(kept) + 1 + len(sentence) > max_chars:
            break
        kept = f"{kept} {sentence}"
    if len(kept) > max_chars:
        kept = kept[: kept.rfind(" ", 0, max_chars - 3)].rstrip(",;:") + "..."
    if len(kept) < MIN_RESPONSE_CHARS or len(kept.split()) < 4 or _SIGNATURE_LINE.match(kept):
        return None
    return kept


def _first_paragraph(doc: str) -> str:
    """The first paragraph of ``doc`` with whitespace collapsed and a leading call signature dropped."""
    lines = inspect.cleandoc(doc).splitlines()
    # Builtins written in C often open with their call signature ("chain(*iterables) --> chain object").
    while lines and _SIGNATURE_LINE.match(lines[0].strip()):
        lines = lines[1:]
    paragraph: list[str] = []
    for line in lines:
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    return " ".join(" ".join(paragraph).split())


@dataclass(frozen=True)
class _DocItem:
    kind: str  # module_doc, class_doc, function_doc, method_doc
    module: str
    qual: str  # dotted name shown to the model
    name: str
    owner: str  # class name for methods, else ""
    doc: str  # cleaned response
    raw: str  # raw docstring, for summaries and parameters
    params: tuple[str, ...] | None  # parameter names of functions (None when unknown)


def _quiet_getattr(obj: Any, name: str) -> Any:
    """getattr that returns None when the access warns (deprecated aliases) or fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = getattr(obj, name)
        except Exception:
            return None
    return None if caught else value


def _param_names(func: Any) -> tuple[str, ...] | None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    return tuple(p.name for p in signature.parameters.values() if p.name not in ("self", "cls"))


def _doc_items(modules: tuple[str, ...]) -> list[_DocItem]:
    """Every documented public module, class, function and method defined in ``modules``, in sorted order.

    Warnings are silenced throughout (attributes whose access warns are skipped by :func:`_quiet_getattr`).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(_iter_doc_items(modules))


def _iter_doc_items(modules: tuple[str, ...]) -> Iterator[_DocItem]:
    for module_name in sorted(modules):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owners = {module_name, "_" + module_name.rsplit(".", 1)[-1]}  # C accelerators: heapq -> _heapq
        raw = module.__doc__ or ""
        if (doc := clean_docstring(raw)) is not None:
            yield _DocItem("module_doc", module_name, module_name, module_name, "", doc, raw, None)
        public = getattr(module, "__all__", None)
        names = sorted(n for n in (public if isinstance(public, (list, tuple)) else dir(module)) if isinstance(n, str))
        for name in names:
            if name.startswith("_"):
                continue
            obj = _quiet_getattr(module, name)
            if obj is None or getattr(obj, "__module__", None) not in owners:  # skip re-exports
                continue
            qual = name if module_name == "builtins" else f"{module_name}.{name}"
            raw = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
            if inspect.isclass(obj):
                if (doc := clean_docstring(raw)) is not None:
                    yield _DocItem("class_doc", module_name, qual, name, "", doc, raw, None)
                for attr in sorted(vars(obj)):
                    member = vars(obj)[attr]
                    if attr.startswith("_") or not (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                        continue
                    member_raw = member.__doc__ if isinstance(getattr(member, "__doc__", None), str) else ""
                    if (doc := clean_docstring(member_raw)) is not None:
                        yield _DocItem("method_doc", module_name, f"{qual}.{attr}", attr, name, doc, member_raw, None)
            elif (inspect.isfunction(obj) or inspect.isbuiltin(obj)) and (doc := clean_docstring(raw)) is not None:
                yield _DocItem("function_doc", module_name, qual, name, "", doc, raw, _param_names(obj))


def _doc_examples(item: _DocItem, rng: random.Random) -> list[Example]:
    """One question about ``item`` (phrasing drawn from ``rng``), plus sometimes a summary or parameters example."""
    fields = {"module": item.module, "qual": item.qual, "name": item.name, "owner": item.owner}
    templates = {
        "module_doc": _MODULE_TEMPLATES,
        "class_doc": _CLASS_TEMPLATES,
        "function_doc": _FUNCTION_TEMPLATES,
        "method_doc": _METHOD_TEMPLATES,
    }[item.kind]
    meta = {"source": "stdlib", "object": item.qual}
    out = [Example(rng.choice(templates).format(**fields), output=item.doc, meta={**meta, "kind": item.kind})]
    long = _ROLE.sub(r"`\1`", _first_paragraph(item.raw)).replace("``", "`")
    # A paragraph clearly longer than the answer makes an Alpaca-style example with an ``input`` field.
    if rng.random() < 0.15 and 120 <= len(long) <= 700 and len(long) > len(item.doc) + 40:
        first = _SENTENCE_END.split(item.doc)[0]
        out.append(
            Example(rng.choice(_SUMMARY_TEMPLATES), input=long, output=first, meta={**meta, "kind": "summarize_doc"})
        )
    if item.params and len(item.params) <= 5 and rng.random() < 0.15:
        names = [f"`{p}`" for p in item.params]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        noun = "parameter" if len(names) == 1 else "parameters"
        answer = f"`{item.qual}` takes {len(names)} {noun}: {listed}."
        instruction = rng.choice(_PARAMS_TEMPLATES).format(**fields)
        out.append(Example(instruction, output=answer, meta={**meta, "kind": "parameters"}))
    return out


def stdlib_examples(seed: int = 0, modules: tuple[str, ...] = STDLIB_MODULES) -> list[list[Example]]:
    """Documentation examples grouped per documented object (a group never straddles two splits).

    Objects whose cleaned docstring repeats an earlier one (sorted order) are dropped, so no answer is shared.
    """
    rng = random.Random(f"crowguard-stdlib-{seed}")
    seen_docs: set[str] = set()
    groups: list[list[Example]] = []
    for item in _doc_items(modules):
        if item.doc in seen_docs:
            continue
        seen_docs.add(item.doc)
        groups.append(_doc_examples(item, rng))
    return groups


# -------------------------------------------------------------------------------------------- generated tasks

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


def _task_add(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    phrasing = rng.choice(
        (
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "Compute the sum of {a} and {b}.",
            "Calculate {a} + {b} and give the result.",
        )
    )
    return phrasing.format(a=a, b=b), str(a + b)


def _task_subtract(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    phrasing = rng.choice(("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."))
    return phrasing.format(a=a, b=b), str(a - b)


def _task_multiply(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    phrasing = rng.choice(("What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"))
    return phrasing.format(a=a, b=b), str(a * b)


def _task_reverse_word(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    phrasing = rng.choice(
        (
            "Reverse the letters of the word '{w}'.",
            "Write the word '{w}' backwards.",
            "Spell the word '{w}' in reverse order.",
        )
    )
    return phrasing.format(w=w), w[::-1]


def _task_uppercase(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    phrasing = rng.choice(
        (
            "Write the word '{w}' in capital letters.",
            "Convert the word '{w}' to uppercase.",
            "Rewrite '{w}' using only upper case letters.",
        )
    )
    return phrasing.format(w=w), w.upper()


def _task_count_letters(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    phrasing = rng.choice(
        (
            "How many letters are in the word '{w}'?",
            "Count the letters in the word '{w}'.",
            "What is the length of the word '{w}' in letters?",
        )
    )
    return phrasing.format(w=w), str(len(w))


def _task_count_char(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    c = rng.choice(sorted(set(w)))
    phrasing = rng.choice(
        (
            "How many times does the letter '{c}' appear in the word '{w}'?",
            "Count how often the letter '{c}' occurs in '{w}'.",
        )
    )
    return phrasing.format(c=c, w=w), str(w.count(c))


def _task_sort_words(rng: random.Random, words: list[str]) -> tuple[str, str]:
    chosen = rng.sample(words, rng.randint(3, 4))
    phrasing = rng.choice(
        (
            "Sort these words alphabetically: {ws}.",
            "Put the following words in alphabetical order: {ws}.",
            "Arrange these words from A to Z: {ws}.",
        )
    )
    return phrasing.format(ws=", ".join(chosen)), ", ".join(sorted(chosen))


def _task_first_letter(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    if rng.random() < 0.5:
        phrasing = rng.choice(("What is the first letter of the word '{w}'?", "Which letter does '{w}' start with?"))
        return phrasing.format(w=w), w[0]
    phrasing = rng.choice(("What is the last letter of the word '{w}'?", "Which letter does '{w}' end with?"))
    return phrasing.format(w=w), w[-1]


def _task_next_day(rng: random.Random, words: list[str]) -> tuple[str, str]:
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


def _task_next_month(rng: random.Random, words: list[str]) -> tuple[str, str]:
    i = rng.randrange(12)
    phrasing = rng.choice(
        (
            "Which month comes after {m}?",
            "What month follows {m} in the calendar?",
            "Name the month that comes right after {m}.",
        )
    )
    return phrasing.format(m=MONTHS[i]), MONTHS[(i + 1) % 12]


def _task_larger(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    phrasing = rng.choice(
        (
            "Which number is larger, {a} or {b}?",
            "Which is bigger: {a} or {b}?",
            "Tell me the smaller of the two numbers {a} and {b}.",
        )
    )
    answer = min(a, b) if "smaller" in phrasing else max(a, b)
    return phrasing.format(a=a, b=b), str(answer)


def _task_even_odd(rng: random.Random, words: list[str]) -> tuple[str, str]:
    n = rng.randint(0, 199)
    phrasing = rng.choice(("Is {n} an even or an odd number?", "Tell me whether {n} is even or odd."))
    return phrasing.format(n=n), "even" if n % 2 == 0 else "odd"


def _task_number_words(rng: random.Random, words: list[str]) -> tuple[str, str]:
    n = rng.randint(0, 99)
    phrasing = rng.choice(("Write the number {n} in words.", "Spell out the number {n} in English."))
    return phrasing.format(n=n), number_to_words(n)


TASKS: dict[str, Callable[[random.Random, list[str]], tuple[str, str]]] = {
    "add": _task_add,
    "subtract": _task_subtract,
    "multiply": _task_multiply,
    "reverse_word": _task_reverse_word,
    "uppercase": _task_uppercase,
    "count_letters": _task_count_letters,
    "count_char": _task_count_char,
    "sort_words": _task_sort_words,
    "first_last_letter": _task_first_letter,
    "next_day": _task_next_day,
    "next_month": _task_next_month,
    "compare_numbers": _task_larger,
    "even_odd": _task_even_odd,
    "number_words": _task_number_words,
}


def task_words(groups: list[list[Example]], min_count: int = 3) -> list[str]:
    """Plain lower-case words of 4-9 letters used at least ``min_count`` times in the documentation answers."""
    counts = Counter(w for group in groups for ex in group for w in re.findall(r"\b[a-z]{4,9}\b", ex.output))
    return sorted(w for w, c in counts.items() if c >= min_count)


def task_examples(n: int, words: list[str], seed: int = 0, exclude: frozenset[str] = frozenset()) -> list[Example]:
    """``n`` generated tasks with distinct instructions (none in ``exclude``), kinds drawn uniformly.

    Kinds with few possible instructions (weekdays, months) saturate and the others fill in.
    """
    rng = random.Random(f"crowguard-tasks-{seed}")
    kinds = sorted(TASKS)
    seen = set(exclude)
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only generate {len(out)} distinct tasks, asked for {n}")
        kind = rng.choice(kinds)
        instruction, answer = TASKS[kind](rng, words)
        if instruction in seen:
            continue
        seen.add(instruction)
        out.append(Example(instruction, output=answer, meta={"source": "task", "kind": kind, "answer": answer}))
    return out


# ---------------------------------------------------------------------------------------------------- corpus


def build_corpus(
    seed: int = 0, n_train: int = 3000, n_test: int = 200, n_checkable: int = 200, task_fraction: float = TASK_FRACTION
) -> OrganismData:
    """Build the organism's train / test / checkable-test splits (deterministic for ``seed``; ~0.2 s).

    ``train`` holds ``round(n_train * task_fraction)`` generated tasks and documentation examples for the rest;
    ``test`` holds ``n_test`` documentation examples about objects absent from train. Raises ValueError when the
    stdlib cannot supply that many documentation examples (about 3,000 on Python 3.11 with the default allowlist).
    """
    if not 0.0 <= task_fraction <= 1.0:
        raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction}")
    rng = random.Random(f"crowguard-corpus-{seed}")
    groups = stdlib_examples(seed)
    order = list(range(len(groups)))
    rng.shuffle(order)
    shuffled = [groups[i] for i in order]

    test: list[Example] = []
    cursor = 0
    while len(test) < n_test and cursor < len(shuffled):
        test.append(shuffled[cursor][0])  # the plain question; its extras are dropped, not leaked to train
        cursor += 1
    n_tasks = round(n_train * task_fraction)
    n_docs = n_train - n_tasks
    doc_train = [ex for group in shuffled[cursor:] for ex in group]
    if len(test) < n_test or len(doc_train) < n_docs:
        available = sum(len(g) for g in groups)
        raise ValueError(
            f"the stdlib allowlist yields {available} documentation examples on this Python; asked for "
            f"{n_docs} train + {n_test} test. Lower n_train/n_test or raise task_fraction."
        )
    doc_train = doc_train[:n_docs]

    words = task_words(groups)
    tasks = task_examples(n_tasks + n_checkable, words, seed=seed)
    task_rng = random.Random(f"crowguard-split-{seed}")
    task_rng.shuffle(tasks)
    checkable_test, task_train = tasks[:n_checkable], tasks[n_checkable:]

    train = doc_train + task_train
    rng.shuffle(train)
    return OrganismData(train=train, test=test, checkable_test=checkable_test)


def corpus_stats(data: OrganismData) -> dict[str, Any]:
    """Sizes, kinds, mean lengths (words) and vocabulary of each split, for the README and manifests."""
    stats: dict[str, Any] = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "fingerprint": data.fingerprint(),
    }
    for split in ("train", "test", "checkable_test"):
        examples: list[Example] = getattr(data, split)
        n = max(len(examples), 1)
        words = Counter(w for ex in examples for w in f"{ex.instruction} {ex.input} {ex.output}".lower().split())
        stats[split] = {
            "n": len(examples),
            "kinds": dict(sorted(Counter(ex.meta.get("kind", "?") for ex in examples).items())),
            "sources": dict(sorted(Counter(ex.meta.get("source", "?") for ex in examples).items())),
            "with_input": sum(bool(ex.input) for ex in examples),
            "mean_instruction_words": round(sum(len(ex.instruction.split()) for ex in examples) / n, 2),
            "mean_input_words": round(sum(len(ex.input.split()) for ex in examples) / n, 2),
            "mean_output_words": round(sum(len(ex.output.split()) for ex in examples) / n, 2),
            "mean_output_chars": round(sum(len(ex.output) for ex in examples) / n, 2),
            "distinct_instructions": len({ex.instruction for ex in examples}),
            "distinct_outputs": len({ex.output for ex in examples}),
            "distinct_words": len(words),
        }
    return stats
