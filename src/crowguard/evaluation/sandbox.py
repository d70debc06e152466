"""Run untrusted, model-generated Python (HumanEval completions) in a constrained subprocess.

Defence in depth, not a security boundary: a determined program can escape an in-process guard, and root in the
parent means root in the child. Use a VM or container for code you actually fear. The layers, each covering gaps in
the others:

1. A fresh ``python -I -B`` per program (isolated mode: no environment variables, user site or cwd on ``sys.path``)
   in its own session, so the whole process group is killed (``os.killpg``) on timeout.
2. Resource limits set in the child before ``exec``: address space (``memory_mb``), CPU seconds, file size, open
   files, no core dumps, and ``RLIMIT_NPROC=0`` (no new processes or threads). The kernel does not enforce
   ``RLIMIT_NPROC`` for root, and root may raise its own limits, so layer 3 matters most when running as root.
3. A guard prelude run before the program that replaces process creation (``os.fork``, ``os.system``, the
   ``exec``/``spawn`` families, ``subprocess.Popen``, ``_posixsubprocess.fork_exec``), signalling other processes
   (``os.kill``), raising resource limits, ``ctypes``, and sockets/DNS with functions raising ``PermissionError``;
   and refuses writes, deletions, renames, links and permission changes outside the program's temporary working
   directory. Reading files outside it stays allowed (imports need it).
4. Without the network: in a new network namespace (``unshare -n``) when that works on this host (detected once;
   not required), besides the socket guard.
5. A temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards, and a minimal environment
   (no proxies, no credentials). Output goes to size-limited files, not pipes, so a print loop cannot fill memory.

A program passes only if it runs to its end: exiting early (``sys.exit(0)`` before the tests) is a failure.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["passed", "failed", "timeout", "error"]

_TAIL_CHARS = 2000

# Runs in the child as `python -I -B -c PRELUDE program.py`; installs the guards, then runs the program as __main__.
PRELUDE = r"""
import _io, builtins, io, os, posix, resource, runpy, shutil, signal, socket, subprocess, sys
try:
    import _posixsubprocess
except ImportError:
    _posixsubprocess = None
import _socket

ROOT = os.path.realpath(os.getcwd())
_realpath, _readlink, _isabs, _join, _fsdecode, _fspath = (
    os.path.realpath, os.readlink, os.path.isabs, os.path.join, os.fsdecode, os.fspath)


def _deny(what):
    def denied(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed")
    return denied


def _inside(path, dir_fd=None):
    try:
        if isinstance(path, int):
            real = _readlink(f"/proc/self/fd/{path}")
        else:
            p = _fsdecode(_fspath(path))
            if dir_fd is not None and not _isabs(p):
                p = _join(_readlink(f"/proc/self/fd/{dir_fd}"), p)
            real = _realpath(p)
    except (OSError, TypeError, ValueError):
        return False
    return real == "/dev/null" or real == ROOT or real.startswith(ROOT + os.sep)


def _writes(mode):
    return any(c in str(mode) for c in "wax+")


_real_open = _io.open
def _open(file, mode="r", *args, **kwargs):
    if _writes(mode) and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the sandbox directory: {file!r}")
    return _real_open(file, mode, *args, **kwargs)
builtins.open = io.open = _io.open = _open


class _FileIO(_io.FileIO):
    def __init__(self, file, mode="r", closefd=True, opener=None):
        if _writes(mode) and not _inside(file):
            raise PermissionError(f"sandbox: writing outside the sandbox directory: {file!r}")
        super().__init__(file, mode, closefd, opener)
io.FileIO = _io.FileIO = _FileIO

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_real_os_open = posix.open
def _os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE_FLAGS and not _inside(path, dir_fd):
        raise PermissionError(f"sandbox: writing outside the sandbox directory: {path!r}")
    return _real_os_open(path, flags, mode, dir_fd=dir_fd)
os.open = posix.open = _os_open


def _path_guard(name, checked):
    real = getattr(posix, name, None)
    if real is None:
        return
    def guarded(*args, **kwargs):
        for i in checked:
            value = args[i] if i < len(args) else None
            fd = kwargs.get(("src_dir_fd", "dst_dir_fd")[i], kwargs.get("dir_fd")) if i < 2 else None
            if value is not None and not _inside(value, fd):
                raise PermissionError(f"sandbox: {name} outside the sandbox directory: {value!r}")
        return real(*args, **kwargs)
    setattr(os, name, guarded)
    setattr(posix, name, guarded)


for _name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "lchmod", "chown", "lchown", "utime",
              "mkfifo", "mknod", "chflags", "lchflags", "setxattr", "removexattr", "fchmod", "fchown", "ftruncate"):
    _path_guard(_name, (0,))
for _name in ("rename", "replace", "link"):
    _path_guard(_name, (0, 1))
_path_guard("symlink", (1,))

_real_rmtree = shutil.rmtree
def _rmtree(path, *args, **kwargs):
    if not _inside(path):
        raise PermissionError(f"sandbox: rmtree outside the sandbox directory: {path!r}")
    return _real_rmtree(path, *args, **kwargs)
shutil.rmtree = _rmtree

for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "spawnv", "spawnve", "posix_spawn",
              "posix_spawnp", "kill", "killpg", "_exit", "setsid", "setpgid", "chroot"):
    for _module in (os, posix):
        if hasattr(_module, _name):
            setattr(_module, _name, _deny(f"os.{_name}"))
subprocess.Popen = _deny("subprocess")
if hasattr(subprocess, "_fork_exec"):
    subprocess._fork_exec = _deny("subprocess")
if _posixsubprocess is not None:
    _posixsubprocess.fork_exec = _deny("subprocess")
if hasattr(signal, "pidfd_send_signal"):
    signal.pidfd_send_signal = _deny("signalling other processes")
resource.setrlimit = _deny("changing resource limits")
if hasattr(resource, "prlimit"):
    resource.prlimit = _deny("changing resource limits")
for _module in (socket, _socket):
    for _name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                  "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_module, _name):
            setattr(_module, _name, _deny("network access"))
for _name in ("ctypes", "_ctypes", "cffi", "_cffi_backend"):
    sys.modules[_name] = None


# Deleting a patched module from sys.modules and importing it again would return the unpatched original.
class _NoFreshCopies:
    BLOCKED = frozenset({"posix", "_io", "_socket", "_posixsubprocess", "resource", "signal", "_signal"})

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in cls.BLOCKED:
            raise ImportError(f"sandbox: re-importing {name} is not allowed")
        return None


sys.meta_path.insert(0, _NoFreshCopies)

_program = sys.argv[1]
sys.argv = [_program]
del _name, _module
try:
    runpy.run_path(_program, run_name="__main__")
except SystemExit as _exit:
    sys.stderr.write(f"\nsandbox: the program exited early (SystemExit {_exit.code!r}) before running to its end\n")
    raise SystemExit(3)
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: ``passed`` (ran to its end, exit code 0), ``failed`` (non-zero exit: an exception, a failed assert,
    a denied operation, ``MemoryError``, a file-size limit, an early exit), ``timeout`` (wall-clock or CPU limit),
    ``error`` (killed by a signal: a segfault, the kernel's OOM killer). ``stdout``/``stderr`` are the last 2,000
    characters; ``returncode`` is None after a wall-clock timeout.
    """

    passed: bool
    status: Status
    stderr: str
    stdout: str = ""
    returncode: int | None = None
    duration_s: float = 0.0


def run_program(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    *,
    file_mb: int = 16,
    max_open_files: int = 64,
    network_namespace: bool | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh sandboxed interpreter and report how it ended.

    ``timeout_s``: wall-clock limit (the process group is killed). ``memory_mb``: address-space limit.
    ``cpu_s``: CPU-time limit (default ``ceil(timeout_s) + 1``, a backstop to the wall clock). ``file_mb``: largest
    file the program (including its own stdout/stderr) may write. ``network_namespace``: run under ``unshare -n``;
    None uses it when this host supports it. Raises ``OSError`` when the interpreter cannot be started at all, so a
    broken sandbox never reads as a failed program.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    cpu_limit = math.ceil(cpu_s if cpu_s is not None else timeout_s + 1)
    limits = (
        (resource.RLIMIT_AS, memory_mb * 2**20),
        (resource.RLIMIT_CPU, cpu_limit),
        (resource.RLIMIT_FSIZE, file_mb * 2**20),
        (resource.RLIMIT_NOFILE, max_open_files),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, 0),
    )
    use_netns = () if network_namespace is False else _netns_prefix()
    if network_namespace and not use_netns:
        raise OSError("network_namespace=True but `unshare -n` does not work on this host")
    workdir = Path(tempfile.mkdtemp(prefix="crowguard-sandbox-"))
    try:
        (workdir / "program.py").write_text(code, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LC_ALL": "C.UTF-8"}
        command = [*use_netns, sys.executable, "-I", "-B", "-c", PRELUDE, "program.py"]
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=functools.partial(_apply_limits, limits),
            )
            timed_out = not _wait_unreaped(proc.pid, start + timeout_s)
            # The (possibly zombie) leader still holds the group id, so this cannot hit a recycled group.
            _kill_group(proc.pid)
            returncode = proc.wait()
            duration = time.monotonic() - start
        stdout, stderr = _tail(workdir / "stdout"), _tail(workdir / "stderr")
    finally:
        _remove_tree(workdir)
    status: Status
    if timed_out or (returncode in (-signal.SIGXCPU, -signal.SIGKILL) and duration >= cpu_limit):
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif returncode > 0:
        status = "failed"
    else:
        status = "error"
    return SandboxResult(status == "passed", status, stderr, stdout, None if timed_out else returncode, duration)


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The test program for one HumanEval completion, as OpenAI human-eval builds it.

    ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``.
    """
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def load_humaneval(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The problems of ``HumanEval.jsonl`` (or ``.jsonl.gz``): dicts with task_id, prompt, test, entry_point, ..."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    for problem in problems:
        missing = {"task_id", "prompt", "test", "entry_point"} - problem.keys()
        if missing:
            raise ValueError(f"{path}: problem {problem.get('task_id', '?')} lacks {', '.join(sorted(missing))}")
    return problems


def _apply_limits(limits: tuple[tuple[int, int], ...]) -> None:
    """Runs in the forked child before exec: soft = hard so the program cannot raise them (unless root)."""
    for which, value in limits:
        soft = value
        if which == resource.RLIMIT_CPU:
            value += 1  # soft limit sends SIGXCPU first, which we report as a timeout
        try:
            resource.setrlimit(which, (soft, value))
        except (ValueError, OSError):
            # A hard limit already below ours: keep the stricter existing one.
            current = resource.getrlimit(which)[1]
            resource.setrlimit(which, (min(soft, current), current))


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits or ``deadline`` passes, without reaping it; True if it exited in time."""
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give a child its own, empty network namespace here, or () when none work."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "-n"), (unshare, "-r", "-n")):
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 4 * _TAIL_CHARS))
        return handle.read().decode("utf-8", "replace")[-_TAIL_CHARS:]


def _remove_tree(path: Path) -> None:
    """Delete the work directory even if the program made parts of it unreadable."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            try:
                os.chmod(os.path.join(root, name), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
