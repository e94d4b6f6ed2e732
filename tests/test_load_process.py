"""A bounded version of ``make load``: many clients, three models, small queues, half streamed, none lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import load

pytestmark = pytest.mark.process


@pytest.mark.slow
def test_two_hundred_requests_from_fifty_clients_end_200_or_429_and_none_is_lost(tmp_path: Path,
                                                                                    converted_model_dir: Path):
    report = load.run(requests=200, clients=50, workdir=tmp_path, max_queue=2)
    assert report["lost"] == 0, report["lost_by_kind"]
    assert report["outcomes"].get("200", 0) + report["outcomes"].get("429", 0) == 200
    assert report["outcomes"].get("200", 0) > 0
    assert report["healthy_after"]
    assert report["requester_peak_rss_mib"] < 150, report


@pytest.mark.slow
def test_sigterm_during_load_finishes_what_is_in_flight_refuses_the_rest_clearly_and_leaves_no_child(
        tmp_path: Path, converted_model_dir: Path):
    report = load.run(requests=200, clients=50, workdir=tmp_path, max_queue=2, sigterm_after=60)
    shutdown = report["sigterm"]
    assert report["lost"] == 0, (report["lost_by_kind"], shutdown)
    assert shutdown["exit_code"] == 0 and shutdown["surviving_children"] == [], shutdown
    in_flight = shutdown["in_flight_at_sigterm"]
    assert in_flight.get("200", 0) > 0, f"requests in flight at the signal were served to the end: {shutdown}"
    assert sum(shutdown["sent_after_sigterm"].values()) > 0, "the run went on sending after the signal"
