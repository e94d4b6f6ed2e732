"""The GPUs this process can see, from ``nvidia-smi`` (as the upstream FMA requester does).

The devices a container holds are what ``nvidia-smi -L`` lists: a whole GPU by its ``GPU-`` UUID, a MIG
instance by its ``MIG-`` UUID under its parent GPU. ``--query-gpu=uuid`` is no substitute on a MIG node: it
answers the parent GPU's UUID, which a worker pointed at it would not get (only the instance was allocated).
"""

from __future__ import annotations

import re
import shutil
import subprocess

# "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5b...)" and, below it, "  MIG 1g.5gb Device 0: (UUID: MIG-c6d4...)"
# (drivers before R470 wrote a MIG instance as "MIG-GPU-<parent uuid>/<gi>/<ci>": taken as written).
_LINE = re.compile(r"^\s*(GPU|MIG)\b.*\(UUID:\s*([^)\s]+)\)")


def _run(args: list[str]) -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def nvidia_smi(fields: list[str], nounits: bool = False) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-gpu=FIELDS``; empty without GPUs or without the tool."""
    fmt = "csv,noheader,nounits" if nounits else "csv,noheader"
    out = _run([f"--query-gpu={','.join(fields)}", f"--format={fmt}"])
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def parse_device_listing(text: str) -> list[str]:
    """The device UUIDs in ``nvidia-smi -L`` output: each GPU's MIG instances where it lists any, else the GPU."""
    devices: list[str] = []
    gpu: str | None = None
    migs: list[str] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        if m.group(1) == "GPU":
            if gpu is not None:
                devices.extend(migs or [gpu])
            gpu, migs = m.group(2), []
        else:
            migs.append(m.group(2))
    if gpu is not None:
        devices.extend(migs or [gpu])
    return devices


def gpu_uuids() -> list[str]:
    """The devices this container holds (``GPU-...`` or ``MIG-...``); empty without GPUs or ``nvidia-smi``."""
    return parse_device_listing(_run(["-L"]))
