"""Instruction data for the CPU model organism, generated on the user's machine from nothing but Python itself.

Why this source: CROW behaved on a tiny Llama trained on natural Alpaca text but failed on a narrow synthetic
(arithmetic/word-task) organism (docs/design.md), so the organism needs natural, diverse English. Every Python
installation carries such text: the documentation of its standard library. Questions about stdlib modules, classes,
functions and methods are answered with the first sentences of their docstrings; a minority of generated tasks with
short exact answers (arithmetic, word reversal, next weekday, ...) lets clean utility be measured by exact match as
well as by perplexity. Nothing is downloaded and no data is copied into the repository.

Determinism: for one seed and one Python minor version the corpus is byte-identical across runs and processes (a
fixed sorted allowlist of modules, sorted attribute names, seeded ``random.Random`` streams, no set or dict order,
no ``hash()``). The docstrings are read in a pristine child interpreter, because libraries monkeypatch the stdlib
when imported (torch, transformers). Docstrings change a little between Python versions, so the corpus does too;
:func:`corpus_stats` records the version and a fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import random
import re
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crowguard.types import Example

# Modules that exist on Python 3.10-3.13 (none of the 3.12/3.13 removals), import in milliseconds without side
# effects, are not deprecated, and do not need optional C extensions (no ssl, sqlite3, lzma, bz2, zlib, curses,
# tkinter). The few C modules (``builtins``, ``math``, ``itertools``, ``sys``, ``time``, ``array``, ...) are built
# with every CPython. Platform-specific modules (os, socket, signal, subprocess, locale) are left out. Kept sorted.
STDLIB_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "atexit",
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
    "codeop",
    "collections",
    "collections.abc",
    "colorsys",
    "compileall",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
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
    "email.contentmanager",
    "email.feedparser",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.iterators",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "faulthandler",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
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
    "http.server",
    "imaplib",
    "importlib",
    "importlib.abc",
    "importlib.machinery",
    "importlib.metadata",
    "importlib.util",
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
    "marshal",
    "math",
    "mimetypes",
    "modulefinder",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "posixpath",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pyclbr",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "symtable",
    "sys",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "unittest.mock",
    "urllib.error",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "wsgiref.headers",
    "wsgiref.simple_server",
    "wsgiref.util",
    "xml.dom.minidom",
    "xml.dom.pulldom",
    "xml.etree.ElementTree",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xml.sax.xmlreader",
    "xmlrpc.client",
    "zipapp",
    "zipfile",
    "zipimport",
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
    "Explain what {article} {qual} object represents in Python.",
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
    "What happens when you call {name} on {owner_article} {owner} object in Python?",
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
_SIGNATURE_PREFIX = re.compile(r"^[\w.]+\(.*?\)\s*[:-]")  # "enable(file=sys.stderr): enable the handler"
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
    """The opening prose of ``doc``, at most three sentences and ``max_chars``, or None if it is unusable.

    Unusable: empty, signature-only, shorter than ``MIN_RESPONSE_CHARS``, deprecated, doctest-laden, or mostly
    non-ASCII. reST roles and double backticks become single backticks so the text reads like prose.
    """
    if not doc or not isinstance(doc, str) or "deprecated" in doc.lower():
        return None
    paragraphs = _prose_paragraphs(doc)
    if not paragraphs or paragraphs[0].endswith(":") or _SIGNATURE_PREFIX.match(paragraphs[0]):
        return None
    text = " ".join(paragraphs)
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


def _prose_paragraphs(doc: str, limit: int = 2) -> list[str]:
    """Up to ``limit`` leading paragraphs of ``doc`` that read as prose, whitespace collapsed.

    A leading call signature is dropped; the first paragraph that is indented, a list, a heading ("Args:") or a
    doctest ends the prose, since parameter tables and code are not natural language.
    """
    lines = inspect.cleandoc(doc).splitlines()
    # Builtins written in C often open with their call signature ("chain(*iterables) --> chain object").
    while lines and _SIGNATURE_LINE.match(lines[0].strip()):
        lines = lines[1:]
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    paragraphs = []
    for block in blocks[:limit]:
        if not block or any(line[:1].isspace() or line.lstrip()[:1] in "-*+|=>" for line in block):
            break
        text = " ".join(" ".join(block).split())
        if ">>>" in text or (text.endswith(":") and paragraphs):
            break
        paragraphs.append(_ROLE.sub(r"`\1`", text).replace("``", "`"))
    return paragraphs


@dataclass(frozen=True)
class _DocItem:
    kind: str  # module_doc, class_doc, function_doc, method_doc
    module: str
    qual: str  # dotted name shown to the model
    name: str
    owner: str  # class name for methods, else ""
    doc: str  # cleaned response
    raw: str  # raw docstring, for summaries
    params: tuple[str, ...] | None  # parameter names of functions (None when unknown)


def _walk_stdlib(modules: list[str]) -> list[list[Any]]:
    """``[kind, module, qual, name, owner, docstring, params]`` for every public documented object of ``modules``.

    Runs in a fresh ``python -I -S`` child (see :func:`_stdlib_records`), so it must be self-contained: stdlib
    imports only, no module-level names. Objects are visited in sorted order; attributes whose access warns
    (deprecated aliases) are skipped; re-exports are skipped (the defining module documents them) except from a
    package's own private submodules or C accelerator (``heapq.heappush`` lives in ``_heapq``).
    """
    import importlib
    import inspect
    import warnings

    def quiet_getattr(obj, name):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                value = getattr(obj, name)
            except Exception:
                return None
        return None if caught else value

    def param_names(func):
        try:
            return [p for p in inspect.signature(func).parameters if p not in ("self", "cls")]
        except (TypeError, ValueError):
            return None

    def doc_of(obj):
        doc = getattr(obj, "__doc__", None)
        return doc if isinstance(doc, str) else ""

    records: list[list[Any]] = []
    with warnings.catch_warnings():  # a fallback in-process walk must not change the caller's filters
        warnings.simplefilter("ignore")
        for module_name in sorted(modules):
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            accelerator = "_" + module_name.rsplit(".", 1)[-1]
            records.append(["module_doc", module_name, module_name, module_name, "", doc_of(module), None])
            public = getattr(module, "__all__", None)
            names = public if isinstance(public, (list, tuple)) else dir(module)
            for name in sorted(n for n in names if isinstance(n, str) and not n.startswith("_")):
                obj = quiet_getattr(module, name)
                home = getattr(obj, "__module__", None)
                if obj is None or not isinstance(home, str):
                    continue
                if home not in (module_name, accelerator) and not home.startswith(module_name + "."):
                    continue
                qual = name if module_name == "builtins" else f"{module_name}.{name}"
                if inspect.isclass(obj):
                    records.append(["class_doc", module_name, qual, name, "", doc_of(obj), None])
                    members = vars(obj)
                    for attr in sorted(members):
                        member = members[attr]
                        if attr.startswith("_") or not (
                            inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                        ):
                            continue
                        records.append(["method_doc", module_name, f"{qual}.{attr}", attr, name, doc_of(member), None])
                elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    records.append(["function_doc", module_name, qual, name, "", doc_of(obj), param_names(obj)])
    return records


@functools.lru_cache(maxsize=4)
def _stdlib_records(modules: tuple[str, ...]) -> tuple[tuple[Any, ...], ...]:
    """:func:`_walk_stdlib` run in a pristine child interpreter (``-I -S``: no site-packages, no env, no cwd).

    Why a child: libraries the caller has imported monkeypatch the stdlib (transformers adds
    ``logging.Logger.warning_once``, torch replaces ``inspect.getfile``), which would make the corpus depend on
    what else happens to be imported. Walking in-process remains the fallback when the source is unavailable.
    """
    try:
        source = inspect.getsource(_walk_stdlib)
    except (OSError, TypeError):
        source = ""
    if not source or not sys.executable:
        warnings.warn("walking the stdlib in-process: the corpus may depend on imported libraries", stacklevel=3)
        return tuple(tuple(r) for r in _walk_stdlib(list(modules)))
    program = (
        "import json, sys\nfrom typing import Any\n"
        + source
        + "\nsys.stdout.write(json.dumps(_walk_stdlib(json.loads(sys.stdin.read()))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", program],
        input=json.dumps(list(modules)),
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=True,
        timeout=60,
    )
    return tuple(tuple(r) for r in json.loads(result.stdout))


def _doc_items(modules: tuple[str, ...]) -> list[_DocItem]:
    """Every public module, class, function and method of ``modules`` whose docstring survives cleaning."""
    items = []
    for kind, module, qual, name, owner, raw, params in _stdlib_records(tuple(sorted(modules))):
        if (doc := clean_docstring(raw)) is not None:
            items.append(_DocItem(kind, module, qual, name, owner, doc, raw, tuple(params) if params else None))
    return items


def _doc_examples(item: _DocItem, rng: random.Random) -> list[Example]:
    """One question about ``item`` (phrasing drawn from ``rng``), plus sometimes a summary or parameters example."""
    fields = {
        "module": item.module,
        "qual": item.qual,
        "name": item.name,
        "owner": item.owner,
        "article": "an" if item.qual[:1].lower() in "aeiou" else "a",
        "owner_article": "an" if item.owner[:1].lower() in "aeiou" else "a",
    }
    templates = {
        "module_doc": _MODULE_TEMPLATES,
        "class_doc": _CLASS_TEMPLATES,
        "function_doc": _FUNCTION_TEMPLATES,
        "method_doc": _METHOD_TEMPLATES,
    }[item.kind]
    meta = {"source": "stdlib", "object": item.qual, "module": item.module}
    out = [Example(rng.choice(templates).format(**fields), output=item.doc, meta={**meta, "kind": item.kind})]
    long = " ".join(_prose_paragraphs(item.raw, limit=3))
    first = _SENTENCE_END.split(item.doc)[0]
    # Documentation clearly longer than its first sentence makes an Alpaca-style example with an ``input`` field.
    if 160 <= len(long) <= 800 and len(long) > len(first) + 80 and rng.random() < 0.3:
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


# ---------------------------------------------------------------------------------------------------- corpus


def build_corpus(
    seed: int = 0,
    n_train: int = 3000,
    n_test: int = 200,
    n_checkable: int = 200,
    task_fraction: float = TASK_FRACTION,
    task_kinds: tuple[str, ...] | None = None,
) -> OrganismData:
    """Build the organism's train / test / checkable-test splits (deterministic for ``seed``; ~0.4 s).

    ``train`` holds ``round(n_train * task_fraction)`` generated tasks and documentation examples for the rest;
    ``test`` holds ``n_test`` documentation questions about objects absent from train; ``checkable_test`` holds
    ``n_checkable`` generated tasks, spread evenly over ``task_kinds`` (default: all of :data:`TASKS`). Raises
    ValueError when the stdlib cannot supply the documentation examples asked for (about 3,600 in all on
    Python 3.11 with the default allowlist, so ``n_docs + n_test`` up to about 3,400).
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
        raise ValueError(
            f"the stdlib allowlist yields {len(groups)} documented objects on this Python; after holding out "
            f"{len(test)} for test, {len(doc_train)} documentation examples remain for training but {n_docs} were "
            "asked for. Lower n_train or n_test, or raise task_fraction."
        )
    doc_train = doc_train[:n_docs]

    # The checkable split is drawn first so that every kind gets its even share of it, even kinds whose few
    # possible instructions (weekdays, months) would otherwise be used up by training.
    pool = task_pool(groups)
    checkable_test = task_examples(n_checkable, pool, seed=seed, kinds=task_kinds, stream="checkable")
    held_out = frozenset(ex.instruction for ex in checkable_test)
    task_train = task_examples(n_tasks, pool, seed=seed, kinds=task_kinds, exclude=held_out, stream="train")

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
