"""The worker's start timeline: the steps a start reports, where each one's clock comes from."""

from __future__ import annotations

import subprocess
import sys

from fma_worker import timeline


def test_the_process_start_comes_from_the_kernel_not_from_the_first_mark():
    # A process that idles 0.5 s before asking: its age covers the idle time (btime would round to whole seconds).
    code = ("import time; time.sleep(0.5); from fma_worker import timeline; "
            "print(time.time() - timeline.process_started_at())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= age < 10, age


def test_a_plain_process_reports_its_interpreter_step_and_a_spawned_one_its_spawn(monkeypatch):
    monkeypatch.setattr(timeline, "_marks", {"process": 100.0, "config": 100.4, "listening": 100.45,
                                              "worker": 100.46, "app": 100.6, "load": 100.65, "ready": 103.0})
    monkeypatch.delenv("FMA_SPAWNED_AT", raising=False)
    steps = timeline.report({"import": 2.0, "weights": 0.3})["steps"]
    assert steps["interpreter"] == 0.4 and "spawn" not in steps
    assert steps["arbiter"] == 0.05 and steps["app"] == 0.14 and steps["engine"] == 0.05
    assert steps["other"] == 0.05
    # Asked by the requester at a known time: spawn covers the interpreter, which is not counted twice.
    monkeypatch.setenv("FMA_SPAWNED_AT", "99.9")
    steps = timeline.report({"import": 2.0})["steps"]
    assert steps["spawn"] == 0.5 and "interpreter" not in steps
