"""Faulting a mapped model's pages in at load (engine._fault_in): one madvise per mapped span, touching as the
fallback, and the same pages resident either way."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fma_worker import engine

PAGE = mmap.PAGESIZE


def test_tensors_of_one_mapping_make_one_span_and_separate_mappings_stay_apart():
    base, other = 100 * PAGE, 1000 * PAGE
    ranges = [(base + 80, base + 5000), (base + 5000, base + 3 * PAGE + 7), (base + 3 * PAGE + 16, base + 9 * PAGE),
              (other + 8, other + 2 * PAGE), (other + 5, other + 5)]
    assert engine.page_spans(ranges, PAGE) == [(base, base + 9 * PAGE), (other, other + 2 * PAGE)]
    # A range ending on a page boundary, then one page of gap: never merged across the gap.
    assert engine.page_spans([(base, base + 2 * PAGE), (base + 3 * PAGE + 8, base + 4 * PAGE)], PAGE) == \
        [(base, base + 2 * PAGE), (base + 3 * PAGE, base + 4 * PAGE)]


def mapped_rss(folder: Path) -> int:
    """Bytes of the folder's files mapped into this process's page tables (smaps' Rss of their mappings)."""
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields[0]) > 8 and ":" not in fields[0]:
            counting = len(fields) >= 6 and fields[5].startswith(str(folder))
        elif counting and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.fixture()
def mapped(tmp_path: Path) -> tuple[Path, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        tensors = {f"{name}{i}": torch.randn(1024, 1024, generator=g) for i in range(4)}
        save_file(tensors, tmp_path / f"{name}.safetensors")
    return tmp_path, [t for name in ("a", "b") for t in load_file(tmp_path / f"{name}.safetensors").values()]


def test_a_mapped_model_is_populated_by_madvise_without_touching_a_page(mapped, monkeypatch):
    folder, tensors = mapped
    size = sum(t.nbytes for t in tensors)
    assert mapped_rss(folder) < size // 4, "mapping alone maps no page in"
    monkeypatch.setattr(engine, "_touch", lambda *a: pytest.fail(
        "the kernel refused madvise(MADV_POPULATE_READ) (Linux before 5.14?): loads fall back to touching pages"))
    engine._fault_in(tensors, 2)
    assert mapped_rss(folder) >= size


def test_where_madvise_is_refused_the_pages_are_touched_instead(mapped, monkeypatch):
    folder, tensors = mapped
    monkeypatch.setattr(engine, "_MADV_POPULATE_READ", 10_000)  # an advice no kernel knows: EINVAL
    engine._fault_in(tensors, 2)
    assert mapped_rss(folder) >= sum(t.nbytes for t in tensors)
