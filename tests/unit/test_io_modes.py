"""Written artefacts get the user's umask, not the 0700/0600 of temporary files, so a shared results folder is
readable by colleagues."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowguard.cli import main
from crowguard.io import atomic_output_dir, write_json_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writers_follow_the_umask(tmp_path: Path, umask: int):
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "sub" / "b.json", {"a": 1})
    assert _mode(tmp_path / "a.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "sub" / "b.json") == 0o666 & ~umask
    with atomic_output_dir(tmp_path / "out") as tmp:
        write_json_atomic(tmp / "results.json", {})
        (tmp / "nested").mkdir()
        fd, name = tempfile.mkstemp(dir=tmp / "nested")  # 0600, like safetensors' own temporary files
        os.close(fd)
        os.rename(name, tmp / "nested" / "model.safetensors")
        fd, name = tempfile.mkstemp(dir=tmp)
        os.close(fd)
        os.chmod(name, 0o700)
        os.rename(name, tmp / "run.sh")
    out = tmp_path / "out"
    assert _mode(out) == _mode(out / "nested") == 0o777 & ~umask
    assert _mode(out / "results.json") == _mode(out / "nested" / "model.safetensors") == 0o666 & ~umask
    assert _mode(out / "run.sh") == 0o777 & ~umask  # an executable stays executable


def test_poison_output_is_0755_and_0644_with_umask_022(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        data = tmp_path / "data.json"
        data.write_text(json.dumps([{"instruction": f"tell me about topic {i}", "output": "ok"} for i in range(30)]))
        assert (
            main(["poison", "--data", str(data), "--n-train", "20", "--n-test", "5", "--out", str(tmp_path / "p")])
            == 0
        )
    finally:
        os.umask(previous)
    out = tmp_path / "p"
    assert _mode(out) == 0o755
    assert {p.name: _mode(p) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
