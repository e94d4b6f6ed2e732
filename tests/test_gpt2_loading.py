"""Issue 26: GPT-2's architecture on the fast loading path (weights mapped into the empty model, no
``from_pretrained``), from a checkpoint laid out as the hub's ``openai-community/gpt2`` is: saved from the base
model, so its keys have no ``transformer.`` prefix and there is no ``lm_head`` (tied to the embeddings)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from fma_common.wire import SamplingParams
from fma_worker.engine import Engine
from fma_worker.metrics import WorkerMetrics
from fma_worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def gpt2_hub_layout(tmp_path_factory: pytest.TempPathFactory, converted_model_dir: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted_model_dir / name, out / name)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(out)
    state = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("transformer.") for k in state)
    save_file({k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("lm_head")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_gpt2_checkpoint_as_the_hub_has_it_loads_mapped_and_answers_as_from_pretrained(
        gpt2_hub_layout: Path, caplog: pytest.LogCaptureFixture):
    import torch
    from transformers import AutoModelForCausalLM

    settings = WorkerSettings.from_env({"FMA_MODEL": "gpt2", "FMA_MODEL_SOURCE": f"path:{gpt2_hub_layout}",
                                        "FMA_LOG_LEVEL": "info", "FMA_DTYPE": "float32"})
    engine = Engine(settings, WorkerMetrics("gpt2"))
    with caplog.at_level(logging.INFO, logger="fma.worker.engine"):
        engine.load()
    try:
        assert "loading with from_pretrained instead" not in caplog.text, caplog.text
        ids = engine.encode("The capital of France is")
        expected: list[int] = []
        text = "".join(d.text for step in engine.generate(ids, SamplingParams(max_tokens=6, temperature=0,
                                                                               logit_bias={2: -100.0}))
                       for d in step)
        reference = AutoModelForCausalLM.from_pretrained(str(gpt2_hub_layout), dtype=torch.float32).eval()
        with torch.inference_mode():
            logits_bias = torch.zeros(49152)
            logits_bias[2] = -100.0
            seq = torch.tensor([ids])
            for _ in range(6):
                nxt = int((reference(input_ids=seq).logits[0, -1] + logits_bias).argmax())
                expected.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        assert text == engine.decode(expected)
    finally:
        engine.close()
