"""The docs-names test: every config key, CLI flag, preset and repository path that README.md and docs/**/*.md name
must exist.

What counts as a name (kept simple on purpose; a name written any other way is not checked):

* Only code is read: inline code spans (`...`) and fenced code blocks tagged ``bash``, ``sh``, ``shell`` or
  ``console``. Prose, other code blocks and anything holding a ``<placeholder>`` are not checked.
* **Config key**: a code span that is a dotted lower-case name, optionally followed by ``: value``, ``=value`` or
  ``.*`` (``defense.crow.alpha``, ``model.template: chat``, ``defense.crow.*``), whose first part is a config section
  (:data:`SECTION_WORDS`: the dataclass sections of ``ExperimentConfig`` and ``DemoConfig``, ``scan`` and ``train``),
  and whose last part is not a file extension (``train.py`` is a file). Every ``--set KEY=VALUE`` in code counts
  too. The key must resolve from ``ExperimentConfig``, ``DemoConfig`` or, under ``scan.``, ``ScanConfig``, the way
  ``crowguard validate --explain`` lists them: ``train.lr`` does not (the training budget is ``backdoor.lr`` or
  ``defense.train.lr``). A Python function of a module whose name is also a section is written with its package,
  ``crowguard.train.regroup_by_length``.
* **CLI flag**: in a code span or a shell line that runs ``crowguard CMD`` (or ``-m crowguard.cli CMD``, or a span
  that starts with ``CMD --``, e.g. `defend --lr 5e-4`), every ``--flag`` after CMD must be an option of that
  subcommand in ``crowguard.cli.build_parser()``. In ``python benchmarks/NAME.py ...`` a flag must be one that
  ``benchmarks/NAME.py`` spells as a string literal. A code span that is only a flag (`--resume`, `--n-poison 60`)
  must be an option of some crowguard subcommand or some benchmark script. A key of ``crowguard scan --set`` must
  be ``scan.<key>`` (``ScanConfig``) or ``model.<key>``, as scan reads them. A shell line is cut at ``|``, ``&&``,
  ``;`` and `` #`` first; flags of other tools (pip, torchrun) before ``crowguard`` are not checked.
* **Preset**: a code span ``FOLDER/NAME`` (or ``--config FOLDER/NAME``) with FOLDER one of the shipped preset
  folders and NAME without a file extension must be listed by ``crowguard.registry.presets()``; ``*`` is a glob
  that must match at least one.
* **Repository path**: a code span or a shell-code word whose first part is a top-level entry of the repository
  (:data:`REPO_ENTRIES`) must exist relative to the repository root; one that starts with ``crowguard/`` is read
  under ``src/``, and one that starts with a package folder (:data:`PACKAGE_FOLDERS`) and ends in ``/`` or a file
  extension is read under ``src/crowguard/``. A ``:name`` suffix (``defenses/base.py:make_defense``) is dropped.
* **Links**: every relative Markdown link must point at a file that exists or at a page ``docs/gen_reference.py``
  writes when the site builds (``reference/cli.md``, ``reference/config.md``); a link from README.md into ``docs/``
  with a ``#fragment`` must name a heading of that page (GitHub's slug rule). Links between docs pages are also
  checked by ``mkdocs build --strict`` (CI).
"""

from __future__ import annotations

import argparse
import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

SECTION_WORDS = frozenset({"model", "poison", "backdoor", "defense", "evaluate", "organism", "trigger", "payload",
                           "scan", "train"})  # fmt: skip
FILE_EXTENSIONS = frozenset({"py", "json", "jsonl", "yaml", "yml", "md", "png", "txt", "toml", "safetensors", "gguf",
                             "bin", "sh", "cfg", "whl", "html"})  # fmt: skip
REPO_ENTRIES = frozenset({"src", "tests", "benchmarks", "docs", ".ci", "README.md", "pyproject.toml", "mkdocs.yml"})
PACKAGE_FOLDERS = frozenset({"attacks", "configs", "defenses", "evaluation", "organism", "recipes"})
PRESET_FOLDERS = frozenset({"attacks", "backdoor", "defenses", "demo", "experiments", "models"})
SHELL_LANGS = frozenset({"bash", "sh", "shell", "console"})

KEY_RE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?:\.\*)?(?:\s*[:=].*)?$", re.DOTALL)
SET_RE = re.compile(r"--set[\s=]+['\"]?([a-z_][a-z0-9_.]*)=")
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)(?![\w<-])")
COMMAND_RE = re.compile(r"\bcrowguard(?:\.cli)?(?:\s+([a-z][a-z-]*))?\s*(.*)$", re.DOTALL)
BENCH_RE = re.compile(r"(?:^|\s)(?:python3?\s+)?(benchmarks/[\w-]+\.py)\b(.*)$", re.DOTALL)
PRESET_RE = re.compile(r"^(?:--config\s+)?([a-z]+)/([a-z0-9*][a-z0-9_.*-]*)$")
CHECKED: Counter[str] = Counter()  # how many names of each kind were checked (so a blind parser shows)
LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Doc:
    """The code of one Markdown file: inline spans and shell lines (continuations joined), with line numbers."""

    spans: list[tuple[int, str]] = field(default_factory=list)
    shell: list[tuple[int, str]] = field(default_factory=list)
    links: list[tuple[int, str]] = field(default_factory=list)
    headings: list[str] = field(default_factory=list)


def parse(text: str) -> Doc:
    doc = Doc()
    prose: list[tuple[int, str]] = []
    fence: str | None = None
    pending = ""
    pending_line = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip().split()[0].lower() if stripped[3:].strip() else ""
            continue
        if fence is not None:
            if stripped.startswith("```"):
                fence = None
            elif fence in SHELL_LANGS:
                body = line.rstrip()
                if not pending:
                    pending_line = number
                if body.endswith("\\"):
                    pending += body[:-1] + " "
                    continue
                doc.shell.append((pending_line, pending + body))
                pending = ""
            continue
        if stripped.startswith("#"):
            doc.headings.append(stripped.lstrip("#").strip())
        prose.append((number, line))
    # inline code spans may wrap across lines: search the prose as one text, then map offsets back to line numbers
    joined = "\n".join(line for _, line in prose)
    starts, offset = [], 0
    for number, line in prose:
        starts.append((offset, number))
        offset += len(line) + 1

    def line_of(pos: int) -> int:
        return max((n for o, n in starts if o <= pos), default=1)

    for match in re.finditer(r"(`+)(.+?)\1", joined, re.DOTALL):
        doc.spans.append((line_of(match.start()), " ".join(match.group(2).split())))
    without_code = re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), joined, flags=re.DOTALL)
    for match in LINK_RE.finditer(without_code):
        doc.links.append((line_of(match.start()), match.group(1) or match.group(2)))
    return doc


# --------------------------------------------------------------------------------------------------- what exists
@cache
def config_keys() -> frozenset[str]:
    """Every dotted key (leaves and the sections above them) of the schemas the commands read."""
    from crowguard.config import explain
    from crowguard.schemas import DemoConfig, ExperimentConfig, ScanConfig

    leaves = [k for k, _, _ in explain(ExperimentConfig)] + [k for k, _, _ in explain(DemoConfig)]
    leaves += [f"scan.{k}" for k, _, _ in explain(ScanConfig)]
    keys = set(leaves)
    for leaf in leaves:
        parts = leaf.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(keys)


@cache
def command_flags() -> dict[str, frozenset[str]]:
    """Each subcommand's option strings (every generated flag included); ``""`` is the top-level parser."""
    from crowguard.cli import build_parser

    parser = build_parser()
    flags = {"": frozenset(s for a in parser._actions for s in a.option_strings)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags[name] = frozenset(s for a in sub._actions for s in a.option_strings)
    return flags


@cache
def benchmark_flags() -> dict[str, frozenset[str]]:
    return {
        f"benchmarks/{path.name}": frozenset(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", path.read_text()))
        for path in sorted((ROOT / "benchmarks").glob("*.py"))
    }


@cache
def generated_pages() -> frozenset[Path]:
    """The pages ``docs/gen_reference.py`` writes when the site builds (they are not files in the repository)."""
    script = (ROOT / "docs" / "gen_reference.py").read_text()
    return frozenset((ROOT / "docs" / name).resolve() for name in re.findall(r'gen_files\.open\("([^"]+)"', script))


@cache
def preset_names() -> frozenset[str]:
    from crowguard.registry import presets

    return frozenset(f"{folder}/{name}" for folder, names in presets().items() for name in names)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# ------------------------------------------------------------------------------------------------------ checks
def _check_flags(command: str, rest: str, where: str) -> list[str]:
    flags = command_flags()
    if command not in flags:
        return [f"{where}: `crowguard {command}`: no such subcommand"]
    CHECKED["flag"] += len(FLAG_RE.findall(rest))
    return [f"{where}: `crowguard {command or ''}`: no flag {flag}".replace("  ", " ")
            for flag in FLAG_RE.findall(rest) if flag not in flags[command]]  # fmt: skip


def _check_bench(path: str, rest: str, where: str) -> list[str]:
    known = benchmark_flags().get(path)
    if known is None:
        return [f"{where}: no benchmark {path}"]
    CHECKED["flag"] += len(FLAG_RE.findall(rest))
    return [f"{where}: `{path}`: no flag {flag}" for flag in FLAG_RE.findall(rest) if flag not in known]


def _check_sets(text: str, where: str, command: str = "") -> list[str]:
    """``--set KEY=VALUE`` keys; ``crowguard scan`` takes only ``scan.<key>`` and ``model.<key>``."""
    CHECKED["key"] += len(SET_RE.findall(text))
    problems = []
    for key in SET_RE.findall(text):
        if key not in config_keys():
            problems.append(f"{where}: `--set {key}=`: no config key {key}")
        elif command == "scan" and key.split(".", 1)[0] not in ("scan", "model"):
            problems.append(f"{where}: `crowguard scan --set {key}=`: scan takes scan.<key> or model.<key>")
    return problems


def _check_command_text(text: str, where: str, span: bool) -> list[str]:
    """Flags and ``--set`` keys of one shell command (or a code span holding one)."""
    text = text.replace("\\|", " ")  # an escaped pipe in a table cell is an alternative, not a shell pipe
    problems: list[str] = []
    for part in re.split(r"\|\||\||&&|;|\s#", text):
        part = part.strip()
        if "<" in part:
            continue
        first = part.split(maxsplit=1)[0] if part else ""
        if (match := COMMAND_RE.search(part)) and not part.startswith("crowguard/"):
            command, rest = match.group(1) or "", match.group(2)
            if command and command not in command_flags() and not span and match.start() > 0:
                continue  # e.g. `python -c 'from crowguard.registry import ...'`: not a crowguard command line
            problems += _check_flags(command, rest, where)
            problems += _check_sets(rest, where, command)
            continue
        problems += _check_sets(part, where)
        if match := BENCH_RE.search(part):
            problems += _check_bench(match.group(1), match.group(2), where)
        elif span and first in command_flags() and first and re.match(rf"{first}\s+--", part):
            problems += _check_flags(first, part[len(first) :], where)
        elif span and part.startswith("--") and not part.startswith("--set"):
            flag = FLAG_RE.match(part)
            CHECKED["flag"] += 1
            everywhere = set().union(*command_flags().values(), *benchmark_flags().values())
            if flag and flag.group(1) not in everywhere:
                problems.append(f"{where}: `{part}`: {flag.group(1)} is no flag of crowguard or of a benchmark")
    return problems


def _check_path(word: str, where: str) -> list[str]:
    word = word.strip("\"'(),")
    if "<" in word or "$" in word or "..." in word:
        return []
    path = word.split(":", 1)[0].split("#", 1)[0]
    first = path.split("/", 1)[0]
    last = path.rstrip("/").rsplit("/", 1)[-1]
    has_extension = "." in last and last.rsplit(".", 1)[1] in FILE_EXTENSIONS
    if first in REPO_ENTRIES:
        target = ROOT / path
    elif first == "crowguard" and "/" in path:
        target = ROOT / "src" / path
    elif first in PACKAGE_FOLDERS and "/" in path and (path.endswith("/") or has_extension):
        target = ROOT / "src" / "crowguard" / path
    else:
        return []
    CHECKED["path"] += 1
    if "*" in path:
        return [] if list(ROOT.glob(str(target.relative_to(ROOT)))) else [f"{where}: no path matches {word}"]
    return [] if target.exists() else [f"{where}: no such path {word}"]


def check_span(span: str, where: str) -> list[str]:
    if "<" in span:
        return []
    problems: list[str] = []
    if (match := KEY_RE.match(span)) and (key := match.group(1)).split(".")[0] in SECTION_WORDS:
        if key.rsplit(".", 1)[1] in FILE_EXTENSIONS:
            return problems
        CHECKED["key"] += 1
        if key not in config_keys():
            problems.append(f"{where}: `{span}`: no config key {key}")
        return problems
    if (match := PRESET_RE.match(span)) and match.group(1) in PRESET_FOLDERS and "." not in match.group(2):
        name = f"{match.group(1)}/{match.group(2)}"
        CHECKED["preset"] += 1
        if not fnmatch.filter(preset_names(), name):
            problems.append(f"{where}: `{span}`: no preset {name}")
        return problems
    problems += _check_command_text(span, where, span=True)
    if " " not in span:
        problems += _check_path(span, where)
    return problems


def check_shell(line: str, where: str) -> list[str]:
    problems = _check_command_text(line, where, span=False)
    code = line.split(" #", 1)[0]
    for word in code.split():
        if "/" in word and not word.startswith(("-", "http")) and "=" not in word:
            problems += _check_path(word, where)
    return problems


def check_links(doc: Doc, source: Path, where_prefix: str) -> list[str]:
    problems = []
    for number, link in doc.links:
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        path, _, fragment = link.partition("#")
        CHECKED["link"] += 1
        target = (source.parent / path).resolve()
        if target in generated_pages():
            continue
        if not target.exists():
            problems.append(f"{where_prefix}:{number}: link to a missing file {link}")
        elif fragment and source.name == "README.md" and target.suffix == ".md":
            anchors = {slug(h) for h in parse(target.read_text()).headings}
            if fragment not in anchors:
                problems.append(f"{where_prefix}:{number}: {link}: no heading with the anchor #{fragment}")
    return problems


def check_text(text: str, name: str = "<text>", source: Path | None = None) -> list[str]:
    """Every problem with the names that Markdown ``text`` uses, as ``name:line: what`` strings."""
    doc = parse(text)
    problems: list[str] = []
    for number, span in doc.spans:
        problems += check_span(span, f"{name}:{number}")
    for number, line in doc.shell:
        problems += check_shell(line, f"{name}:{number}")
    if source is not None:
        problems += check_links(doc, source, name)
    return problems


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_every_name_the_docs_use_exists(path: Path) -> None:
    problems = check_text(path.read_text(), str(path.relative_to(ROOT)), path)
    assert not problems, "names the docs use that do not exist:\n" + "\n".join(problems)


def test_the_docs_are_found_and_read() -> None:
    """The pages are there and the parser sees names of every kind in them (a parser gone blind would pass the test
    above while checking nothing)."""
    names = {p.relative_to(ROOT).as_posix() for p in DOC_FILES}
    assert {"README.md", "docs/index.md", "docs/smollm2-study.md", "docs/design.md"} <= names
    CHECKED.clear()
    for path in DOC_FILES:
        check_text(path.read_text(), str(path), path)
    seen = dict(CHECKED)
    assert seen.get("key", 0) >= 50 and seen.get("flag", 0) >= 100 and seen.get("preset", 0) >= 10, seen
    assert seen.get("path", 0) >= 50 and seen.get("link", 0) >= 30, seen
    CHECKED.clear()
    check_text((ROOT / "README.md").read_text(), "README.md", ROOT / "README.md")
    assert min(CHECKED[kind] for kind in ("key", "flag", "preset", "path", "link")) > 0, dict(CHECKED)


def test_the_checker_finds_names_that_do_not_exist() -> None:
    """The checker can fail: made-up keys, flags, presets, paths and anchors are each reported."""
    text = """\
Checkpoints every `train.save_steps` steps; `defense.crow.alpha` and `defense.train.save_steps` exist.
Set `backdoor.quantize_base: 4bit`, not `model.quantize_base: 4bit`; `train.py` is a file, not a key.
`crowguard defend --crow-alpha 11 --no-such-flag 3`, `defend --lr 5e-4`, `evaluate --lr 5e-4`, `--resume`,
`--made-up-flag`, `crowguard frobnicate`, `defenses/crow`, `defenses/crow-alpha99`, `experiments/*`,
`src/crowguard/losses.py`, `src/crowguard/lossess.py`, `recipes/demo.py`, `crowguard/nowhere.py`,
`python benchmarks/efficacy.py --report --n-poison 60 --plant-seeds 1`.
[the study](docs/smollm2-study.md#the-plant), [gone](docs/gone.md), [bad](docs/design.md#no-such-heading)

```bash
crowguard validate my.yaml --set defense.crow.alpha=11 --set train.regroup_micro_batches=false
crowguard scan --model m --set scan.limit=3 --set model.dtype=bfloat16 --set method=max_abs_z --set poison.rate=1
torchrun --nproc_per_node 4 -m crowguard.cli defend --method crow --out runs/crow --max-stepz 3
python benchmarks/nope.py --json x.json
```
"""
    problems = check_text(text, "t", ROOT / "README.md")
    expected = [
        "no config key train.save_steps",
        "no config key model.quantize_base",
        "no flag --no-such-flag",
        "`crowguard evaluate`: no flag --lr",
        "--made-up-flag is no flag",
        "`crowguard frobnicate`: no such subcommand",
        "no preset defenses/crow-alpha99",
        "no such path src/crowguard/lossess.py",
        "no such path crowguard/nowhere.py",
        "no flag --plant-seeds",
        "link to a missing file docs/gone.md",
        "no heading with the anchor #no-such-heading",
        "no config key train.regroup_micro_batches",
        "no config key method",
        "scan takes scan.<key> or model.<key>",
        "no flag --max-stepz",
        "no benchmark benchmarks/nope.py",
        "no such path benchmarks/nope.py",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), f"not reported: {fragment}\n" + "\n".join(problems)
    assert len(problems) == len(expected), "\n".join(problems)


def test_the_keys_come_from_the_schemas() -> None:
    """The key list is the one `crowguard validate --explain` prints, with every defense's own section."""
    from crowguard.registry import DEFENSES

    keys = config_keys()
    assert {"defense.train.save_steps", "backdoor.regroup_micro_batches", "defense.crow.alpha", "organism.source",
            "scan.method", "evaluate.kv_cache"} <= keys  # fmt: skip
    assert not any(k.startswith("train.") for k in keys)
    assert {f"defense.{name}" for name in DEFENSES} - keys <= {"defense.none", "defense.finetune"}
