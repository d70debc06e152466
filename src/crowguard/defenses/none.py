"""No defense: the model as it is (the row every table compares against).

It trains nothing and writes nothing, so it takes no output directory: a directory that is not a loadable model,
where every other defense leaves one, would break ``evaluate --model OUT``; copying the weights would duplicate
gigabytes, and links would make a "result" that changes with its source. ``crowguard run`` and the demo evaluate
the input model directly, and so should a user.
"""

from __future__ import annotations

from crowguard.config import ConfigError
from crowguard.defenses.base import Defense, DefenseResult
from crowguard.schemas import ModelConfig
from crowguard.types import Example, StageContext


def as_given(model: ModelConfig) -> str:
    """The model as ``evaluate`` flags: ``--model M [--adapter A]`` (what to evaluate instead of a ``none`` output)."""
    return f"--model {model.name_or_path}" + (f" --adapter {model.adapter}" if model.adapter else "")


class NoDefense(Defense):
    name = "none"
    kind = "none"

    def run(self, model: ModelConfig, clean_data: list[Example], ctx: StageContext) -> DefenseResult:
        """Nothing to train; the model (and its adapter, if any) is evaluated as given."""
        out_dir = ctx.out_dir
        if out_dir is not None:
            raise ConfigError(
                f"defense 'none' trains and writes nothing, so there is nothing to put in {out_dir}: drop --out and "
                f"evaluate the model as given (crowguard evaluate {as_given(model)} ...)"
            )
        from crowguard.models import check_model_exists

        check_model_exists(model.name_or_path, model.adapter, model.revision)
        summary = {"stage": "none", "seconds": 0.0, "steps": 0, "model": model.name_or_path, "adapter": model.adapter}
        return DefenseResult(model_path=model.name_or_path, summary=summary)
