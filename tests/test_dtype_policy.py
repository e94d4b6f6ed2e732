"""dtype "auto": the checkpoint's own type where the device multiplies it natively (fma_worker/dtype_policy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fma_worker import dtype_policy as dp

EPYC_GENOA = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"  # the VM
SAPPHIRE_RAPIDS = "flags\t\t: avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: sse2 avx2 avx512f avx512bw\n"
GRAVITON3 = "Features\t: fp asimd bf16 sve\n"  # Arm names bf16 differently: not recognised, so float32


@pytest.mark.parametrize(("cpuinfo", "native"), [
    (EPYC_GENOA, {"bfloat16"}),
    (SAPPHIRE_RAPIDS, {"bfloat16", "float16"}),
    (SKYLAKE, set()),
    (GRAVITON3, set()),
    ("", set()),
])
def test_the_cpu_flags_say_which_reduced_types_are_native(cpuinfo: str, native: set[str]):
    assert dp.cpu_native(cpuinfo) == native


@pytest.mark.parametrize(("requested", "device", "checkpoint", "native", "chosen"), [
    # A bfloat16 checkpoint stays bfloat16 where the CPU has the instructions, float32 where it has not.
    ("auto", "cpu", "bfloat16", dp.cpu_native(EPYC_GENOA), "bfloat16"),
    ("auto", "cpu", "bfloat16", dp.cpu_native(SKYLAKE), "float32"),
    ("auto", "cpu", "float16", dp.cpu_native(EPYC_GENOA), "float32"),  # no fp16 arithmetic on Genoa
    ("auto", "cpu", "float16", dp.cpu_native(SAPPHIRE_RAPIDS), "float16"),
    ("auto", "cpu", "float32", dp.cpu_native(SAPPHIRE_RAPIDS), "float32"),  # never below the checkpoint's type
    ("auto", "cpu", None, dp.cpu_native(SAPPHIRE_RAPIDS), "float32"),
    # GPUs: the checkpoint's type where native, never float32.
    ("auto", "cuda", "bfloat16", dp.cuda_native((9, 0)), "bfloat16"),
    ("auto", "cuda", "bfloat16", dp.cuda_native((7, 5)), "float16"),  # T4: no bfloat16
    ("auto", "cuda:1", "float16", dp.cuda_native((8, 0)), "float16"),
    ("auto", "cuda", "float32", dp.cuda_native((8, 9)), "bfloat16"),
    ("auto", "cuda", None, dp.cuda_native((7, 0)), "float16"),
    # Set explicitly, it is what the user said.
    ("float32", "cpu", "bfloat16", dp.cpu_native(EPYC_GENOA), "float32"),
    ("bfloat16", "cpu", "float32", dp.cpu_native(SKYLAKE), "bfloat16"),
])
def test_auto_serves_the_checkpoints_type_where_the_device_computes_it(requested, device, checkpoint, native, chosen):
    choice = dp.choose(requested, device, checkpoint, native)
    assert choice.dtype == chosen
    assert choice.reason


def test_a_folders_checkpoint_type_comes_from_its_config(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert dp.folder_checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16", "torch_dtype": "float32"}))
    assert dp.folder_checkpoint_dtype(tmp_path) == "float16", "transformers 5 writes dtype"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "int8"}))
    assert dp.folder_checkpoint_dtype(tmp_path) is None
    assert dp.folder_checkpoint_dtype(tmp_path / "missing") is None


def test_the_launcher_prepares_the_type_the_worker_will_compute_in(tmp_path: Path, converted_model_dir: Path):
    """The launcher decides without a device (prepared.target); the engine decides with one; they agree on a CPU."""
    from fma_worker import prepared

    native = dp.host_native("cpu")
    env = {"FMA_MODEL": "m", "FMA_MODEL_SOURCE": f"path:{converted_model_dir}", "FMA_DEVICE": "cpu",
           "FMA_CACHE_DIR": str(tmp_path)}
    found = prepared.target(env)
    assert found is not None
    folder_type = dp.folder_checkpoint_dtype(converted_model_dir)
    assert found[1] == dp.choose("auto", "cpu", folder_type, native).dtype


def test_each_source_kind_says_its_checkpoint_type(tmp_path: Path):
    import types

    import torch

    from fma_common.sources import ModelSource

    assert dp.source_checkpoint_dtype(ModelSource("embedded", "smollm2-135m-instruct")) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert dp.source_checkpoint_dtype(ModelSource("path", str(tmp_path))) == "float16"
    hub = types.SimpleNamespace(dtype=torch.bfloat16)  # what AutoConfig gives for a hub model
    assert dp.source_checkpoint_dtype(ModelSource("hf", "org/name"), hub) == "bfloat16"
    assert dp.source_checkpoint_dtype(ModelSource("hf", "org/name"), types.SimpleNamespace()) is None
