"""Speed levers of the training engine and of decoding (issue 28: a SmolLM2 step on 2 CPU cores), each behind a
knob whose default is the plain path, but ``evaluate.merge_lora`` (adopted on a CPU: it gives the same tokens).
Measured side by side by ``benchmarks/cpu_speed.py``.

- ``train.compile: layers`` (:func:`compiled_blocks`): ``torch.compile`` (inductor; on a CPU it writes C++ with
  gcc) of each repeated decoder block, in place, for one training run. Regional compilation
  (https://pytorch.org/tutorials/recipes/regional_compilation.html): the blocks are one class, so one block's graph
  serves every layer and the compile time does not grow with depth; the embedding lookup with CROW's hook, the
  hidden-state collection, the final norm, the LM head and the loss stay eager. Float32 throughout, so the losses
  are those of the eager path up to the order of float additions in the fused kernels.
- ``train.base_dtype: bfloat16`` (:func:`frozen_base_dtype`): the frozen base weights are cast to bfloat16 for one
  training run and the originals put back afterwards, so what is saved, merged and evaluated is the model as it was
  loaded plus the adapter; the LoRA adapter's weights, gradients and optimizer state stay float32 (peft runs the
  adapter in its own dtype). Activations between the layers are bfloat16 then: the maths is not the float32 one.
- ``auto`` for the three training knobs (:func:`resolve_auto_levers`): all three for LoRA on a CPU that multiplies
  bfloat16 in hardware, the plain path elsewhere; made concrete before a run is fingerprinted, trained or recorded.
- ``evaluate.compile_decode`` (:func:`decode_compile_config`): transformers compiles the model's forward for the
  one-token decoding steps over the static key/value cache (the prompt pass stays eager), which it does on its own
  on a GPU only.
- ``evaluate.merge_lora`` (:func:`merge_for_evaluation`): a LoRA adapter is merged into its base weights before an
  evaluation, so each adapted layer is one matrix product instead of three (decoding 1.13-1.35x on 2 CPU cores, the
  same greedy tokens: ``docs/benchmarks.md``). On by default on a CPU only: a GPU keeps the adapter apart (unmeasured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from crowguard.config import ConfigError


def _inner_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model below wrappers (DDP, DeepSpeed: ``.module``; peft: ``get_base_model()``)."""
    inner = model
    while isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: the modules of the classes it names in ``_no_split_modules`` (transformers'
    list of blocks that must stay whole, e.g. ``LlamaDecoderLayer``), else the children of its longest
    ``nn.ModuleList`` whose children all share one class. Empty when neither exists."""
    inner = _inner_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [module for module in inner.modules() if type(module).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in inner.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(child) for child in m}) == 1]  # fmt: skip
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, enabled: bool = True) -> Iterator[list[nn.Module]]:
    """Within the block, every repeated decoder block of ``model`` (:func:`repeated_blocks`) runs compiled
    (``nn.Module.compile``: in place, so parameter names, the state dict and peft's view of the model are
    unchanged); on exit the blocks run eagerly again (a later evaluation in the same process does not recompile
    for its shapes). ``enabled=False`` changes nothing.

    ``dynamic=True``: a training run's batches differ in length, and a graph specialised to the first shape would be
    recompiled at the second one anyway. Donated buffers are off for the block (:func:`without_donated_buffers`).
    A block's graph is still recompiled for what its guards see change: whether its input needs a gradient (the
    first block's does not, the others' do) and whether the attention mask is None (a micro-batch without padding);
    transformers' output-capturing hooks on the attention modules (``output_hidden_states``) break each block's graph
    in two. So the first few steps of a run compile, and the speed is the steps' after that.

    Yields:
        The compiled blocks (empty when disabled).
    """
    if not enabled:
        yield []
        return
    blocks = repeated_blocks(model)
    if not blocks:
        name = type(_inner_model(model)).__name__
        raise ConfigError(f"train.compile layers: {name} names no repeated decoder block (_no_split_modules) and "
                          "has no list of same-class blocks; use compile off")  # fmt: skip
    with without_donated_buffers():
        for block in blocks:
            block.compile(dynamic=True)
        try:
            yield blocks
        finally:
            for block in blocks:
                block._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward


@contextlib.contextmanager
def without_donated_buffers(enabled: bool = True) -> Iterator[None]:
    """AOT autograd's donated buffers off within the block (``torch._functorch.config.donated_buffer``): a compiled
    graph that donates its saved buffers refuses a second backward through it, and CROW's perturbation gradient
    keeps the graph (``retain_graph=True``) for the loss's own backward. Needed by every compiled CROW step,
    the Trainer's whole-model ``torch_compile`` included."""
    if not enabled:
        yield
        return
    import torch._functorch.config as functorch_config

    donated = functorch_config.donated_buffer
    functorch_config.donated_buffer = False
    try:
        yield
    finally:
        functorch_config.donated_buffer = donated


BASE_DTYPES = {"bfloat16": torch.bfloat16}


@contextlib.contextmanager
def frozen_base_dtype(model: nn.Module, dtype: str = "model") -> Iterator[int]:
    """Within the block, every frozen floating-point parameter of ``model`` (``requires_grad`` False: the base
    under a LoRA adapter) holds a ``dtype`` copy of its values; on exit the original tensors are put back, unchanged.
    ``dtype="model"`` changes nothing. Buffers (rotary frequencies) are left alone; tied weights are one parameter
    and stay tied. The originals are kept while the block runs (memory: the base once more in ``dtype``).

    Yields:
        The number of parameters cast.
    """
    if dtype == "model":
        yield 0
        return
    if dtype not in BASE_DTYPES:
        raise ValueError(f"base_dtype must be 'model' or one of {', '.join(BASE_DTYPES)}, got {dtype!r}")
    target = BASE_DTYPES[dtype]
    originals: dict[nn.Parameter, torch.Tensor] = {}
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != target:
            originals[param] = param.data
            param.data = param.data.to(target)
    try:
        yield len(originals)
    finally:
        for param, data in originals.items():
            param.data = data


def cpu_bfloat16_native() -> bool | None:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-bf16 or AMX tiles, as torch's ``torch.cpu`` probes
    report); None where this torch has no probe. Without either, a bfloat16 matrix product is emulated and can be
    far slower than float32 (58x on a Zen 3 EPYC with AVX2 only: ``docs/benchmarks.md``)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return any(probe() for probe in probes) if probes else None


def warn_if_slow_bfloat16(setting: str, device: torch.device | str) -> bool:
    """Warn (``UserWarning``, one line naming ``setting``) when ``setting`` asks for bfloat16 maths on a CPU that
    has no bfloat16 hardware (:func:`cpu_bfloat16_native` False): the run is correct but slower, not faster.
    Returns whether it warned."""
    if torch.device(device).type != "cpu" or cpu_bfloat16_native() is not False:
        return False
    message = (f"{setting}: this CPU has neither AVX512-bf16 nor AMX, so bfloat16 maths is emulated and slower "
               "than float32 here (58x for a matmul on a Zen 3 EPYC); use float32")  # fmt: skip
    warnings.warn(message, stacklevel=3)
    return True


def resolve_auto_levers(cfg: Any, cuda: bool | None = None) -> Any:
    """``cfg`` (a ``TrainConfig``) with ``precision``, ``base_dtype`` and ``compile`` given as ``auto`` made concrete
    for the machine that trains (the Trainer's device: the GPU when ``cuda``, default: one is available, else the
    CPU): ``bf16``, ``bfloat16`` and ``layers`` (``off`` beside ``trainer_args.torch_compile``) for LoRA over a
    full-precision base on a CPU with bfloat16 hardware, the combination measured in ``docs/benchmarks.md``;
    ``fp32``, ``model`` and ``off`` otherwise. Other values are kept; a config without ``auto`` comes back as it is."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    lora = cfg.finetune == "lora" and cfg.adapter_mode != "full" and cfg.quantize_base == "none"
    fast = lora and not cuda and bool(cpu_bfloat16_native())
    concrete = {
        "precision": "bf16" if fast else "fp32",
        "base_dtype": "bfloat16" if fast else "model",
        "compile": "layers" if fast and not cfg.trainer_args.get("torch_compile") else "off",
    }
    changes = {name: value for name, value in concrete.items() if getattr(cfg, name) == "auto"}
    return dataclasses.replace(cfg, **changes) if changes else cfg


@contextlib.contextmanager
def training_levers(
    model: nn.Module, compile: str = "off", base_dtype: str = "model", trainer_compiles: bool = False
) -> Iterator[None]:
    """``train.base_dtype`` and ``train.compile`` for one training run (the cast first: the compiled graphs see the
    weights' dtype); ``trainer_compiles`` (``trainer_args.torch_compile``: the Trainer compiles the whole model)
    needs donated buffers off too."""
    with frozen_base_dtype(model, base_dtype), without_donated_buffers(trainer_compiles), \
            compiled_blocks(model, compile == "layers"):  # fmt: skip
        yield


def decode_compile_config() -> Any:
    """transformers' ``CompileConfig`` for the decoding steps on any device: inductor's default mode (the
    ``reduce-overhead`` default uses CUDA graphs), shapes left to dynamo (a batch of another prompt width or size
    is compiled once more, as a dynamic graph, and that serves the rest)."""
    from transformers import CompileConfig

    config = CompileConfig(mode="default", fullgraph=False)
    config._compile_all_devices = True  # transformers compiles the decoding steps on GPUs only unless told so
    return config


def merge_for_evaluation(model: nn.Module, when: str) -> tuple[nn.Module, bool]:
    """``(model, merged)``: ``model`` with its LoRA adapter merged into the base weights (peft's
    ``merge_and_unload``, in place: the caller's model computes the merged function afterwards) when ``when`` is
    ``"always"``, or ``"cpu"`` and the model is on the CPU, and the weights can take it: a peft LoRA model whose
    parameters are all plain floating-point tensors (a quantized base is left apart). Else ``model`` unchanged."""
    from peft import LoraModel, PeftModel

    from crowguard.models import merge_adapter

    if when not in ("cpu", "always", "never"):
        raise ConfigError(f"evaluate.merge_lora must be cpu, always or never, got {when!r}")
    if when == "never" or not isinstance(model, PeftModel) or not isinstance(model.base_model, LoraModel):
        return model, False
    parameters = list(model.parameters())
    if when == "cpu" and parameters[0].device.type != "cpu":
        return model, False
    if not all(type(p.data) is torch.Tensor and p.dtype.is_floating_point for p in parameters):
        return model, False
    return merge_adapter(model), True
