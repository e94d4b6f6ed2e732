"""bfloat16 keeps the model's quality: its perplexity on a fixed text within 1 % of float32's (issue 24).

Both engines load the converted float32 folder the way a worker does (``FMA_DTYPE``); the bfloat16 one casts
its weights, which is what the embedded model's bfloat16 cache holds (model_store converts through float32).
``make bench-quality`` writes the same comparison from the per-dtype caches, with the greedy outputs of the
README's prompts side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import quality


@pytest.mark.process
def test_bfloat16_perplexity_is_within_one_percent_of_float32(converted_model_dir: Path):
    report = quality.measure(("float32", "bfloat16"), f"path:{converted_model_dir}", prompts=quality.PROMPTS[:1])
    f32, bf16 = report["dtypes"]["float32"], report["dtypes"]["bfloat16"]
    assert (f32["computed_in"], bf16["computed_in"]) == ("float32", "bfloat16")
    assert f32["tokens_scored"] >= 300
    assert abs(bf16["perplexity"] / f32["perplexity"] - 1) < 0.01, report["dtypes"]
    assert report["outputs"][0]["float32"] and report["outputs"][0]["bfloat16"], "both answer"
    print(report["dtypes"], [row["identical"] for row in report["outputs"]])
