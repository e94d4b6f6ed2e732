"""Which floating-point type a worker computes in: a pure policy over what the checkpoint is and what the device does.

``auto`` serves a checkpoint in its own type where the device multiplies that type natively, since converting
up costs memory and bytes to load and keep asleep for no quality gain: bfloat16 on CPUs with ``avx512_bf16`` or
AMX (oneDNN's bf16 kernels; +43 % tokens/s at one row and +49 % at eight over float32 on a 2-core EPYC,
issue 24) and on GPUs from compute capability 8.0; float16 where that is what the checkpoint has and the
device computes it. A GPU never serves float32 under ``auto`` (vLLM's rule too): a float32 checkpoint gets
bfloat16 where the GPU has it, float16 otherwise. Everything else computes in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fma_common.sources import EMBEDDED_MODELS, ModelSource

DTYPES = ("float32", "bfloat16", "float16")

# /proc/cpuinfo flags that mean the CPU multiplies the type natively (Linux names, x86).
CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


@dataclass(frozen=True)
class Choice:
    dtype: str
    reason: str


def cpu_native(cpuinfo: str) -> frozenset[str]:
    """The reduced-precision types a CPU multiplies natively, from the text of /proc/cpuinfo."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(dtype for dtype, names in CPU_FLAGS.items() if flags.intersection(names))


def cuda_native(capability: tuple[int, int]) -> frozenset[str]:
    """The reduced-precision types a CUDA device of this compute capability multiplies natively."""
    return frozenset({"float16", "bfloat16"} if capability >= (8, 0) else {"float16"})


def checkpoint_dtype(config: dict) -> str | None:
    """The type a Hugging Face config says its weights are stored in (``dtype``, or ``torch_dtype`` before 4.56)."""
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPES else None


def folder_checkpoint_dtype(folder: Path) -> str | None:
    try:
        return checkpoint_dtype(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return None


def source_checkpoint_dtype(source: ModelSource, hub_config: Any = None) -> str | None:
    """The type a model's weights were published in: the embedded registry's word, a folder's config.json, or a
    hub model's config (``hub_config``, loaded by the caller, which needs it for the model too)."""
    if source.kind == "embedded":
        return EMBEDDED_MODELS[source.ref].checkpoint_dtype
    if source.kind == "path":
        return folder_checkpoint_dtype(Path(source.ref))
    value = getattr(hub_config, "dtype", None) or getattr(hub_config, "torch_dtype", None)
    return checkpoint_dtype({"dtype": str(value).removeprefix("torch.")}) if value else None


def choose(requested: str, device: str, checkpoint: str | None, native: frozenset[str]) -> Choice:
    """The type to compute in, and why (the worker logs it and reports it in /v1/models)."""
    if requested != "auto":
        return Choice(requested, "set explicitly")
    names = "+".join(sorted(native)) or "no reduced-precision type"
    if checkpoint in native:
        return Choice(checkpoint, f"the checkpoint's own type, which this {device} device computes natively")
    if device.startswith("cuda"):
        if "bfloat16" in native:
            return Choice("bfloat16", f"a GPU is not served in float32; the checkpoint is {checkpoint or 'unknown'}")
        return Choice("float16", f"a GPU is not served in float32 and this one has no bfloat16 "
                                 f"(checkpoint {checkpoint or 'unknown'})")
    return Choice("float32", f"the checkpoint is {checkpoint or 'of unknown type'} and this CPU multiplies "
                             f"{names} natively")


def host_native(device: str, torch: object | None = None) -> frozenset[str]:
    """What this machine's device multiplies natively. For CUDA, ``torch`` (already imported) is asked."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return cuda_native(tuple(torch.cuda.get_device_capability(index)))  # type: ignore[union-attr]
    try:
        return cpu_native(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()
