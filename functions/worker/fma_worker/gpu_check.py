"""Does this worker see the GPU it was given? Checked before the model loads.

A worker given a GPU (its own ``nvidia.com/gpu``, or the requester's device
shared with it) that sees none must not quietly run on the CPU: a 135M model
would still answer, a 7B one would answer a hundred times slower, and nobody
would know why. The common causes differ by binding, so the reason names the
one that fits:

* **shared**: the worker requests no GPU and is pointed at the requester's
  device. Whether the container gets it is decided by the node's NVIDIA
  container runtime, not by Kubernetes (README "GPU nodes"): legacy mode
  reads ``NVIDIA_VISIBLE_DEVICES`` from unprivileged containers only while
  ``accept-nvidia-visible-devices-envvar-when-unprivileged`` is true
  (nvidia-container-toolkit ``internal/config/image/cuda_image.go``), and
  only for pods the NVIDIA runtime runs at all (the default runtime, or
  ``runtimeClassName``). The GPU Operator's CDI default (v25.10) makes it
  neither the default nor in legacy mode.
* **dedicated**: the device plugin gave the container its devices; seeing
  none means the image's torch has no CUDA or the driver is not mounted.

Whole GPUs are compared by UUID without the ``GPU-`` prefix ``nvidia-smi``
writes (CUDA reports the bare UUID); MIG instances are counted only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The container's terminationMessagePath (Kubernetes' default); FMA_TERMINATION_LOG moves it (a simulator's mount).
TERMINATION_LOG = "/dev/termination-log"


class GpuUnavailable(RuntimeError):
    """The worker was given a GPU it cannot see: a start that no retry fixes."""


@dataclass(frozen=True)
class Visible:
    """What CUDA in this process sees."""

    cuda_build: str | None  # torch.version.cuda: None for a CPU-only torch
    uuids: tuple[str, ...]  # one per device, as CUDA reports them ("" when unknown)
    error: str | None = None  # why CUDA could not be asked, if it could not


def bare_uuid(text: str) -> str:
    """``GPU-3f2c...``, ``MIG-9a1b...`` or a bare UUID: the UUID, lower case. The pre-R470 MIG form
    ``MIG-GPU-<uuid>/<gi>/<ci>`` has no UUID of its own: returned as written, so it matches only itself."""
    t = text.strip()
    for prefix in ("GPU-", "MIG-"):
        if t.upper().startswith(prefix) and not t.upper().startswith("MIG-GPU-"):
            return t[len(prefix):].lower()
    return t.lower()


def parse_device_list(text: str | None) -> list[str]:
    """``NVIDIA_VISIBLE_DEVICES``/``FMA_GPU_UUIDS`` as a list; ``all``, ``none``, ``void`` and indices kept as
    written (they name no particular device)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _names_devices(items: Sequence[str]) -> bool:
    return bool(items) and all(i.upper().startswith(("GPU-", "MIG-")) for i in items)


def gpu_problem(binding: str, expected: int, given: Sequence[str], seen: Visible,
                env: Mapping[str, str]) -> str | None:
    """Why a worker given ``expected`` GPUs (``given`` naming them, when known) under ``binding`` must not start,
    or None when it sees them. Pure: ``seen`` is what CUDA reported, ``env`` the container's environment."""
    if expected <= 0 or binding == "none":
        return None
    wanted = f"{expected} GPU{'s' if expected > 1 else ''}" + (f" ({', '.join(given)})" if given else "")
    how = ("shared with the requester (this pod requests no nvidia.com/gpu)" if binding == "shared"
           else "its own nvidia.com/gpu limit")
    visible_env = env.get("NVIDIA_VISIBLE_DEVICES")
    env_note = f"NVIDIA_VISIBLE_DEVICES={visible_env}" if visible_env is not None else "NVIDIA_VISIBLE_DEVICES unset"
    if seen.cuda_build is None:
        return (f"given {wanted}, {how}, but this image's torch is a CPU-only build (torch.version.cuda is None): "
                f"build the worker image with a CUDA torch, or set the model's knative.gpus to 0 to run on the CPU")
    count = len(seen.uuids)
    if count < expected:
        sees = f"sees {count} CUDA device{'s' if count != 1 else ''}" + (f" ({seen.error})" if seen.error else "")
        if binding == "shared":
            runtime_class = env.get("FMA_GPU_RUNTIME_CLASS") or "none: the node's default runtime"
            cause = ("the node's NVIDIA container runtime did not apply NVIDIA_VISIBLE_DEVICES to this unprivileged "
                     "container. It does so only for pods it runs (the default runtime, or the worker template's "
                     f"gpu_runtime_class; here {runtime_class}), in legacy mode (or CDI mode with gpu_device_kind), "
                     "with accept-nvidia-visible-devices-envvar-when-unprivileged=true. The GPU Operator's CDI "
                     "default (v25.10 and later) leaves runc the default runtime: set gpu_runtime_class: "
                     "nvidia-legacy. See the README's \"GPU nodes\" and `fma doctor`, or use gpu_binding: dedicated")
        else:
            cause = ("the device plugin's devices did not reach the container: check the node's driver and "
                     "container toolkit (kubectl describe node: nvidia.com/gpu allocatable; the GPU Operator's "
                     "validator pods)")
        return f"given {wanted}, {how}, but {sees}; {env_note}. Likely cause: {cause}"
    # Identities are compared for whole GPUs only: CUDA's device UUID is the GPU's (nvidia-smi's GPU- without the
    # prefix); that it is the instance's own for a MIG device is not confirmed here (no MIG GPU to look at), and a
    # wrong refusal would stop a correct setup, so a MIG instance is counted, not compared.
    if _names_devices(given) and all(g.strip().upper().startswith("GPU-") for g in given):
        want = {bare_uuid(g) for g in given}
        have = {bare_uuid(u) for u in seen.uuids if u}
        missing = sorted(g for g in given if bare_uuid(g) not in have)
        if have and missing and want - have:
            return (f"given {wanted}, {how}, but CUDA sees other devices ({', '.join(seen.uuids)}): "
                    f"{', '.join(missing)} not among them; {env_note}. The requester and the worker must name the "
                    f"same devices")
    return None


def visible_devices(torch: Any) -> Visible:
    """Ask CUDA (through torch) what it sees. Never raises: a broken driver is something seen too."""
    build = getattr(getattr(torch, "version", None), "cuda", None)
    if build is None:
        return Visible(None, ())
    try:
        count = int(torch.cuda.device_count())
        uuids = []
        for i in range(count):
            uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
            uuids.append(str(uuid) if uuid is not None else "")
        return Visible(str(build), tuple(uuids))
    except Exception as exc:  # a driver mismatch raises from deep in torch: report it as what is seen
        return Visible(str(build), (), f"{type(exc).__name__}: {exc}")


def write_termination_message(text: str, path: str | None = None) -> bool:
    """Leave ``text`` where the kubelet reads a container's last words (its status'
    ``lastState.terminated.message``; Knative shows it as "Container failed with: ..."). Kubernetes mounts the
    file writable even on a read-only root filesystem; elsewhere it does not exist and nothing is written."""
    path = path or os.environ.get("FMA_TERMINATION_LOG") or TERMINATION_LOG
    if not os.path.exists(path):
        return False
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text[-4096:])  # the kubelet keeps at most 4096 bytes of it
        return True
    except OSError:
        return False
