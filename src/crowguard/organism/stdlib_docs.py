"""The organism's natural text: questions about Python's standard library answered from its own docstrings.

Determinism: for one seed and one Python minor version the examples are byte-identical across runs and processes (a
fixed sorted allowlist of modules, sorted attribute names, seeded ``random.Random`` streams, no set or dict order,
no ``hash()``). The docstrings are read in a pristine child interpreter, because libraries monkeypatch the stdlib
when imported (torch, transformers). Docstrings change a little between Python versions, so the examples do too.
"""

from __future__ import annotations

import functools
import inspect
import json
import random
import re
import subprocess
import sys
import warnings
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
