"""transformers' import table from the disk cache (issue 24: 0.3 s of every plain worker start, a Knative pod's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fma_worker import import_cache

PROBE = """
import json, sys
from fma_worker import runtime_env
runtime_env.prepare()
import transformers
from pathlib import Path
from transformers import AutoTokenizer, LlamaForCausalLM  # the lazy module resolves through the table
from transformers.utils import import_utils
from fma_worker import import_cache
# transformers' own function, uncached (its lru_cache'd answer was changed in place by transformers' __init__)
own_fn = import_utils.define_import_structure
while hasattr(own_fn, "__wrapped__"):
    own_fn = own_fn.__wrapped__
own = own_fn(Path(transformers.__file__).parent / "models", "models")
tables = []
for f in import_cache.cache_dir().glob("*.json"):
    try:
        tables.append(import_cache._decode(json.loads(f.read_text())))
    except ValueError:
        pass
served = next((t for t in tables if any(m.startswith("models.llama.") for e in t.values() for m in e)), None)
print(json.dumps({**import_cache.stats, "same": served == own, "llama": LlamaForCausalLM.__name__}))
"""


def probe(cache: Path, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, "FMA_CACHE_DIR": str(cache), **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_first_worker_writes_transformers_import_table_and_the_next_reads_the_same_table(tmp_path: Path):
    first = probe(tmp_path)
    assert first["misses"] >= 1 and first["written"] >= 1 and first["hits"] == 0
    assert first["same"] and first["llama"] == "LlamaForCausalLM"
    second = probe(tmp_path)
    assert second["misses"] == 0 and second["hits"] >= 1, "the scan ran again"
    assert second["same"], "the cached table differs from transformers' own"
    assert second["llama"] == "LlamaForCausalLM"


def test_a_damaged_table_is_scanned_again_and_rewritten_never_served(tmp_path: Path):
    probe(tmp_path)
    (table,) = sorted((tmp_path / "import-structure").glob("*.json"))[:1] or [None]
    for file in (tmp_path / "import-structure").glob("*.json"):
        file.write_text('[["torch"], {"models.llama": "not a list"}')  # cut short: not JSON
    again = probe(tmp_path)
    assert again["misses"] >= 1 and again["written"] >= 1 and again["same"]
    assert json.loads(table.read_text()), "rewritten whole"


def test_the_cache_can_be_turned_off(tmp_path: Path):
    off = probe(tmp_path, FMA_IMPORT_CACHE="0")
    assert off["hits"] == off["misses"] == 0 and not (tmp_path / "import-structure").exists()


def test_a_reinstall_or_an_edited_editable_install_changes_the_key(tmp_path: Path):
    site = tmp_path / "site"
    package = site / "transformers"
    models = package / "models"
    models.mkdir(parents=True)
    (models / "modeling_x.py").write_text("__all__ = ['X']\n")
    info = site / "transformers-5.0.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("transformers/models/modeling_x.py,sha256=aaa,16\n")
    installed = import_cache._key(package, models, "models")
    assert import_cache._key(package, models, "models") == installed
    assert import_cache._key(package, models, None) != installed
    (info / "RECORD").write_text("transformers/models/modeling_x.py,sha256=bbb,17\n")  # pip installed again
    assert import_cache._key(package, models, "models") != installed
    # Editable: the RECORD says nothing about edits; the files do.
    (info / "direct_url.json").write_text(json.dumps({"url": "file:///src", "dir_info": {"editable": True}}))
    editable = import_cache._key(package, models, "models")
    (models / "modeling_x.py").write_text("__all__ = ['X', 'Y']\n")
    assert import_cache._key(package, models, "models") != editable


def test_the_table_round_trips_through_json():
    table = {frozenset(): {"models.a.b": {"A", "B"}}, frozenset({"torch", "vision"}): {"models.c": {"C"}}}
    assert import_cache._decode(json.loads(json.dumps(import_cache._encode(table)))) == table

