"""Crash safety, as the design promises: ``kill -9`` mid-training, ``--resume``, and the final weights equal an
uninterrupted run's; a resume with other settings is refused and loses nothing; no step is logged twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from crowguard.cli import main

from helpers import alpaca_records, save_tiny_model

STEPS, SAVE_EVERY = 24, 4


def _defend_args(tmp: Path, out: str, *extra: str) -> list[str]:
    return ["defend", "--method", "crow", "--model", str(tmp / "base"), "--data", str(tmp / "clean.json"),
            "--n-samples", "24", "--out", str(tmp / out), "--quiet",
            "--set", f"defense.train.max_steps={STEPS}", "--set", f"defense.train.save_steps={SAVE_EVERY}",
            "--set", "defense.train.per_device_batch=2", "--set", "defense.train.grad_accum=2",
            "--set", "defense.crow.layers=all", *extra]  # fmt: skip


def test_kill_minus_nine_then_resume_equals_an_uninterrupted_run(tmp_path: Path, capsys):
    save_tiny_model(tmp_path / "base", layers=3)
    (tmp_path / "clean.json").write_text(json.dumps(alpaca_records(24)))
    assert main(_defend_args(tmp_path, "full")) == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "crowguard.cli", *_defend_args(tmp_path, "half")]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = tmp_path / ".half.work"
    deadline = time.monotonic() + 240
    while not (work / "checkpoint-8" / "trainer_state.json").is_file():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint-8 within 240 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "half").exists(), "the run finished before it was killed"
    killed_at = max(int(p.name.split("-")[1]) for p in work.glob("checkpoint-*"))
    assert 8 <= killed_at < STEPS

    # other settings: refused with one line, before any model is loaded, and the checkpoints stay
    assert main([*_defend_args(tmp_path, "half", "--set", "defense.train.lr=0.01"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "train.lr: 0.001 -> 0.01" in err and "Traceback" not in err
    assert (work / f"checkpoint-{killed_at}").is_dir()

    assert main([*_defend_args(tmp_path, "half"), "--resume"]) == 0
    full, half = (
        load_file(tmp_path / "full/adapter_model.safetensors"),
        load_file(tmp_path / "half/adapter_model.safetensors"),
    )
    assert set(full) == set(half)
    for name in full:
        torch.testing.assert_close(half[name], full[name], atol=1e-6, rtol=1e-5, msg=name)

    def loss_steps(run: str) -> list[int]:
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if "loss" in r]

    assert loss_steps("half") == loss_steps("full") == list(range(1, STEPS + 1))  # no step twice after resume
    config = yaml.safe_load((tmp_path / "half/config.yaml").read_text())
    assert config["defense"]["train"]["lr"] == 0.001  # the config written is the one that was trained


def test_resume_without_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path: Path, capsys):
    save_tiny_model(tmp_path / "base", layers=3)
    (tmp_path / "clean.json").write_text(json.dumps(alpaca_records(24)))
    assert main([*_defend_args(tmp_path, "out"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "clean.json"]


pytestmark = pytest.mark.timeout(600)
