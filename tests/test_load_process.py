"""A bounded version of ``make load``: many clients, three models, small queues, half streamed, none lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import load

pytestmark = pytest.mark.process


def test_two_hundred_requests_from_fifty_clients_end_200_or_429_and_none_is_lost(tmp_path: Path,
                                                                                    converted_model_dir: Path):
    report = load.run(requests=200, clients=50, workdir=tmp_path, max_queue=2)
    assert report["lost"] == 0, report["lost_by_kind"]
    assert report["outcomes"].get("200", 0) + report["outcomes"].get("429", 0) == 200
    assert report["outcomes"].get("200", 0) > 0
    assert report["healthy_after"]
    assert report["requester_peak_rss_mib"] < 150, report
