"""The GPUs this process can see, from ``nvidia-smi`` (as the upstream FMA requester does)."""

from __future__ import annotations

import shutil
import subprocess


def nvidia_smi(fields: list[str], nounits: bool = False) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-gpu=FIELDS``; empty without GPUs or without the tool."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    fmt = "csv,noheader,nounits" if nounits else "csv,noheader"
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", f"--format={fmt}"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_uuids() -> list[str]:
    return [row[0] for row in nvidia_smi(["uuid"])]
