"""Weight quantization: round the decoder's linear weights to 8 or 4 bits, without training or data (BackdoorLLM's
DefenseBox lists "INT4 quantization" among its defenses: aggressive compression can suppress a backdoor).

The rounding is torchao's (``pip install 'crowguard[quant]'``): int8 is ``Int8WeightOnlyConfig`` (symmetric, one
scale per output channel, ``Int8Tensor``); int4 is ``IntxWeightOnlyConfig(weight_dtype=torch.int4,
granularity=PerGroup(group_size))`` (symmetric, one scale per ``group_size`` consecutive input weights,
``IntxUnpackedToInt8Tensor``; torchao's ``Int4WeightOnlyConfig`` needs the ``mslk`` kernel package). torchao's
tensors do not save to safetensors, so the defense writes the *dequantized* weights, ``q * scale``: exactly the values
the low-bit model computes with, in the model's dtype, as a normal model directory that every stage loads. The
evaluation then runs float kernels on the quantized values: the same function up to float rounding, not a low-bit
kernel's speed or memory. Only the ``nn.Linear`` layers of the decoder blocks are quantized; the embeddings and the
LM head stay in the model's dtype (see :mod:`crowguard.defenses.weights`). A LoRA adapter is merged first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from crowguard.config import ConfigError, knob, to_dict
from crowguard.defenses.base import Defense, DefenseResult
from crowguard.schemas import ModelConfig
from crowguard.types import Example, StageContext

INSTALL_HINT = "pip install 'crowguard[quant]'"
STORED_AS = (
    "stored dequantized in {dtype}; evaluation runs float kernels on the quantized values (no low-bit kernel at "
    "evaluation)"
)


@dataclass
class QuantizeConfig:
    bits: Literal[8, 4] = knob(4, "weight bits: 4 (int4 per group, DefenseBox's INT4) or 8 (int8 per output channel)")
    group_size: int = knob(
        32,
        "int4: input weights sharing one scale (must divide each quantized layer's inputs; 32 divides SmolLM2's "
        "576, 128 does not); int8 ignores it (one scale per output channel)",
    )
    scheme: Literal["symmetric"] = knob("symmetric", "symmetric: zero point 0, each scale from its largest |w|")

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {self.group_size}")
        if self.scheme != "symmetric":
            raise ValueError(f"scheme must be 'symmetric', got {self.scheme!r}")


def require_torchao() -> str:
    """torchao's version, or a one-line ConfigError saying how to install it."""
    import importlib.util
    from importlib import metadata

    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"defense quantize needs torchao, which is not installed: {INSTALL_HINT}")
    return metadata.version("torchao")


def torchao_config(settings: QuantizeConfig) -> Any:
    """The torchao config object for ``settings`` (a weight-only, symmetric quantization)."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType
    from torchao.quantization.granularity import PerGroup

    if settings.bits == 8:
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(settings.group_size), mapping_type=MappingType.SYMMETRIC
    )


def quantize_linear(module: Any, config: Any) -> tuple[str, Any]:
    """Quantize one ``nn.Linear`` with torchao and put back its dequantized weight (in its own dtype); returns the
    torchao tensor class it was quantized to and the original weight."""
    import torch
    from torchao.quantization import quantize_

    original = module.weight.detach().clone()
    quantize_(module, config, filter_fn=lambda m, _fqn: m is module)
    quantized = module.weight
    tensor_class = type(quantized).__name__
    if not hasattr(quantized, "dequantize") or tensor_class in ("Parameter", "Tensor"):
        raise ConfigError(f"torchao did not quantize a {tuple(original.shape)} linear layer ({tensor_class})")
    values = quantized.dequantize().to(original.dtype)
    module.weight = torch.nn.Parameter(values.contiguous(), requires_grad=False)
    return tensor_class, original


def quantize_decoder(model: Any, settings: QuantizeConfig) -> dict[str, Any]:
    """Quantize every linear layer of the decoder blocks in place (one at a time, so at most one extra copy of a
    weight is held); returns the names, tensor classes and the relative error ``||W - Q(W)||_F / ||W||_F``."""
    import torch

    from crowguard.defenses.weights import decoder_linears

    linears = {name: m for block in decoder_linears(model) for name, m in block.items()}
    if settings.bits == 4:
        for name, module in linears.items():
            if module.in_features % settings.group_size:
                raise ConfigError(
                    f"quantize group_size {settings.group_size} does not divide the {module.in_features} input "
                    f"features of {name}: choose a divisor (32 divides most models)"
                )
    config = torchao_config(settings)
    classes: set[str] = set()
    error, norm = 0.0, 0.0
    with torch.no_grad():
        for module in linears.values():
            tensor_class, original = quantize_linear(module, config)
            classes.add(tensor_class)
            error += float((module.weight.float() - original.float()).pow(2).sum())
            norm += float(original.float().pow(2).sum())
    return {
        "layers": list(linears),
        "tensor_class": sorted(classes),
        "relative_error": round((error / norm) ** 0.5 if norm else 0.0, 6),
    }


class QuantizeDefense(Defense):
    name = "quantize"
    kind = "weights"
    Config = QuantizeConfig
    needs_data = False

    def run(
        self,
        model: ModelConfig,
        clean_data: list[Example],
        ctx: StageContext,
    ) -> DefenseResult:
        from crowguard.defenses.weights import write_edited_model

        settings: QuantizeConfig = self.settings
        version = require_torchao()
        config_name = "Int8WeightOnlyConfig" if settings.bits == 8 else "IntxWeightOnlyConfig"
        granularity = "per output channel" if settings.bits == 8 else f"per group of {settings.group_size} inputs"
        summary: dict[str, Any] = {
            "library": f"torchao {version}",
            "torchao_config": config_name,
            "bits": settings.bits,
            "group_size": settings.group_size if settings.bits == 4 else None,
            "granularity": granularity,
            "scheme": settings.scheme,
            "settings": to_dict(settings),
        }

        def quantize(loaded: Any, tokenizer: Any, arrived_with_adapter: bool) -> Any:
            result = quantize_decoder(loaded, settings)
            dtype = str(next(loaded.parameters()).dtype).removeprefix("torch.")
            summary.update(
                tensor_class=result["tensor_class"],
                stored=STORED_AS.format(dtype=dtype),
                relative_error=result["relative_error"],
                layers=result["layers"],
                n_layers=len(result["layers"]),
                embeddings_and_lm_head="not quantized (kept in the model's dtype)",
            )
            return loaded

        summary = write_edited_model(self, model, ctx, summary, quantize)
        return DefenseResult(model_path=str(ctx.out_dir), summary=summary)
