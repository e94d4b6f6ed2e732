"""Cold start of a hub model: from the hub (fetched into the model cache on the way) against from the cache.

    .venv/bin/python bench/hub_cache.py --out bench/results/hub-cache.json     (make bench-hub)

The hub is the stand-in (tests/hub_standin.py) on this machine, serving the embedded chat model's converted
bfloat16 folder as ``bench/smollm2`` over HTTP to the real ``huggingface_hub`` client, so "from the hub" is a
fetch at loopback speed with every file checked: a floor for a real download, which adds the network. One
requester (local actuator, launcher on); each round empties the model cache, asks once (the cold start
fetches), releases the worker, and asks again (the cold start loads from the cache). Time: the client's, to
the end of a 1-token completion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine
from hub_standin import HubStandIn, Repo
from throughput import start_requester

from fma_common.procs import stop_process_group
from fma_worker.model_store import default_cache_dir, ensure_embedded_converted

MODEL = "smollm2-135m-instruct"


def ask(url: str) -> float:
    started = time.perf_counter()
    resp = httpx.post(f"{url}/v1/completions", timeout=600,
                      json={"model": "hubbed", "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    resp.raise_for_status()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/hub-cache.json"))
    args = parser.parse_args()
    folder = ensure_embedded_converted(MODEL, "bfloat16", default_cache_dir())
    files = {k: v for k, v in Repo.from_folder(folder).files.items() if k != "fma-complete.json"}
    hub = HubStandIn({"bench/smollm2": Repo(files)})
    url = hub.start()
    size = sum(len(v) for v in files.values())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"
        proc, spi = start_requester(work, "models:\n  - {name: hubbed, source: 'hf:bench/smollm2', dtype: bfloat16}\n",
                                    HF_ENDPOINT=url, HF_HUB_OFFLINE="0", FMA_CACHE_DIR=str(cache),
                                    HF_HOME=str(work / "hf-home"))
        try:
            for r in range(args.rounds):
                shutil.rmtree(cache / "hub", ignore_errors=True)
                before = len(hub.requests)
                from_hub = ask(spi)
                fetched = len(hub.requests) - before
                httpx.delete(f"{spi}/v1/workers/hubbed", timeout=60).raise_for_status()
                before = len(hub.requests)
                from_cache = ask(spi)
                assert len(hub.requests) == before, "the cache start reached the hub"
                httpx.delete(f"{spi}/v1/workers/hubbed", timeout=60).raise_for_status()
                rows.append({"from_hub_s": round(from_hub, 3), "from_cache_s": round(from_cache, 3),
                             "hub_requests": fetched})
                print(f"round {r + 1}: from the hub {from_hub:.2f} s ({fetched} requests), from the cache "
                      f"{from_cache:.2f} s", file=sys.stderr)
        finally:
            stop_process_group(proc)
            hub.stop()
    hub_med = statistics.median(r["from_hub_s"] for r in rows)
    cache_med = statistics.median(r["from_cache_s"] for r in rows)
    report = {
        "machine": machine(),
        "label": (f"cold start of a hub model through the requester (local actuator, launcher on), CPU, bfloat16, "
                  f"{MODEL}'s converted folder ({size / 1e6:.0f} MB) served by the stand-in hub on loopback; "
                  "time to the end of a 1-token completion; each round: empty cache, ask (fetch + check + load), "
                  "release, ask (load from the cache)"),
        "rounds": rows,
        "from_hub_median_s": round(hub_med, 3),
        "from_cache_median_s": round(cache_med, 3),
        "bytes": size,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
