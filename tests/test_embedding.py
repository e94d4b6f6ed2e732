"""The embedding worker's pooling (checked against sentence-transformers' own Pooling module) and its batcher."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from fma_common.errors import InvalidRequest
from fma_worker.embedding import EmbeddingBatcher, Pooling, pool

THEIRS = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len": "mean_sqrt_len_tokens",
          "lasttoken": "lasttoken"}


@pytest.mark.parametrize("modes", [("mean",), ("cls",), ("max",), ("mean_sqrt_len",), ("lasttoken",),
                                   ("cls", "max", "mean")])
@pytest.mark.parametrize("normalize", [False, True])
def test_pooling_equals_sentence_transformers_own_module(modes, normalize):
    from sentence_transformers.sentence_transformer.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling as TheirPooling

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])  # right padding, as the worker pads
    theirs = TheirPooling(8, pooling_mode=tuple(THEIRS[m] for m in modes))(
        {"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    if normalize:
        theirs = Normalize()({"sentence_embedding": theirs})["sentence_embedding"]
    ours = pool(torch, hidden, mask, Pooling(modes=modes, normalize=normalize))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_the_pooling_is_read_from_the_models_sentence_transformers_files(tmp_path: Path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    got = Pooling.from_folder(tmp_path)
    assert got == Pooling(modes=("cls", "mean"), normalize=True, max_seq_length=128)
    # A plain transformers folder: pooled as sentence-transformers pools one (mean, not normalised).
    assert Pooling.from_folder(tmp_path / "nothing-here") == Pooling()
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        Pooling.from_folder(tmp_path)


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_rows_in_order():
    passes: list[int] = []
    gate = threading.Event()

    def encode(rows: list[list[int]]) -> list[list[float]]:
        gate.wait(5)  # the first pass holds until every request is queued
        passes.append(len(rows))
        return [[float(sum(r)), float(len(r))] for r in rows]

    batcher = EmbeddingBatcher(encode, max_rows=16, max_tokens=10_000)
    results: dict[int, list[list[float]]] = {}

    def request(i: int) -> None:
        results[i] = batcher.run([[i, 1], [i, 2, 3]])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    batcher.stop()
    assert results == {i: [[i + 1.0, 2.0], [i + 5.0, 3.0]] for i in range(6)}
    assert len(passes) < 6 and sum(passes) == 12, f"the 12 rows of 6 requests took {len(passes)} passes"


def test_a_request_larger_than_a_pass_spans_passes_and_a_failure_fails_its_requests_only():
    calls: list[int] = []

    def encode(rows: list[list[int]]) -> list[list[float]]:
        calls.append(len(rows))
        if any(r == [666] for r in rows):
            raise InvalidRequest("bad row", param="input")
        return [[float(r[0])] for r in rows]

    batcher = EmbeddingBatcher(encode, max_rows=4, max_tokens=10_000)
    assert batcher.run([[i] for i in range(10)]) == [[float(i)] for i in range(10)]
    assert calls == [4, 4, 2]
    with pytest.raises(InvalidRequest):
        batcher.run([[666]])
    assert batcher.run([[7]]) == [[7.0]], "the batcher serves on after a failed pass"
    batcher.stop()
