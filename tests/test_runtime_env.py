"""The worker's library environment in a forked child: re-read only what changed (fma_worker/runtime_env.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_a_forked_worker_with_the_launchers_environment_rereads_no_hub_constants(tmp_path: Path):
    """Issue 24: the launcher prepared before importing the hub libraries and recorded nothing, so every forked
    child walked all modules to re-read the same constants (11 ms of each forked cold start)."""
    code = f"""
import os, json
os.environ["HF_HOME"] = {str(tmp_path / "a")!r}
from fma_worker import runtime_env
calls = []
real = runtime_env.reread_library_constants
runtime_env.reread_library_constants = lambda: (calls.append(1), real())
runtime_env.prepare()          # the launcher, before its imports
import huggingface_hub.constants as c
runtime_env.prepare()          # a child forked with the same environment
same = len(calls)
os.environ["HF_HOME"] = {str(tmp_path / "b")!r}
runtime_env.prepare()          # a child whose model sets its own HF_HOME
print(json.dumps({{"same": same, "other": len(calls), "home": c.HF_HOME}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env={k: v for k, v in os.environ.items() if not k.startswith("HF_")}
                                    ).stdout.strip().splitlines()[-1])
    assert out["same"] == 0, "re-read although nothing changed"
    assert out["other"] == 1 and out["home"] == str(tmp_path / "b")
