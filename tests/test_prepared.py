"""Parts of a model built ahead by the launcher (``fma_worker.prepared``): used once, never stale, no CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fma_worker import prepared


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_prepared_parts_are_handed_out_once(model_copy: Path):
    prepared.forget_all()
    parts = prepared.prepare(model_copy, "float32", with_skeleton=True)
    assert parts.skeleton is not None and parts.filled
    assert parts.tokenizer("Hello")["input_ids"]
    assert prepared.take(model_copy, "float32") is parts
    assert prepared.take(model_copy, "float32") is None, "a child uses them once; the next builds its own"
    prepared.prepare(model_copy, "float32", with_skeleton=False)
    assert prepared.take(model_copy, "bfloat16") is None, "another dtype is another model"


def test_prepared_parts_of_a_changed_folder_are_not_used(model_copy: Path):
    prepared.forget_all()
    prepared.prepare(model_copy, "float32", with_skeleton=True)
    tokenizer = model_copy / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text())  # same content, new mtime: a model replaced in place
    os.utime(tokenizer, ns=(1, 1))
    assert prepared.take(model_copy, "float32") is None


def test_the_launchers_skeleton_holds_the_weight_files_mapped_pages_not_a_copy(model_copy: Path):
    """Mapping and assigning 272 tensors cost each forked worker 20 ms; done ahead, the parameters must still be
    the file's mapping (the launcher reads no weight and holds none in its own memory) and the model whole."""
    prepared.forget_all()
    parts = prepared.prepare(model_copy, "float32", with_skeleton=True)
    assert not any(p.device.type == "meta" for p in parts.skeleton.parameters())
    shard = str(next(model_copy.glob("*.safetensors")))
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == shard:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((lo, hi))
    assert mapped, "the shard is not mapped"
    for name, param in parts.skeleton.named_parameters():
        assert any(lo <= param.data_ptr() < hi for lo, hi in mapped), f"{name} is a copy, not the file's pages"


def test_prepared_weights_of_a_changed_weight_file_are_not_used(model_copy: Path):
    prepared.forget_all()
    prepared.prepare(model_copy, "float32", with_skeleton=True)
    os.utime(next(model_copy.glob("*.safetensors")), ns=(1, 1))  # converted again in place
    assert prepared.take(model_copy, "float32") is None


def test_a_weight_file_replaced_by_a_copy_with_the_same_size_and_mtime_is_stale(model_copy: Path):
    prepared.forget_all()
    prepared.prepare(model_copy, "float32", with_skeleton=True)
    shard = next(model_copy.glob("*.safetensors"))
    shutil.copy2(shard, model_copy / "copy.tmp")  # cp -p, rsync -a: same bytes count, same mtime
    os.replace(model_copy / "copy.tmp", shard)
    prepared.drop_stale()
    assert prepared.take(model_copy, "float32") is None, "the launcher dropped it: no child maps the old file"


def test_what_the_launcher_prepares_is_decided_without_a_device(model_copy: Path, monkeypatch):
    import torch

    env = {"FMA_MODEL": "tiny", "FMA_MODEL_SOURCE": f"path:{model_copy}"}
    assert prepared.target({**env, "FMA_DEVICE": "cpu"}) == (model_copy, "float32", True)
    assert prepared.target({**env, "FMA_MODEL_SOURCE": "hf:org/name"}) is None, "the hub resolves at load"
    assert prepared.target({**env, "FMA_MODEL_SOURCE": f"path:{model_copy / 'nope'}"}) is None
    # A torch built with CUDA: dtype "auto" depends on the device, which the launcher must not look at.
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    assert prepared.target(env) is None
    assert prepared.target({**env, "FMA_DTYPE": "bfloat16"}) == (model_copy, "bfloat16", False), \
        "tokenizer and config only: a CUDA worker builds its model in from_pretrained"
    assert prepared.target({**env, "CUDA_VISIBLE_DEVICES": ""}) == (model_copy, "float32", True)


LAUNCHER_STATE = textwrap.dedent("""
    import json, os, sys
    import torch
    calls = []
    def refuse(*args, **kwargs):
        calls.append("torch.cuda._lazy_init")
        raise RuntimeError("CUDA initialised in the launcher")
    torch.cuda._lazy_init = refuse
    from fma_worker import launcher, prepared
    launcher.prewarm()
    env = {"FMA_MODEL": "tiny", "FMA_MODEL_SOURCE": "path:" + sys.argv[1]}
    launcher._prepare({"model": "tiny", "env": env})  # what {"op": "prepare"} runs
    assert prepared._table, "the model was prepared"
    pid = os.fork()
    if pid == 0:
        ok = not torch.cuda.is_initialized() and not torch.cuda._is_in_bad_fork()
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"calls": calls, "initialized": torch.cuda.is_initialized(),
                      "child": os.waitstatus_to_exitcode(status)}))
""")


def test_the_launcher_never_initialises_cuda_before_fork(model_copy: Path):
    """Through torch's own state: its lazy CUDA initialiser is never called, and a child is not in a bad fork."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER_STATE, str(model_copy)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state == {"calls": [], "initialized": False, "child": 0}


def _maps(shard: Path) -> bool:
    return any(line.split()[5:6] == [str(shard)] for line in Path("/proc/self/maps").read_text().splitlines())


def test_a_child_sets_the_other_models_parts_aside_and_lets_go_of_their_weights_after_its_start(
        model_copy: Path, tmp_path: Path, monkeypatch):
    """Freeing another model's tokenizer in a forked child copies the heap pages it shares with the launcher:
    20-30 ms of every cold start per model prepared beside it. So the child keeps them, untouched, and lets go
    only of their mapped weight files, once it is ready (else a file replaced on disk keeps its blocks)."""
    import gc
    import weakref

    from fma_common.wire import SamplingParams
    from fma_worker import engine as engine_mod
    from fma_worker.engine import Engine
    from fma_worker.metrics import WorkerMetrics
    from fma_worker.settings import WorkerSettings

    other = tmp_path / "other"
    shutil.copytree(model_copy, other)
    other_shard = next(other.glob("*.safetensors"))
    prepared.forget_all()
    prepared.prepare(model_copy, "float32", with_skeleton=True)
    prepared.prepare(other, "float32", with_skeleton=True)
    other_tokenizer = weakref.ref(prepared._table[(str(other), "float32")].tokenizer)
    own_tokenizer = prepared._table[(str(model_copy), "float32")].tokenizer
    assert _maps(other_shard)
    released = threading.Event()
    real_release = prepared.release_set_aside

    def release(*args) -> None:
        real_release(*args)
        released.set()

    monkeypatch.setattr(prepared, "release_set_aside", release)
    monkeypatch.setattr(engine_mod, "RELEASE_SET_ASIDE_AFTER_S", 0.5)
    settings = WorkerSettings.from_env({"FMA_MODEL": "tiny", "FMA_LOG_LEVEL": "warning",
                                        "FMA_MODEL_SOURCE": f"path:{model_copy}", "FMA_DTYPE": "float32"})
    eng = Engine(settings, WorkerMetrics("tiny"))
    try:
        eng.load()
        assert eng._tokenizer is own_tokenizer, "the engine took its own prepared parts"
        assert not prepared._table and prepared.set_aside_weights()
        assert other_tokenizer() is not None, "the other model's tokenizer was freed during the start"
        assert next(iter(eng.generate(eng.encode("Hello"), SamplingParams(max_tokens=2, temperature=0.0))))
        assert released.wait(30), "the other model's weights were never let go of"
        gc.collect()
        assert not _maps(other_shard), "the other model's weight file is still mapped after the start"
        assert other_tokenizer() is not None and not prepared.set_aside_weights()
    finally:
        eng.close()
        prepared.forget_all()
