"""Atomic file and directory writes, so a crash never leaves a half-written artefact that looks complete."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask: from ``/proc`` where there is one, else by setting and restoring it (no portable getter;
    the brief swap could tighten a file another thread creates at that instant, never loosen it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _umask_mode(executable: bool, is_dir: bool, umask: int) -> int:
    return (0o777 if is_dir or executable else 0o666) & ~umask


def apply_umask_tree(root: Path, umask: int | None = None) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would: temporary directories and
    files are 0700/0600 (``mkdtemp``, ``mkstemp``, safetensors' own temporary files), which would make a shared
    results folder unreadable to colleagues once renamed into place. Symlinks are left alone.
    """
    mask = current_umask() if umask is None else umask
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, _umask_mode(False, True, mask))
        for name in filenames:
            file = os.path.join(dirpath, name)
            mode = os.lstat(file).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(file, _umask_mode(bool(mode & 0o111), False, mask))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and an atomic rename.

    The file gets the mode the umask gives a plain ``open`` (``mkstemp`` alone would leave it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode(False, False, current_umask()))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def non_finite_key(data: Any, where: str = "") -> str | None:
    """The dotted path of the first nan or inf float in nested dicts and lists, or None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else (where or "(the value)")
    if isinstance(data, dict):
        items: Any = ((f"{where}.{k}" if where else str(k), v) for k, v in data.items())
    elif isinstance(data, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(data))
    else:
        return None
    return next((found for key, value in items if (found := non_finite_key(value, key)) is not None), None)


def write_json_atomic(path: Path, data: Any, rows: bool = False) -> None:
    """Pretty, stable JSON (sorted keys off: records keep their field order), written atomically. A nan or inf is
    refused (NonFiniteError naming its key), never written as a bare ``NaN`` that other JSON readers reject and
    that a table would show as a number; a value that can be undefined is written as null by its producer.
    ``rows``: ``data`` is a dict of lists, each item written on one line (a table's rows: a third smaller)."""
    if (key := non_finite_key(data)) is not None:
        from crowguard.types import NonFiniteError

        raise NonFiniteError(f"{path}: {key} is not a finite number; refusing to write it")
    if not rows:
        write_text_atomic(Path(path), json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        return
    dump = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False)
    parts = [f"{dump(k)}: [\n" + ",\n".join("  " + dump(item) for item in items) + "\n]" for k, items in data.items()]
    write_text_atomic(Path(path), "{\n" + ",\n".join(parts) + "\n}\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted) for models and adapters."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(sha256_file(child).encode())
    return digest.hexdigest()


class OutputExistsError(FileExistsError):
    """The output directory is not empty and overwriting was not requested, or another process is writing it."""


class OutputPathError(OSError):
    """The output path cannot be a stage's directory: under a file, unwritable, the working directory, or holding
    an input (replacing it would delete that input)."""


def check_output_dir(out_dir: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, an output directory that would lose something or cannot be written: a non-empty one
    unless ``overwrite``; the current directory or one above it; one that is, or holds, a local path in
    ``inputs`` (``--out`` beside ``--data`` with ``--overwrite`` deleted the data); one under a file; an
    unwritable one. Inputs that are not local paths (Hub ids) are ignored."""
    out_dir = Path(out_dir)
    where = out_dir.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise OutputPathError(f"{out_dir}: is the current directory or holds it; give a new directory for --out")
    for source in filter(None, inputs):
        path = Path(source).expanduser()
        if path.exists() and (path.resolve() == where or where in path.resolve().parents):
            raise OutputPathError(f"{out_dir}: holds the input {source}; write the output somewhere else")
    blocker = next((p for p in [where, *where.parents] if p.exists() and not p.is_dir()), None)
    if blocker == where:
        raise OutputExistsError(f"{out_dir}: exists and is not a directory")
    if blocker is not None:
        raise OutputPathError(f"{out_dir}: {blocker} is a file, so no directory can be made under it")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir}: directory is not empty (pass --overwrite to replace it)")
    existing = next(p for p in [where, *where.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{out_dir}: {existing} is not writable")


def _lock_holder_alive(holder: str) -> bool:
    """Whether the ``pid@host`` that wrote a lock may still run (a process on another host: assume so)."""
    import socket

    pid, _, host = holder.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return bool(holder)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``out_dir`` while a stage writes it, so a second process writing the same
    directory stops at once (OutputExistsError) instead of replacing the first one's result. Re-entrant within a
    process; a lock left by a process that is gone is taken over."""
    import socket

    out_dir = Path(out_dir)
    lock = out_dir.parent / f".{out_dir.name}.lock"
    mine = f"{os.getpid()}@{socket.gethostname()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = lock.read_text().strip()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if holder == mine:
                yield lock  # this process holds it already (a stage inside a stage)
                return
            if _lock_holder_alive(holder):
                raise OutputExistsError(f"{out_dir}: another crowguard process ({holder}) is writing it; wait for it "
                                        f"(or delete {lock} if that process is gone)") from None  # fmt: skip
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        break
    else:
        raise OutputExistsError(f"{out_dir}: could not take the lock {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out_dir`` in one rename.

    On an exception the temporary directory is removed and ``out_dir`` is left exactly as it was. Before the rename
    every directory and file in it gets the umask's default mode (see :func:`apply_umask_tree`).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    with output_lock(out_dir):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
        try:
            yield tmp
            # a directory that appeared while this stage ran (made by hand, or by a process without the lock)
            if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
                raise OutputExistsError(f"{out_dir}: appeared while this stage ran; nothing was replaced (the new "
                                        "result is discarded; pass --overwrite to replace it)")  # fmt: skip
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _replace_dir(tmp, out_dir)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Give ``tmp`` the umask's modes and rename it to ``out_dir`` (an old ``out_dir`` is removed after)."""
    apply_umask_tree(tmp)
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, trash)
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
