"""Cache keys that must go stale when what made the entry changes: the source digest of crowguard's evaluation
code, which keys the demo's cached reference evaluations."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import crowguard
from crowguard.organism.build import EVALUATION_SOURCE, source_digest

PACKAGE = Path(crowguard.__file__).resolve().parent


def copy_of_the_package(tmp_path: Path) -> Path:
    root = tmp_path / "crowguard"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_digest_changes_with_the_evaluation_code_and_nothing_else(tmp_path):
    root = copy_of_the_package(tmp_path)
    before = source_digest(EVALUATION_SOURCE, root)
    assert before == source_digest(EVALUATION_SOURCE, PACKAGE)  # a copy is the same code
    (root / "train.py").write_text("# training code is not evaluation code\n")
    (root / "evaluation" / "__pycache__").mkdir(exist_ok=True)
    assert source_digest(EVALUATION_SOURCE, root) == before
    metrics = root / "evaluation" / "metrics.py"
    original = metrics.read_text()
    metrics.write_text(original + "\n# a comment, a docstring and formatting are not code\n")
    assert source_digest(EVALUATION_SOURCE, root) == before
    metrics.write_text(original.replace('"""', '"""Reworded. ', 1).replace("\n\n\n", "\n\n\n\n", 1))
    assert source_digest(EVALUATION_SOURCE, root) == before
    metrics.write_text(original + "\nHIJACK_PREFIX_WORDS = 4\n")  # a changed metric
    assert source_digest(EVALUATION_SOURCE, root) != before
    metrics.write_text((PACKAGE / "evaluation" / "metrics.py").read_text())
    assert source_digest(EVALUATION_SOURCE, root) == before


def test_a_moved_file_changes_the_digest(tmp_path):
    """Names are hashed with the bytes: the same code in another module is another program."""
    root = copy_of_the_package(tmp_path)
    before = source_digest(EVALUATION_SOURCE, root)
    (root / "evaluation" / "judges.py").rename(root / "evaluation" / "judges_moved.py")
    assert source_digest(EVALUATION_SOURCE, root) != before


def test_a_part_that_does_not_exist_is_an_error_not_an_empty_hash(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluations"):
        source_digest(("evaluations",), copy_of_the_package(tmp_path))
