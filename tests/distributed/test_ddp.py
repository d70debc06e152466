"""Distributed: CROW under DDP (torchrun, 2 processes, gloo on CPU) gives the same gradients as one process on the
concatenated batch, and a whole `crowguard defend` run works under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crowguard.losses import crow_loss

from helpers import alpaca_records, fixed_batch, grad_dict, save_tiny_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent


RUNTIME_ABORT = "terminate called without an active exception"


def _torchrun(args: list[str], tmp: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``args`` on 2 gloo ranks. A rank that dies in torch's C++ runtime with ``RUNTIME_ABORT`` (seen once in
    three clean-clone CI runs of the FSDP2 test on CPU, 2026-12-06, no Python error before it) gets one rerun; any
    other failure, or the same abort twice, fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    if result.returncode != 0 and RUNTIME_ABORT in result.stderr:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _assert_wrapped_gradients_match_one_process(tmp: Path, how: str) -> None:
    """Run the worker under ``how`` (ddp | fsdp) on 2 ranks and compare with one process on the whole batch."""
    out = tmp / f"{how}_grads.safetensors"
    _torchrun([str(HERE / "ddp_worker.py"), str(out), how], tmp)
    wrapped = load_file(out)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=3)
    input_ids, attention_mask, labels = fixed_batch(len(tokenizer), rows=4)
    loss, _ = crow_loss(model, input_ids, attention_mask, labels, alpha=5.5, epsilon=0.1, layers="all")
    loss.backward()
    single = grad_dict(model)
    assert set(single) == set(wrapped)
    assert any(g.abs().sum() > 0 for g in single.values())
    for name, grad in single.items():
        torch.testing.assert_close(wrapped[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_ddp_crow_gradients_match_single_process(tmp_path: Path):
    _assert_wrapped_gradients_match_one_process(tmp_path, "ddp")


def test_fsdp_crow_gradients_match_single_process(tmp_path: Path):
    """FSDP2 (``fully_shard``, gloo on CPU): the embedding lookup runs inside the wrapped forward (a hook swaps in
    e and e + delta), so CROW's gradients equal one process's on the whole batch. FSDP averages over ranks."""
    fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard, torch >= 2.6)")
    _assert_wrapped_gradients_match_one_process(tmp_path, "fsdp")


@pytest.mark.parametrize("variant", ["lora", "full-gc-untied"])
def test_ddp_training_step_equals_one_process_on_unequal_lengths(tmp_path: Path, variant: str):
    """The Trainer under DDP (2 ranks x 2 unequal-length examples) takes the same CROW step as one process on all 4
    with the token average; the per-micro-batch mean does not. ``full-gc-untied`` is full fine-tuning with gradient
    checkpointing and an untied embedding matrix, where the Trainer's default DDP setting made CROW refuse."""
    sys.path.insert(0, str(HERE))
    from ddp_train_worker import one_step_update

    single = one_step_update("token", 4, variant == "full-gc-untied", str(tmp_path / "single"))
    changed = [k for k, v in single.items() if v.abs().max() > 0]
    assert changed
    gaps = {}
    for average in ("token", "micro_batch"):
        out = tmp_path / f"{average}.safetensors"
        _torchrun([str(HERE / "ddp_train_worker.py"), str(out), average, variant, str(tmp_path / average)], tmp_path)
        ddp = load_file(out)
        gaps[average] = max(float((ddp[k] - single[k]).abs().max() / single[k].abs().max()) for k in changed)
    assert gaps["token"] < 1e-3, gaps
    assert gaps["micro_batch"] > 0.03, gaps
    # the logged parts are the step's over all ranks, as the loss is (issue 27: they were rank 0's own)
    logged = [json.loads((tmp_path / w / "metrics.jsonl").read_text().splitlines()[0]) for w in ("single", "token")]
    for part in ("lm_loss", "consistency_loss", "consistency_adv"):
        assert logged[1][part] == pytest.approx(logged[0][part], rel=1e-4), (part, logged)


def test_defend_cli_under_torchrun(tmp_path: Path):
    base = save_tiny_model(tmp_path / "base", layers=3)
    (tmp_path / "clean.json").write_text(json.dumps(alpaca_records(16)))
    _torchrun(
        [
            "-m",
            "crowguard.cli",
            "defend",
            "--method",
            "crow",
            "--model",
            str(base),
            "--data",
            "clean.json",
            "--n-samples",
            "16",
            "--out",
            "crow",
            "--quiet",
            "--set",
            "defense.train.max_steps=2",
            "--set",
            "defense.crow.layers=all",
        ],
        tmp_path,
    )
    manifest = json.loads((tmp_path / "crow/manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert (tmp_path / "crow/adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "crow/train_summary.json").read_text())
    assert summary["steps"] == 2


def test_run_pipeline_under_torchrun(tmp_path: Path):
    """`crowguard run` on 2 gloo ranks: both train, rank 0 alone writes data and evaluations, a barrier
    between stages (before, rank 1 raced to read stages rank 0 had not written); a rerun skips every stage."""
    import yaml

    base = save_tiny_model(tmp_path / "base", layers=3)
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(40)))
    config = {"name": "ddp-run", "out_dir": str(tmp_path / "run"), "model": {"name_or_path": str(base)},
              "poison": {"data": str(tmp_path / "data.json"), "n_train": 20, "n_test": 4},
              "backdoor": {"max_steps": 2, "max_length": 96},
              "defense": {"data": str(tmp_path / "data.json"), "n_samples": 8,
                          "train": {"max_steps": 2, "max_length": 96}, "crow": {"layers": "all"}},
              "defenses": ["none", "crow"], "evaluate": {"max_new_tokens": 4, "bootstrap": 50}}  # fmt: skip
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    _torchrun(["-m", "crowguard.cli", "run", "--config", "exp.yaml", "--quiet"], tmp_path)
    run = tmp_path / "run"
    assert [r["defense"] for r in json.loads((run / "results.json").read_text())["rows"]] == ["none", "crow"]
    for stage in ("backdoor", "defense-crow"):
        assert json.loads((run / stage / "manifest.json").read_text())["world_size"] == 2
    fingerprints = {p.parent.name: json.loads(p.read_text()).get("fingerprint") for p in run.glob("*/manifest.json")}
    assert set(fingerprints) == {"poison", "backdoor", "defense-crow", "eval-none", "eval-crow"}
    assert all(fingerprints.values()), fingerprints  # every stage records what it was made from
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    _torchrun(["-m", "crowguard.cli", "run", "--config", "exp.yaml", "--quiet"], tmp_path)
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")} == stamps
