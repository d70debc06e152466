"""``benchmarks/cpu_speed.py`` on its tiny random Llama: the rows, the equality checks and the lever parsing."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("cpu_speed") as module:  # its levers module imports as when run as a script
        yield module


def test_a_tiny_run_measures_today_and_each_lever_and_checks_equality(bench, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["--model", "tiny", "--workloads", "plant,unlearn,generate", "--levers", "bf16base,merge,fused",
            "--steps", "3", "--warmup", "1", "--new-tokens", "2", "--keep-compile-cache",
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = {(r["workload"], r["lever"]): r for r in json.loads(out.read_text())["rows"]}
    # bf16base is a training lever, merge a decoding one, fused unlearn's own: each appears only where it applies
    assert set(rows) == {
        ("plant", "base"),
        ("plant", "bf16base"),
        ("generate x2", "base"),
        ("generate x2", "merge"),
        ("unlearn", "base"),
        ("unlearn", "bf16base"),
        ("unlearn", "fused"),
    }
    fused = rows["unlearn", "fused"]
    assert fused["kind"] == "fp32" and fused["equal"] and len(fused["losses"]) == 3
    assert fused["losses"] != rows["plant", "base"]["losses"]  # the unlearn run, not a copy of another
    plant, cast = rows["plant", "base"], rows["plant", "bf16base"]
    assert len(plant["per_step_s"]) == 3 and len(plant["losses"]) == 3 and plant["median_ms"] > 0
    assert plant["max_rel_loss_diff"] == 0 and plant["equal"] and plant["speedup"] == 1
    assert cast["kind"] == "bf16" and 0 < cast["max_rel_loss_diff"] < 1e-2 and "equal" not in cast
    merged = rows["generate x2", "merge"]
    assert merged["kind"] == "fp32" and merged["identical_outputs"] == 200 and merged["equal"]
    assert all(len(ids) == 2 for ids in merged["outputs"])
    table = capsys.readouterr().out
    assert "| plant | bf16base | this one |" in table and "200/200 identical" in table


def test_todays_path_is_the_plain_one_though_the_demo_says_auto(bench):
    """The demo's preset trains with ``auto`` levers; the benchmark's baseline must still be float32 and eager on
    every machine, or each lever would be measured against itself on a CPU with bfloat16 units."""
    setup = bench.build_setup("tiny")
    for workload, cfg in setup.train.items():
        assert (cfg.precision, cfg.base_dtype, cfg.compile) == ("fp32", "model", "off"), workload


def test_levers_are_parsed_checked_and_placed(bench):
    from crowguard.schemas import TrainConfig

    assert bench.atoms_of("base") == [] and bench.atoms_of("compile+bf16base") == ["compile", "bf16base"]
    assert bench.applies("compile", "generate") and bench.applies("compile", "crow")
    assert not bench.applies("bf16base", "generate") and not bench.applies("merge", "plant")
    assert bench.applies("fused", "unlearn") and not bench.applies("fused", "crow")
    assert bench.applies("compile+fused", "unlearn") and not bench.applies("fused", "generate")
    assert bench.applies("malloc", "plant") and bench.applies("omp_passive+merge", "generate")
    env, missing = bench.lever_env("malloc+omp_passive")
    assert missing is None and env["OMP_WAIT_POLICY"] == "PASSIVE" and "MALLOC_TRIM_THRESHOLD_" in env
    assert bench.lever_env("compile") == ({}, None)
    if sys.modules["cpu_speed_levers"].preloaded("libjemalloc.so") is None:
        assert "not installed" in bench.lever_env("jemalloc")[1]
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--levers", "compile+turbo"])
    cfg = bench.lever_train_config(TrainConfig(), "compile+bf16", 5)
    assert (cfg.compile, cfg.precision, cfg.max_steps, cfg.logging_steps) == ("layers", "bf16", 5, 1)
    with pytest.raises(ValueError, match="choose one"):
        bench.lever_train_config(TrainConfig(), "compile+trainer_compile", 5)
