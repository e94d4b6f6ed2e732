"""A worker given a GPU sees it, or refuses to start with the reason: never runs on the CPU unasked.

Issue 22, point 1. The pure check (fma_worker/gpu_check.py) for each binding and
what CUDA may report; the requester's device listing on MIG nodes; and, on this
CPU machine, a worker process given a GPU failing its start within seconds, the
reason reaching the requester's error and log through Knative (simulated: the
container's exit, FallbackToLogsOnError, the Revision's "Container failed with").
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from knative_sim import SimulatedKnative
from knative_webhook import ClusterConfig
from kube_fake import FakeKube, load_role, write_kubeconfig
from test_knative import NS, RBAC, seed_requester

from conftest import EMBEDDED, REPO, free_port, requester
from fma_requester.gpus import parse_device_listing
from fma_worker.gpu_check import Visible, bare_uuid, gpu_problem

UUID_A = "GPU-5d5ba0d6-d33d-2b2c-524d-e2ac44f4a6ef"
MIG_1 = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"
MIG_2 = "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"
CUDA = "12.8"


# ---- the check, pure ---------------------------------------------------------------------------

def test_a_shared_worker_that_sees_no_device_names_the_node_runtime_setting():
    why = gpu_problem("shared", 1, [UUID_A], Visible(CUDA, ()), {"NVIDIA_VISIBLE_DEVICES": UUID_A})
    assert why is not None
    assert UUID_A in why and "sees 0 CUDA devices" in why and f"NVIDIA_VISIBLE_DEVICES={UUID_A}" in why
    assert "accept-nvidia-visible-devices-envvar-when-unprivileged" in why and "CDI" in why


def test_a_dedicated_worker_that_sees_no_device_points_at_the_driver_not_the_runtime_variable():
    why = gpu_problem("dedicated", 1, [], Visible(CUDA, ()), {})
    assert why is not None and "device plugin" in why and "accept-nvidia" not in why


def test_a_cpu_only_torch_is_named_as_the_cause_whatever_the_binding():
    for binding in ("shared", "dedicated"):
        why = gpu_problem(binding, 1, [], Visible(None, ()), {})
        assert why is not None and "CPU-only build" in why and "knative.gpus to 0" in why


def test_a_driver_error_is_reported_as_what_cuda_said():
    why = gpu_problem("dedicated", 1, [], Visible(CUDA, (), "RuntimeError: CUDA driver version is insufficient"), {})
    assert why is not None and "driver version is insufficient" in why


def test_fewer_devices_than_given_is_refused():
    why = gpu_problem("dedicated", 2, [], Visible(CUDA, ("5d5ba0d6-d33d-2b2c-524d-e2ac44f4a6ef",)), {})
    assert why is not None and "given 2 GPUs" in why and "sees 1 CUDA device" in why


def test_cuda_reports_bare_uuids_and_they_match_the_names_nvidia_smi_writes():
    assert bare_uuid(UUID_A) == bare_uuid(UUID_A.removeprefix("GPU-").upper())
    assert gpu_problem("shared", 1, [UUID_A], Visible(CUDA, (UUID_A.removeprefix("GPU-"),)), {}) is None
    assert gpu_problem("shared", 1, [MIG_1], Visible(CUDA, (MIG_1.removeprefix("MIG-"),)), {}) is None


def test_a_worker_that_sees_another_gpu_than_the_one_given_is_refused():
    other = "GPU-0f6b3a2e-9e7c-4c41-8f3a-1b2c3d4e5f60"
    why = gpu_problem("shared", 1, [UUID_A], Visible(CUDA, (other.removeprefix("GPU-"),)), {})
    assert why is not None and UUID_A in why and "other devices" in why


def test_a_mig_instance_is_counted_not_compared():
    """Whether CUDA's device UUID is a MIG instance's own is not confirmed without a MIG GPU: a wrong refusal
    would stop a correct setup, so only the count is checked."""
    assert gpu_problem("shared", 1, [MIG_1], Visible(CUDA, (MIG_2.removeprefix("MIG-"),)), {}) is None
    assert gpu_problem("shared", 1, [MIG_1], Visible(CUDA, ()), {}) is not None


def test_nothing_is_checked_without_a_gpu_or_where_devices_are_named_by_index():
    assert gpu_problem("none", 0, [], Visible(None, ()), {}) is None
    assert gpu_problem("dedicated", 0, [], Visible(None, ()), {}) is None
    assert gpu_problem("shared", 1, ["0"], Visible(CUDA, ("anything",)), {}) is None  # an index names no device
    # The pre-R470 MIG form has no UUID of its own: counted, not compared.
    old = "MIG-GPU-5d5ba0d6-d33d-2b2c-524d-e2ac44f4a6ef/7/0"
    assert bare_uuid(old) == old.lower()


# ---- the requester's devices: nvidia-smi -L ----------------------------------------------------

WHOLE = f"""GPU 0: NVIDIA H100 80GB HBM3 (UUID: {UUID_A})
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0f6b3a2e-9e7c-4c41-8f3a-1b2c3d4e5f60)
"""
MIG = f"""GPU 0: NVIDIA A100-SXM4-40GB (UUID: {UUID_A})
  MIG 1g.5gb      Device  0: (UUID: {MIG_1})
  MIG 1g.5gb      Device  1: (UUID: {MIG_2})
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0f6b3a2e-9e7c-4c41-8f3a-1b2c3d4e5f60)
"""
OLD_MIG = f"""GPU 0: A100-SXM4-40GB (UUID: {UUID_A})
  MIG 3g.20gb Device 0: (UUID: MIG-{UUID_A}/1/0)
"""


def test_whole_gpus_are_listed_by_their_gpu_uuids():
    assert parse_device_listing(WHOLE) == [UUID_A, "GPU-0f6b3a2e-9e7c-4c41-8f3a-1b2c3d4e5f60"]


def test_a_mig_instance_is_listed_by_its_own_uuid_not_its_parents():
    assert parse_device_listing(MIG) == [MIG_1, MIG_2, "GPU-0f6b3a2e-9e7c-4c41-8f3a-1b2c3d4e5f60"]
    assert parse_device_listing(OLD_MIG) == [f"MIG-{UUID_A}/1/0"]
    assert parse_device_listing("") == [] and parse_device_listing("No devices were found\n") == []


# ---- a real worker process on this CPU machine ---------------------------------------------------

@pytest.mark.process
def test_a_worker_process_given_a_gpu_it_cannot_see_exits_within_seconds_with_the_reason(converted_model_dir: Path,
                                                                                        tmp_path: Path):
    env = {**os.environ, "K_SERVICE": "fma-worker-x", "FMA_MODEL": EMBEDDED, "FMA_GPUS": "1",
           "FMA_GPU_BINDING": "shared", "FMA_GPU_UUIDS": MIG_1, "NVIDIA_VISIBLE_DEVICES": MIG_1,
           "FMA_CACHE_DIR": str(converted_model_dir.parents[2]), "FMA_HOST": "127.0.0.1"}
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "fma_cli.main", "worker", "--model", EMBEDDED, "--port", str(free_port())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert out.returncode == 3, out.stderr[-2000:]  # gunicorn's "worker failed to boot": the arbiter halts
    assert f"given 1 GPU ({MIG_1})" in out.stderr and "CPU-only build" in out.stderr
    assert "Traceback" not in out.stderr, "the reason is the whole story"
    print(f"worker refused its start in {took:.1f} s")
    assert took < 30


def fake_nvidia_smi(folder: Path, listing: str) -> Path:
    """``nvidia-smi`` as a MIG node's requester container has it (this machine has none)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" f"if [ \"$1\" = -L ]; then cat <<'EOF'\n{listing}EOF\nfi\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


@pytest.mark.process
@pytest.mark.parametrize("binding", ["shared", "dedicated"])
def test_a_knative_worker_given_a_gpu_on_a_cpu_node_fails_the_start_with_its_reason(
        binding: str, tmp_path: Path, converted_model_dir: Path):
    """Through the requester in knative mode: the worker's pod exits, Knative marks the Revision failed with the
    container's last words, and the requester answers the waiting client with them within seconds, not at the
    start timeout. Shared binding on a MIG node: the worker is given the MIG instance, not its parent GPU."""
    kube = FakeKube(role=load_role(*RBAC)).start()
    flags = {"kubernetes.podspec-affinity": "enabled", "kubernetes.podspec-tolerations": "enabled",
             "kubernetes.podspec-runtimeclassname": "enabled"}
    claim = {"kubernetes.podspec-persistent-volume-claim": "enabled"}  # the shipped template's model cache
    sim = SimulatedKnative(kube, tmp_path, cache_dir=converted_model_dir.parents[2], default="process", speed=10,
                           config=ClusterConfig(features={**(flags if binding == "shared" else {}), **claim}),
                           claims={"fma-models": tmp_path / "fma-models"})
    try:
        seed_requester(kube, "t")
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, kube.url, namespace=NS)
        models = tmp_path / "models.yaml"
        models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', dtype: float32, "
                          f"knative: {{gpus: 1, gpu_binding: {binding}}}}}\n")
        bin_dir = fake_nvidia_smi(tmp_path / "bin", MIG)
        env = {"FMA_ACTUATOR": "knative", "KUBECONFIG": str(kubeconfig), "FMA_NAMESPACE": NS,
               "FMA_WORKER_TEMPLATE": str(REPO / "knative" / "base" / "worker-template.yaml"),
               "FMA_WORKER_TOKEN": "t", "NODE_NAME": "gpu-node-1",
               "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        with requester(tmp_path, models, **env) as req:
            t0 = time.monotonic()
            resp = httpx.post(f"{req.spi}/v1/completions", json={"model": EMBEDDED, "prompt": "Hi", "max_tokens": 2},
                              timeout=120)
            took = time.monotonic() - t0
            print(f"{binding}: {resp.status_code} after {took:.1f} s: {resp.text[:400]}")
            assert resp.status_code == 503, resp.text
            error = resp.json()["error"]
            assert "CPU-only build" in error["message"], error
            assert took < 60, "the start failed at once, not at the start timeout"
            (svc,) = [s for s in kube.list_objects(NS, "services") if s["metadata"]["name"].startswith("fma-worker-")]
            worker_env = {e["name"]: e.get("value") for e in svc["spec"]["template"]["spec"]["containers"][0]["env"]}
            if binding == "shared":
                assert worker_env["FMA_GPU_UUIDS"] == MIG_1, "the MIG instance, not its parent GPU"
                assert svc["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia-legacy", "the shipped template"
                assert f"given 1 GPU ({MIG_1})" in error["message"]
            else:
                assert "FMA_GPU_UUIDS" not in worker_env and worker_env["FMA_GPU_BINDING"] == "dedicated"
            assert "CPU-only build" in req.log(), "the reason is in the requester's log too"
    finally:
        sim.stop()
        kube.stop()
