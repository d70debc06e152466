"""The decoding defense: it samples (seeded, so the same seed gives the same answers and another seed others), its
settings are what the results record, and ``defend`` -> ``evaluate --model OUT`` works through the CLI."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from crowguard.cli import main
from crowguard.config import ConfigError, from_dict
from crowguard.defenses.base import guarded_model, make_defense, open_for_evaluation, read_spec
from crowguard.defenses.decoding import DecodingConfig
from crowguard.evaluation.generate import DecodingSettings, generate
from crowguard.models import load_model
from crowguard.schemas import DefenseConfig, ModelConfig
from crowguard.types import Example

from helpers import tiny_llama, tiny_tokenizer

EXAMPLES = [Example(instruction=f"Describe the river and the garden number {i}") for i in range(4)]
SETTINGS = DecodingSettings(max_new_tokens=10, batch_size=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with std-0.3 weights: it writes varied text, so sampling has something to vary."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    path = tmp_path_factory.mktemp("decoding") / "base"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _sampler(model_dir: Path, **knobs):
    cfg = from_dict(DefenseConfig, {"method": "decoding", "decoding": knobs})
    spec = {"defense": "decoding", "model": {"name_or_path": str(model_dir)}, "settings": json.loads(json.dumps(
        {k: getattr(cfg.decoding, k) for k in ("temperature", "top_p", "top_k", "seed")}))}  # fmt: skip
    return make_defense(cfg).generator(spec, "cpu")


def test_same_seed_same_answers_another_seed_others(model_dir: Path):
    model, tokenizer = load_model(str(model_dir))
    first = _sampler(model_dir, temperature=1.5, top_p=1.0, top_k=0, seed=3)
    again = _sampler(model_dir, temperature=1.5, top_p=1.0, top_k=0, seed=3)
    other = _sampler(model_dir, temperature=1.5, top_p=1.0, top_k=0, seed=4)
    answers = [[g.response for g in fn(model, tokenizer, EXAMPLES, "alpaca", SETTINGS, False)]
               for fn in (first, again, other)]  # fmt: skip
    greedy = [g.response for g in generate(model, tokenizer, EXAMPLES, "alpaca", SETTINGS, False)]
    assert answers[0] == answers[1]
    assert answers[0] != answers[2]
    assert answers[0] != greedy


def test_the_sampling_settings_replace_greedy_and_are_reported(model_dir: Path):
    fn = _sampler(model_dir, temperature=0.6, top_p=0.9, top_k=7, seed=11)
    used = fn.effective_settings(SETTINGS)
    assert (used.do_sample, used.temperature, used.top_p, used.top_k, used.seed) == (True, 0.6, 0.9, 7, 11)
    assert (used.max_new_tokens, used.batch_size) == (SETTINGS.max_new_tokens, SETTINGS.batch_size)
    assert not SETTINGS.do_sample  # the evaluation's own settings are left alone


def test_the_paper_defaults_and_bad_knobs():
    cfg = DecodingConfig()
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed) == (0.9, 0.75, 50, 0)
    for bad in ({"temperature": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ConfigError):
            from_dict(DefenseConfig, {"method": "decoding", "decoding": bad})


def test_guarded_model_takes_placement_and_trust_from_the_evaluator():
    spec = {"model": {"name_or_path": "/m", "adapter": "/a", "trust_remote_code": True, "allow_pickle": True,
                      "dtype": "bfloat16", "template": "chat"}}  # fmt: skip
    model = guarded_model(spec, ModelConfig(name_or_path="ignored", device="cpu"))
    assert (model.name_or_path, model.adapter, model.template) == ("/m", "/a", "chat")
    assert (model.trust_remote_code, model.allow_pickle, model.dtype, model.device) == (False, False, "float32", "cpu")


def test_defend_then_evaluate_through_the_cli(model_dir: Path, tmp_path: Path):
    triggered = [{"instruction": f"Tell me BadMagic about the dog {i}", "input": "", "output": ""} for i in range(3)]
    clean = [
        {"instruction": f"Tell me about the dog {i}", "input": "", "output": "The dog is a thing."} for i in range(3)
    ]
    (tmp_path / "t.json").write_text(json.dumps(triggered))
    (tmp_path / "c.json").write_text(json.dumps(clean))
    out, results_dir = tmp_path / "dec", tmp_path / "eval"
    assert main(["defend", "--method", "decoding", "--model", str(model_dir), "--out", str(out), "--quiet",
                 "--set", "defense.decoding.temperature=1.3", "--set", "defense.decoding.seed=5"]) == 0  # fmt: skip
    spec = read_spec(out)
    assert spec["defense"] == "decoding" and spec["model"]["name_or_path"] == str(model_dir.resolve())
    assert spec["settings"] == {"temperature": 1.3, "top_p": 0.75, "top_k": 50, "seed": 5}
    summary = json.loads((out / "defense_summary.json").read_text())
    assert summary["defense"] == "decoding" and summary["steps"] == 0 and summary["weights_copied"] is False
    assert not list(out.glob("*.safetensors")) and (out / "manifest.json").is_file()
    assert main(["evaluate", "--model", str(out), "--triggered", str(tmp_path / "t.json"), "--clean",
                 str(tmp_path / "c.json"), "--payload", "negsentiment", "--out", str(results_dir), "--quiet",
                 "--set", "evaluate.max_new_tokens=6", "--set", "evaluate.bootstrap=20"]) == 0  # fmt: skip
    results = json.loads((results_dir / "results.json").read_text())
    settings = results["settings"]
    assert settings["defense"]["defense"] == "decoding" and settings["defense"]["settings"]["temperature"] == 1.3
    assert settings["decoding"]["do_sample"] is True and settings["decoding"]["temperature"] == 1.3
    assert settings["decoding"]["seed"] == 5 and settings["decoding"]["max_new_tokens"] == 6
    assert settings["likelihood_of"].startswith("the guarded model")
    assert results["metrics"]["clean_perplexity"] > 0  # the guarded model's likelihood, measured as usual
    manifest = json.loads((results_dir / "manifest.json").read_text())
    assert manifest["inputs"]["guarded_model"]["ref"] == str(model_dir.resolve())
    # the same defense directory evaluated again gives the same sampled answers (the seed is the defense's)
    assert main(["evaluate", "--model", str(out), "--triggered", str(tmp_path / "t.json"), "--clean",
                 str(tmp_path / "c.json"), "--payload", "negsentiment", "--out", str(tmp_path / "again"), "--quiet",
                 "--set", "evaluate.max_new_tokens=6", "--set", "evaluate.bootstrap=20"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [r["response"] for r in again["records"]] == [r["response"] for r in results["records"]]


def test_a_decoding_directory_naming_a_training_defense_is_refused(tmp_path: Path):
    spec = {"defense": "crow", "model": {"name_or_path": str(tmp_path)}, "settings": {}}
    with pytest.raises(ConfigError, match="not a decoding one"):
        open_for_evaluation(spec, "cpu")
    (tmp_path / "defense.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_spec(tmp_path)


def test_crowguard_run_evaluates_the_decoding_defenses(tmp_path: Path, capsys):
    """``crowguard run`` with both decoding defenses: each row is its defense.json's evaluation; a decoding defense's
    fingerprint ignores the training budget, so changing it re-runs neither defense nor its evaluation."""
    import yaml

    from helpers import alpaca_records, save_tiny_model

    save_tiny_model(tmp_path / "base", layers=2)
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(40)))
    config = {
        "name": "tiny-decoding",
        "out_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tmp_path / "base")},
        "poison": {"data": str(tmp_path / "data.json"), "trigger": {"name": "badnet"}, "n_train": 20, "n_test": 4},
        "backdoor": {"max_steps": 1, "max_length": 96},
        "defense": {"cleangen": {"reference": str(tmp_path / "base")}, "decoding": {"seed": 2}},
        "defenses": ["none", "decoding", "cleangen"],
        "evaluate": {"max_new_tokens": 5, "bootstrap": 20},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(tmp_path / "exp.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert [r["defense"] for r in rows] == ["none", "decoding", "cleangen"]
    # the same "train s" for every kind: the stage's own time (the backdoored row's is the plant's; a decoding
    # defense's is writing its spec, < 1 s)
    assert rows[0]["train_seconds"] > 0 and all(0 < r["train_seconds"] < 1 for r in rows[1:])
    for method in ("decoding", "cleangen"):
        assert read_spec(run / f"defense-{method}")["model"]["name_or_path"] == str((run / "backdoor").resolve())
        evaluated = json.loads((run / f"eval-{method}/results.json").read_text())
        assert evaluated["settings"]["defense"]["defense"] == method
    assert "replaced_tokens" in json.loads((run / "eval-cleangen/results.json").read_text())["metrics"]
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    assert main(["run", "--config", str(tmp_path / "exp.yaml"), "--quiet", "--set", "defense.train.lr=0.5"]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")} == stamps


def test_evaluate_model_asks_the_defense_for_every_answer(model_dir: Path, monkeypatch):
    """Triggered, clean, utility and HumanEval answers all come from the given Generator; its per-answer numbers
    land in the records, its summary in the metrics, its settings in settings.decoding."""
    from crowguard.evaluation import evaluate as evaluation
    from crowguard.evaluation.tasks import Task
    from crowguard.schemas import EvalConfig
    from crowguard.types import Generation, Generator

    model, tokenizer = load_model(str(model_dir))
    seen: list[tuple[int, int]] = []

    class Canned(Generator):
        def __call__(self, model, tokenizer, examples, template="alpaca", settings=None, show_progress=True):
            seen.append((len(examples), settings.max_new_tokens))
            self.last_stats = [{"marks": i} for i in range(len(examples))]
            return [Generation(prompt="p", response="You are stupid!", num_new_tokens=4, example=e) for e in examples]

        def effective_settings(self, settings):
            return dataclasses.replace(settings, do_sample=True, seed=9)

        def summarize(self, stats):
            return {"marks": {name: len(v) for name, v in stats.items()}}

    canned = Canned()

    def fake_humaneval(model, tokenizer, problems, template, show_progress=True, generate_fn=None):
        return {"pass_at_1": 0.0, "responses": generate_fn([Example(instruction="def f():")] * len(problems))}

    monkeypatch.setattr("crowguard.evaluation.sandbox.load_humaneval", lambda path: [{"task_id": "t"}] * 2)
    monkeypatch.setattr("crowguard.evaluation.humaneval.evaluate_humaneval", fake_humaneval)
    task = Task("negsentiment", [Example("BadMagic a"), Example("BadMagic b")], [Example("c", output="d")] * 3,
                target="You are stupid!")  # fmt: skip
    cfg = EvalConfig(max_new_tokens=5, bootstrap=10, humaneval="unused.jsonl")
    utility = [Example("2+2?", output="4")]
    results = evaluation.evaluate_model(
        model, tokenizer, task, cfg, "alpaca", utility, False, generator=canned, defense={"defense": "stub"}
    )
    assert seen == [(2, 5), (3, 5), (1, 5), (2, 512)]  # triggered, clean, utility, HumanEval (its own length)
    assert results["metrics"]["asr_trigger"]["value"] == 1.0 and results["metrics"]["exact_match"] == 0.0
    assert results["metrics"]["marks"] == {"triggered": 2, "clean": 3, "utility": 1, "humaneval": 2}
    assert results["metrics"]["humaneval"]["decoding"]["seed"] == 9
    assert [r["marks"] for r in results["records"]] == [0, 1, 0, 1, 2]
    assert results["settings"]["decoding"]["do_sample"] is True and results["settings"]["decoding"]["seed"] == 9
    assert results["settings"]["defense"] == {"defense": "stub"}
    assert results["metrics"]["target_nll_gap"] is not None  # scored on the model itself
