"""The requester's process must never hold torch or transformers (150 MiB, no GPU stack)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_building_the_requester_app_imports_neither_torch_nor_transformers(tmp_path):
    code = (
        "import json, sys\n"
        "from fma_requester.app import create_app\n"
        "from fma_requester.settings import RequesterSettings\n"
        "import fma_requester.knative, fma_requester.local, fma_cli.main\n"
        f"app = create_app(RequesterSettings.from_env({{'FMA_LOG_LEVEL': 'warning', 'FMA_LAUNCHER': 'false',"
        f" 'FMA_WORKER_LOG_DIR': {str(tmp_path)!r}}}))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors',"
        " 'tokenizers', 'huggingface_hub', 'fma_worker'))\n"
        "print(json.dumps(heavy))\n"
        "app.extensions['fma']['actuator'].shutdown(1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
