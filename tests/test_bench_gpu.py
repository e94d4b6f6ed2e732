"""The GPU benchmark (``bench/gpu.py``) run on this CPU, so its first run on a GPU machine is not its first run.

Every step the GPU run takes happens here too: building and saving a random-weight Llama with a freshly trained
tokenizer, the copy-bandwidth floor, the plain-script baseline in a fresh process, our worker as a fresh process,
the launcher driven over its protocol (prepare, spawn, exit reports), sleep and wake at both levels, the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu  # noqa: E402


def test_wheels_are_unpacked_without_pip(tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "demo_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
    assert gpu.unpack_wheels(wheels, tmp_path / "site") == ["demo_pkg"]
    out = subprocess.run([sys.executable, "-c", "import demo_pkg; print(demo_pkg.VALUE)"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.stdout.strip() == "42"


@pytest.mark.process
@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_on_a_cpu(tmp_path: Path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--size", "tiny",
                          "--runs", "1", "--cache", str(tmp_path / "cache"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {"naive_cold", "cold_plain", "cold", "warm", "wake_l1", "wake_l2", "sleep_l1", "sleep_l2",
            "load_gbps"} <= set(report["results"])
    assert all(r["min"] > 0 for r in report["results"].values()), report["results"]
    assert report["floor"]["memcpy_gbps"] > 0
    assert report["prepared"]["op"] == "prepared" and "error" not in report["prepared"], report["prepared"]
    assert report["labels"]["wake_l1"] == "CPU: level 1 moves no weights"
    assert set(report["ratios"]) == {"naive_over_cold", "naive_over_cold_plain", "load_over_floor"}
    assert (tmp_path / "cache" / "models").is_dir(), "the model was built into the given cache"
