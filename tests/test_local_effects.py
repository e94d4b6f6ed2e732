"""Local effects without spawning models: environments, logs, fork decisions, a start that cannot begin."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from fma_common import logs, procs
from fma_common.errors import WorkerFailed
from fma_common.fork_env import fork_blockers, is_reread
from fma_requester.local import LocalActuator, LocalEffects
from fma_requester.metrics import RequesterMetrics
from fma_requester.registry import ModelRegistry
from fma_requester.settings import RequesterSettings
from fma_requester.supervision import log_file_name


def settings(tmp_path: Path, **env: str) -> RequesterSettings:
    return RequesterSettings.from_env({"FMA_WORKER_LOG_DIR": str(tmp_path / "logs"), "FMA_LAUNCHER": "false",
                                       "FMA_CACHE_DIR": str(tmp_path / "cache"), **env})


def test_a_models_own_env_wins_over_the_requesters_defaults(tmp_path: Path):
    reg = ModelRegistry.from_text("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct',"
                                  " env: {HF_HUB_OFFLINE: '0', HF_HOME: /models/hf, FMA_MAX_BATCH: '4'}}\n")
    effects = LocalEffects(settings(tmp_path), worker_env={"FMA_BIND": "0.0.0.0:1", "FMA_MODELS": "/x.yaml"})
    try:
        env = effects.worker_environment(reg.get("m"), 9999)
    finally:
        effects.close()
    assert env["HF_HUB_OFFLINE"] == "0" and env["HF_HOME"] == "/models/hf" and env["FMA_MAX_BATCH"] == "4"
    assert env["PORT"] == "9999" and env["FMA_MODEL"] == "m"
    assert "FMA_BIND" not in env and "FMA_MODELS" not in env, "requester settings must not leak into a worker"
    assert env["FMA_LIFELINE_FD"].isdigit()


def test_a_start_that_cannot_even_begin_fails_at_once_with_the_reason(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    reg = ModelRegistry.from_text("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct'}\n")
    act = LocalActuator(settings(tmp_path, FMA_WORKER_LOG_DIR=str(blocker / "logs")), reg, RequesterMetrics())
    try:
        started = time.monotonic()
        with pytest.raises(WorkerFailed, match="cannot create the worker log folder"):
            act.ensure_ready("m")
        assert time.monotonic() - started < 5, "the waiter is answered at once, not at queue_timeout"
        status = act.describe("m")
        assert status.state == "failed" and "cannot create the worker log folder" in status.error
        with pytest.raises(WorkerFailed, match="next retry in"):
            act.ensure_ready("m")
    finally:
        act.shutdown(5)


def test_fork_is_refused_only_for_what_cannot_be_re_read():
    launcher = {"PATH": "/bin", "HF_HOME": "/a", "OMP_NUM_THREADS": "2"}
    assert fork_blockers(launcher, {**launcher, "HF_HOME": "/b", "HF_HUB_OFFLINE": "0", "FMA_MAX_TOKENS": "5",
                                    "CUDA_VISIBLE_DEVICES": "1", "PYTORCH_CUDA_ALLOC_CONF": "x"}) == []
    assert fork_blockers(launcher, {**launcher, "OMP_NUM_THREADS": "1"}) == ["OMP_NUM_THREADS"]
    assert fork_blockers(launcher, {"PATH": "/bin", "HF_HOME": "/a"}) == ["OMP_NUM_THREADS"], "unset is a difference"
    assert fork_blockers(launcher, {**launcher, "TORCH_LOGS": "+dynamo", "LD_PRELOAD": "x.so"}) == \
        ["LD_PRELOAD", "TORCH_LOGS"]
    assert is_reread("HF_HUB_OFFLINE") and is_reread("TRANSFORMERS_OFFLINE") and not is_reread("OMP_NUM_THREADS")


def test_model_names_make_safe_log_file_names_that_never_collide():
    """Issue 21, defect 5: `a/b` and `a_b` shared one log, and a model named `launcher` wrote into the launcher's,
    so a failed start quoted another model's log tail."""
    assert log_file_name("a_b") == "worker-a_b.log"
    assert log_file_name("meta-llama/Llama-3.1-8B").startswith("worker-meta-llama_Llama-3.1-8B-")
    assert "/" not in log_file_name("../../etc/passwd") and not log_file_name("../../etc/passwd").startswith(".")
    names = ["a/b", "a_b", "a b", "launcher", "launcher.log", "..", "", "x" * 300]
    files = {log_file_name(n) for n in names} | {"launcher.log"}
    assert len(files) == len(names) + 1, "one file per model, none of them the launcher's"


def test_logs_rotate_by_size_and_an_appending_writer_keeps_writing(tmp_path: Path):
    path = tmp_path / "w.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # how workers hold their log
    try:
        os.write(fd, b"old line\n" * 1000)
        assert not logs.rotate(path, 1 << 20, 2), "under the limit: nothing to do"
        assert logs.rotate(path, 4096, 2)
        os.write(fd, b"new line\n")
        assert path.read_bytes() == b"new line\n"
        assert (tmp_path / "w.log.1").read_bytes() == b"old line\n" * 1000
        os.write(fd, b"x" * 5000)
        assert logs.rotate(path, 4096, 2)
        assert (tmp_path / "w.log.2").read_bytes() == b"old line\n" * 1000
        assert (tmp_path / "w.log.1").read_bytes().startswith(b"new line\n")
    finally:
        os.close(fd)


def test_a_log_tail_reads_from_the_end_of_a_huge_file(tmp_path: Path):
    path = tmp_path / "huge.log"
    with open(path, "wb") as f:
        f.truncate(50 << 30)  # 50 GiB, sparse: reading it whole would never finish
        f.seek(0, os.SEEK_END)
        f.write(b"the last words")
    started = time.monotonic()
    assert logs.tail(path, 14) == "the last words"
    assert time.monotonic() - started < 1
    assert logs.tail(tmp_path / "missing.log") == ""


def test_housekeeping_rotates_worker_logs(tmp_path: Path):
    effects = LocalEffects(settings(tmp_path, FMA_WORKER_LOG_MAX_BYTES="4096", FMA_WORKER_LOG_BACKUPS="1"))
    try:
        log_path = effects.supervisor.log_path("org/model")
        log_path.write_bytes(b"z" * 10_000)
        effects.housekeeping()
        assert log_path.stat().st_size == 0 and log_path.with_name(log_path.name + ".1").stat().st_size == 10_000
    finally:
        effects.close()


def test_a_hung_worker_whose_launcher_died_is_killed_and_its_exit_reported_only_then(monkeypatch):
    """Issue 21, defect 3: the launcher's children were marked exited the moment it died, so the stop that
    followed skipped SIGKILL; a stopped (hung) worker lived on, reparented, beside its replacement."""
    import signal
    import subprocess
    import sys
    import time

    from fma_common.procs import stop_process_group
    from fma_requester import launcher_client
    from fma_requester.launcher_client import LaunchedProcess

    monkeypatch.setattr(launcher_client, "ORPHAN_GRACE_S", 0.5)
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        os.kill(hung.pid, signal.SIGSTOP)  # it will not act on SIGTERM
        # ... once it is stopped: a SIGTERM that finds SIGSTOP still pending (the child not yet scheduled, on a
        # loaded machine) is delivered first, being the lower number, and the child dies of it.
        deadline = time.monotonic() + 10
        while open(f"/proc/{hung.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "the child never stopped"
            time.sleep(0.01)
        child = LaunchedProcess(hung.pid)
        child._orphaned()  # what the client does for each child when the launcher's stdout closes
        assert child.poll() is None, "not reported exited while it still runs"
        began = time.monotonic()
        stop_process_group(child, 30)  # the actuator's stop after worker_exited
        assert hung.wait(5) == -signal.SIGKILL, "killed, not left hung"
        assert child.poll() is not None and time.monotonic() - began < 5
    finally:
        if hung.poll() is None:
            hung.kill()


def test_a_workers_port_is_never_one_the_kernel_may_give_an_outgoing_connection_before_the_worker_binds_it():
    """CI failed once on "Address already in use": a port from ``bind(0)`` lies in the ephemeral range, where
    every outgoing connection draws its local port, and one drew the requester's probe port before it bound it."""
    low, high = procs._ephemeral_range()
    ports = {procs.free_port() for _ in range(200)}
    assert not any(low <= port <= high for port in ports), sorted(p for p in ports if low <= p <= high)[:5]
    assert len(ports) > 150, "picked at random, so two pickers rarely meet"
    port = ports.pop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free, as gunicorn binds it
        s.listen()
        assert procs.free_port() != port, "a port in use is never handed out"


def test_without_room_below_the_ephemeral_range_the_port_is_the_kernels_choice(monkeypatch):
    monkeypatch.setattr(procs, "_ephemeral_range", lambda: (1024, 65535))
    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
