"""Sandbox: what runs, what is stopped, and that the test process itself is never harmed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crowguard.evaluation.metrics import pass_at_1
from crowguard.evaluation.sandbox import humaneval_program, load_humaneval, run_program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's limits and guards are Linux-specific")

HUMANEVAL = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "HumanEval" / "HumanEval.jsonl"

SOLUTION = """
def add(a, b):
    return a + b

assert add(2, 3) == 5
"""


def _children() -> set[int]:
    """Live child processes of this test process (all its threads)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


@pytest.fixture(autouse=True)
def _no_leftover_children() -> None:
    """Every test: the sandbox leaves no child process of ours behind and our working directory untouched."""
    before, cwd = _children(), os.getcwd()
    yield
    assert _children() <= before
    assert os.getcwd() == cwd


def test_a_correct_program_passes() -> None:
    result = run_program(SOLUTION + "print('done')")
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout.strip() == "done"


def test_a_wrong_program_fails_with_its_traceback() -> None:
    result = run_program(SOLUTION.replace("a + b", "a - b"))
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.stderr


def test_an_early_exit_is_not_a_pass() -> None:
    for code in ("import sys; sys.exit(0)\nassert False", "raise SystemExit", "import os; os._exit(0)"):
        result = run_program(code)
        assert result.status == "failed", code


def test_an_infinite_loop_is_killed_on_time() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 1.0 + 1.5


def test_the_cpu_limit_stops_a_busy_program_even_with_a_generous_wall_clock() -> None:
    result = run_program("while True:\n    pass", timeout_s=30.0, cpu_s=1)
    assert result.status == "timeout" and result.returncode == -signal.SIGXCPU  # the CPU limit, not the wall clock


def test_writing_outside_the_work_directory_fails(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    attempts = [
        f"open({str(victim)!r}, 'w').write('x')",
        f"import pathlib; pathlib.Path({str(victim)!r}).write_text('x')",
        f"import os; os.close(os.open({str(victim)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import io; io.FileIO({str(victim)!r}, 'w')",
        f"import os; os.remove({str(keep)!r})",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import os; os.rename({str(keep)!r}, 'stolen.txt')",
        f"import os; os.symlink({str(tmp_path)!r}, 'link'); open('link/victim.txt', 'w').write('x')",
        f"import os; os.link({str(keep)!r}, 'hard'); open('hard', 'w').write('x')",
        f"import os; os.chmod({str(keep)!r}, 0o777)",
    ]
    for code in attempts:
        result = run_program(code)
        assert result.status == "failed", code
        assert "PermissionError" in result.stderr, code
    assert not victim.exists()
    assert keep.read_text() == "precious" and (keep.stat().st_mode & 0o777) != 0o777


def test_writing_inside_the_work_directory_works_and_is_cleaned_up() -> None:
    code = (
        "import os, tempfile, shutil\n"
        "os.makedirs('a/b'); open('a/b/f.txt', 'w').write('x'); os.rename('a/b/f.txt', 'a/g.txt')\n"
        "tempfile.NamedTemporaryFile().write(b'x'); shutil.rmtree('a')\n"
        "print(os.getcwd())\n"
    )
    result = run_program(code)
    assert result.passed, result.stderr
    assert not Path(result.stdout.strip()).exists()


def test_network_access_fails() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        for code in (
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM)",
            "import socket; socket.getaddrinfo('example.com', 80)",
            f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}', timeout=1)",
        ):
            result = run_program(code)
            assert result.status == "failed", code
    finally:
        server.close()


def test_process_creation_and_guard_escapes_fail() -> None:
    attempts = [
        "import subprocess; subprocess.run(['true'])",
        "import os; os.system('true')",
        "import multiprocessing; multiprocessing.Process(target=print).start()",
        "import ctypes",
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import sys; del sys.modules['posix']; import posix; posix.fork()",
    ]
    for code in attempts:
        assert run_program(code).status == "failed", code


def test_signalling_another_process_fails() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        result = run_program(f"import os, signal\nos.kill({sleeper.pid}, signal.SIGKILL)")
        assert result.status == "failed" and "PermissionError" in result.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_fork_bomb_fails_fast_without_harming_the_test_process() -> None:
    start = time.monotonic()
    result = run_program("import os\nwhile True:\n    os.fork()", timeout_s=5.0)
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert time.monotonic() - start < 5.0
    # The autouse fixture checks no child survived; this process still works.
    assert run_program(SOLUTION).passed


def test_a_memory_hog_fails() -> None:
    result = run_program("x = bytearray(2 * 1024**3)\nprint(len(x))", memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.stderr
    big = run_program("x = [0] * (300 * 1024**2 // 8)\nprint(len(x))", memory_mb=256)
    assert not big.passed


def test_a_print_flood_is_cut_off_by_the_file_size_limit() -> None:
    result = run_program("while True:\n    print('x' * 1000)", timeout_s=10.0, file_mb=1)
    assert not result.passed and result.status != "timeout"
    assert len(result.stdout) <= 2000


def test_the_sandbox_sees_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("CROWGUARD_SECRET", "s3cret")
    result = run_program("import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())")
    assert result.passed
    assert "HTTPS_PROXY" not in result.stdout and "CROWGUARD_SECRET" not in result.stdout
    assert result.stdout.strip().endswith("True")


def test_humaneval_program_builds_the_human_eval_check() -> None:
    problem = {
        "task_id": "T/0",
        "prompt": "def inc(x):\n",
        "entry_point": "inc",
        "test": "def check(candidate):\n    assert candidate(1) == 2\n",
    }
    assert run_program(humaneval_program(problem, "    return x + 1\n")).passed
    assert run_program(humaneval_program(problem, "    return x\n")).status == "failed"


@pytest.mark.shared_data
def test_every_canonical_humaneval_solution_passes() -> None:
    if not HUMANEVAL.is_file():
        pytest.skip(f"HumanEval data not found at {HUMANEVAL.resolve()}")
    problems = load_humaneval(HUMANEVAL)
    assert len(problems) == 164
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: run_program(humaneval_program(p, p["canonical_solution"])), problems))
        wrong = list(pool.map(lambda p: run_program(humaneval_program(p, "    return None\n")), problems[:8]))
    failures = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(problems, results) if not r.passed]
    assert not failures
    assert pass_at_1(results) == 1.0
    assert pass_at_1(wrong) == 0.0
