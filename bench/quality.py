"""Quality held across dtypes: the worker's own engine in float32 and in bfloat16, side by side.

* Perplexity of a fixed text (``TEXT``, written for this check; a few hundred tokens) under each engine, one
  forward pass over the whole text, the loss taken in float32 from each engine's logits.
* Greedy output of the README's example prompts (a completion of "Hello, world!", 50 tokens; "Hello", 16) and
  two chats, each engine through the worker's batcher (``Engine.generate``), reported side by side with
  whether they are identical.

Each engine is loaded the way a worker loads it (``FMA_DTYPE``; the embedded model through its converted
cache, one folder per dtype). Writes ``bench/results/quality.json``; ``tests/test_quality.py`` holds the
perplexity to 1 % in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"

TEXT = (
    "The harbour town woke before the sun. Fishermen carried their nets down the stone steps, and the baker on "
    "the corner opened his shutters to let the smell of bread drift over the water. By the time the first boats "
    "had left the breakwater, the market square was already full of voices. Farmers from the hills unloaded "
    "crates of apples and cabbages, a woman sold wool dyed in every shade of blue, and children ran between the "
    "stalls chasing a dog that had stolen a sausage. In the middle of the square stood an old clock tower. Its "
    "clock had stopped many years ago, at a quarter past three, and nobody in the town could remember why. Some "
    "said a storm had frozen the gears; others said the clockmaker had left after an argument with the mayor and "
    "taken the key with him. Every spring the town council promised to repair it, and every autumn the money "
    "went to the harbour wall instead. One morning a young engineer arrived on the coastal train with a leather "
    "bag of tools. She asked the baker for directions to the tower, climbed the narrow stairs, and spent the "
    "whole day among the dusty wheels and levers. She cleaned each part, replaced a cracked spring with one she "
    "had made herself, and oiled the great pendulum until it swung freely again. Late in the evening, as the "
    "fishing boats returned and the lamps were lit along the quay, the clock struck nine. The people in the "
    "square stopped and looked up, and for a moment the whole town was silent. Then someone began to laugh, and "
    "soon everyone was cheering. The engineer came down the stairs, covered in dust, and the baker gave her the "
    "last loaf of the day."
)

PROMPTS = [
    ("completion", "Hello, world!", 50),
    ("completion", "Hello", 16),
    ("chat", "What is the capital of France? Answer in one sentence.", 30),
    ("chat", "Write a long story about a dragon who learns to paint, with many details.", 64),
]


def load_engine(dtype: str, source: str):
    from fma_worker.engine import Engine
    from fma_worker.metrics import WorkerMetrics
    from fma_worker.settings import WorkerSettings

    settings = WorkerSettings.from_env({"FMA_MODEL": MODEL, "FMA_LOG_LEVEL": "warning", "FMA_MODEL_SOURCE": source,
                                        "FMA_DTYPE": dtype, "FMA_DEVICE": "cpu"})
    engine = Engine(settings, WorkerMetrics(MODEL))
    engine.load()
    return engine


def perplexity(engine, text: str = TEXT) -> tuple[float, int]:
    """exp(mean next-token cross-entropy) of ``text`` under the engine's loaded model, and the tokens scored."""
    torch = engine._torch
    ids = torch.tensor([engine.encode(text)])
    with torch.inference_mode():
        logits = engine._model(input_ids=ids).logits[0, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(loss.item()), ids.shape[1] - 1


def greedy(engine, kind: str, prompt: str, max_tokens: int) -> str:
    from fma_common.wire import SamplingParams

    ids = engine.encode(prompt) if kind == "completion" else engine.render_chat([{"role": "user", "content": prompt}])
    text = ""
    for step in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        text += "".join(d.text for d in step)
    return text


def measure(dtypes: tuple[str, ...], source: str, prompts: list[tuple[str, str, int]] = PROMPTS) -> dict:
    out: dict = {"dtypes": {}, "outputs": []}
    texts: dict[str, list[str]] = {}
    for dtype in dtypes:
        t0 = time.monotonic()
        engine = load_engine(dtype, source)
        try:
            ppl, scored = perplexity(engine)
            texts[dtype] = [greedy(engine, *p) for p in prompts]
            out["dtypes"][dtype] = {"computed_in": engine.dtype_name, "perplexity": round(ppl, 4),
                                    "tokens_scored": scored, "seconds": round(time.monotonic() - t0, 1)}
        finally:
            engine.close()
    for i, (kind, prompt, max_tokens) in enumerate(prompts):
        row = {"kind": kind, "prompt": prompt, "max_tokens": max_tokens, **{d: texts[d][i] for d in dtypes}}
        row["identical"] = len({texts[d][i] for d in dtypes}) == 1
        out["outputs"].append(row)
    base, *others = dtypes
    for dtype in others:
        ratio = out["dtypes"][dtype]["perplexity"] / out["dtypes"][base]["perplexity"]
        out["dtypes"][dtype]["perplexity_vs_" + base] = f"{(ratio - 1) * 100:+.2f} %"
    return out


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = parser.parse_args()
    report = {"machine": machine(), "model": MODEL,
              "label": "CPU, the worker's engine loaded per dtype from the embedded model's converted cache "
                       "(embedded:; one folder per dtype), greedy, batch of one",
              **measure(tuple(args.dtypes.split(",")), f"embedded:{MODEL}")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
