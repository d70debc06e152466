"""The defense contract, for the three kinds of defense crowguard has.

A defense is one module with one class: its ``name``, its ``kind``, its own config dataclass ``Config`` (the
section ``defense.<name>`` of a YAML file; None when it has no knobs) and ``run``. The registry maps the name to the
class (:data:`crowguard.registry.DEFENSES`), and ``configs/defenses/<name>.yaml`` is its preset. Config loading,
``crowguard validate --explain``, ``crowguard ls`` and the CLI's flags and ``--set`` keys read ``Config`` from there,
so adding a defense edits no other file.

Kinds:

* ``training`` (CROW, fine-tuning): train on the clean samples under the shared budget ``defense.train``; the output
  directory is a model or adapter directory.
* ``weights`` (pruning, quantization): edit the weights without training; the output is a model directory.
* ``decoding`` (decoding settings, CleanGen): the weights stay; the output directory holds ``defense.json`` naming
  the model it guards (written by :func:`write_decoding_spec`), and evaluation asks the defense how to generate
  (:func:`open_for_evaluation`). Likelihood metrics (target NLL, perplexity) still score the guarded model itself.
* ``none``: nothing is written; the model is evaluated as given.

Every output directory is written by :func:`crowguard.stage.stage_artefact` (atomic, ``config.yaml``, summary,
``manifest.json``, model card).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from crowguard.schemas import DefenseConfig, ModelConfig
from crowguard.types import Example, Generator, StageContext

Kind = Literal["none", "training", "weights", "decoding"]
DEFENSE_FILE = "defense.json"  # in a decoding defense's output: {"defense", "model", "settings"}


# The fields of the guarded model that come from the evaluating command, never from defense.json: where and in
# which dtype it runs, and the two trust switches (a defense.json from elsewhere must not turn them on).
EVALUATION_MODEL_FIELDS = ("dtype", "device", "trust_remote_code", "allow_pickle")


@dataclass
class DefenseResult:
    """Where the purified model is (a directory ``evaluate --model`` accepts) and its cost."""

    model_path: str
    summary: dict[str, Any]


class Defense:
    """Base class of every defense. ``self.settings`` is the defense's own section (an instance of ``Config``)."""

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "training"
    Config: ClassVar[type | None] = None
    needs_data: ClassVar[bool] = True  # False: runs without clean samples (``defend`` needs no --data)

    def __init__(self, cfg: DefenseConfig) -> None:
        self.cfg = cfg
        self.settings = cfg.section(self.name) if self.Config is not None else None

    def run(
        self,
        model: ModelConfig,
        clean_data: list[Example],
        ctx: StageContext,
    ) -> DefenseResult:
        """Training and weights defenses implement this. A decoding defense's output is its ``defense.json``
        (:func:`write_decoding_spec`), which this default writes; it needs no clean data."""
        if self.kind != "decoding":
            raise NotImplementedError(f"defense {self.name!r} must implement run")
        return write_decoding_spec(self, model, ctx)

    def check(self) -> None:
        """Raise a one-line ``ConfigError`` for settings that cannot work, before any model loads or any earlier
        stage of ``crowguard run`` spends time (a defense that needs more than its config validates says so here)."""

    def generator(self, spec: dict[str, Any], device: str = "auto") -> Generator:
        """Decoding defenses only: the :class:`~crowguard.evaluation.generate.Generator` evaluation uses for the model
        in ``spec``."""
        raise NotImplementedError(f"defense {self.name!r} is not a decoding-time defense")


def make_defense(cfg: DefenseConfig) -> Defense:
    """The registered defense named ``cfg.method``, built from its config section."""
    from crowguard.registry import resolve

    return resolve("defenses", cfg.method)(cfg)


def read_spec(path: str | Path) -> dict[str, Any] | None:
    """The ``defense.json`` of a decoding defense's output directory, or None for any other model path."""
    spec_path = Path(path) / DEFENSE_FILE
    if not spec_path.is_file():
        return None
    from crowguard.config import ConfigError

    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{spec_path}: unreadable decoding-defense file: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{spec_path}: expected a JSON object with defense, model and settings")
    missing = [key for key in ("defense", "model", "settings") if key not in spec]
    if missing:
        raise ConfigError(f"{spec_path}: missing {', '.join(missing)}")
    for key in ("model", "settings"):
        if not isinstance(spec[key], dict):
            raise ConfigError(f"{spec_path}: {key} must be a mapping, got {spec[key]!r}")
    return spec


def absolute_ref(ref: str | None) -> str | None:
    """A local path made absolute (so a ``defense.json`` works from any directory); a Hub id or None unchanged."""
    from crowguard.models import local_path

    if not ref or not Path(local_path(ref)).exists():
        return ref
    return str(Path(local_path(ref)).resolve())


def guarded_model(spec: dict[str, Any], evaluation: ModelConfig | None = None) -> ModelConfig:
    """The suspect model a decoding defense guards (the ``model`` of its ``defense.json``).

    ``evaluation`` is the evaluating command's model config: its ``dtype``, ``device``, ``trust_remote_code`` and
    ``allow_pickle`` (:data:`EVALUATION_MODEL_FIELDS`) replace the recorded ones, so where the model runs is the
    evaluator's choice and a ``defense.json`` cannot switch remote code or pickled weights on by itself. The
    identity (path or Hub id, adapter, revision) and the template are the recorded ones.
    """
    import dataclasses

    from crowguard.config import from_dict

    model = from_dict(ModelConfig, spec["model"], "defense.json: model")
    if evaluation is not None:
        model = dataclasses.replace(model, **{key: getattr(evaluation, key) for key in EVALUATION_MODEL_FIELDS})
    return model


def write_decoding_spec(
    defense: Defense,
    model: ModelConfig,
    ctx: StageContext,
    summary: dict[str, Any] | None = None,
) -> DefenseResult:
    """A decoding defense's ``run``: check the output directory and the guarded model, then write ``defense.json``
    = {"defense", "model", "settings"} through :func:`crowguard.stage.stage_artefact` (atomic, with
    ``config.yaml``, ``defense_summary.json`` and ``manifest.json``). No weights are copied; the directory is only
    as valid as the model it names (a local path is recorded absolute)."""
    import dataclasses
    import time

    from crowguard.config import to_dict
    from crowguard.io import check_output_dir, write_json_atomic
    from crowguard.models import check_model_exists
    from crowguard.stage import stage_artefact

    start = time.perf_counter()
    out_dir, overwrite, resolved_config, inputs = Path(ctx.out_dir), ctx.overwrite, ctx.resolved_config, ctx.inputs
    check_output_dir(out_dir, overwrite)
    check_model_exists(model.name_or_path, model.adapter, model.revision)
    model = dataclasses.replace(
        model, name_or_path=absolute_ref(model.name_or_path), adapter=absolute_ref(model.adapter)
    )
    settings = to_dict(defense.settings) if defense.settings is not None else {}
    spec = {"defense": defense.name, "model": to_dict(model), "settings": settings}
    staged_inputs = {"model": model.name_or_path, **({"adapter": model.adapter} if model.adapter else {})}
    staged_inputs.update(inputs or {})
    record = {
        "stage": f"defend:{defense.name}",
        "defense": defense.name,
        "kind": defense.kind,
        defense.name: settings,
        "model": model.name_or_path,
        "adapter": model.adapter,
        "steps": 0,
        "weights_copied": False,
        **(summary or {}),
    }
    with stage_artefact(
        f"defend:{defense.name}",
        out_dir,
        settings.get("seed"),
        staged_inputs,
        record,
        resolved_config,
        overwrite,
        summary_name="defense_summary.json",
        fingerprint=ctx.fingerprint,
    ) as tmp:
        write_json_atomic(tmp / DEFENSE_FILE, spec)
        record["seconds"] = time.perf_counter() - start
    return DefenseResult(model_path=str(out_dir), summary=record)


def open_for_evaluation(spec: dict[str, Any], device: str = "auto") -> tuple[Generator, dict[str, Any]]:
    """Ask the decoding defense in ``spec`` how to generate: (its generator, what to record in the results).

    ``spec["model"]`` is the guarded model as evaluation loads it (see :func:`guarded_model`); the generator reads
    its dtype and template from there.
    """
    from crowguard.config import ConfigError, from_dict

    defense_cfg = from_dict(
        DefenseConfig, {"method": spec["defense"], spec["defense"]: spec["settings"]}, "defense.json"
    )
    defense = make_defense(defense_cfg)
    if defense.kind != "decoding":
        raise ConfigError(f"defense.json names {spec['defense']!r}, a {defense.kind} defense, not a decoding one")
    record = {"defense": spec["defense"], "kind": defense.kind, "settings": spec["settings"], "model": spec["model"]}
    return defense.generator(spec, device), record


def open_evaluated(
    model: ModelConfig, device: str | None = None
) -> tuple[Any, Any, Generator | None, dict[str, Any] | None, ModelConfig]:
    """Load what ``model`` names for an evaluation: ``(model, tokenizer, generator, defense, target)``.

    A plain model or adapter gives itself and ``generator = None`` (generate as usual); a decoding defense's
    directory gives the guarded model (with ``model``'s placement and trust switches), the defense's generator
    and what to record of it. ``target`` is the model that was loaded.
    """
    from crowguard.config import to_dict
    from crowguard.models import load_model

    device = device or model.device
    spec = read_spec(model.name_or_path)
    target, generator, defense = model, None, None
    if spec is not None:
        target = guarded_model(spec, model)
        generator, defense = open_for_evaluation({**spec, "model": to_dict(target)}, device)
    loaded, tokenizer = load_model(target.name_or_path, target.adapter, dtype=target.dtype,
                                   trust_remote_code=target.trust_remote_code, allow_pickle=target.allow_pickle,
                                   revision=target.revision, device=device)  # fmt: skip
    return loaded, tokenizer, generator, defense, target
