"""Admission: bounded slots and queue, FIFO hand-off, idempotent release."""

import threading

import pytest

from fma_common.errors import QueueFull
from fma_worker.admission import Admission


def test_full_queue_is_refused_at_once_with_retry_after():
    adm = Admission(rows=1, max_queue=0, timeout_s=5)
    lease = adm.acquire()
    with pytest.raises(QueueFull) as info:
        adm.acquire()
    assert info.value.status == 429
    assert int(info.value.headers["Retry-After"]) >= 1
    lease.release()
    adm.acquire().release()


def test_waiter_times_out_with_429():
    adm = Admission(rows=1, max_queue=1, timeout_s=0.05)
    lease = adm.acquire()
    with pytest.raises(QueueFull):
        adm.acquire()
    assert adm.waiting == 0
    lease.release()


def test_release_is_idempotent():
    adm = Admission(rows=1, max_queue=0, timeout_s=1)
    lease = adm.acquire()
    lease.release()
    lease.release()
    assert adm.busy == 0


def test_waiters_are_served_in_arrival_order():
    adm = Admission(rows=1, max_queue=5, timeout_s=10)
    first = adm.acquire()
    order: list[int] = []
    queued = threading.Semaphore(0)
    threads = []

    def wait_turn(i: int) -> None:
        lease = adm.acquire()
        order.append(i)
        lease.release()

    for i in range(3):
        t = threading.Thread(target=wait_turn, args=(i,))
        t.start()
        threads.append(t)
        # wait until this thread is queued before starting the next one
        while adm.waiting < i + 1:
            queued.acquire(timeout=0.001)
    first.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2]


def test_rows_and_kv_slots_are_both_budgets_and_a_big_request_runs_alone():
    adm = Admission(rows=4, max_queue=2, timeout_s=0.05, tokens=1000)
    a = adm.acquire(rows=3, width=100)  # 3 rows of up to 100 tokens: 300 slots
    with pytest.raises(QueueFull):
        adm.acquire(rows=2, width=10)  # rows: 3 + 2 > 4
    b = adm.acquire(rows=1, width=250)  # 4 rows padded to 250: 1000 slots
    assert adm.kv_slots == 1000
    a.release()
    b.release()
    huge = adm.acquire(rows=8, width=5000)  # larger than the whole budget: alone, it runs
    assert adm.busy == 1 and adm.busy_rows == 8
    with pytest.raises(QueueFull):
        adm.acquire()
    huge.release()


def test_a_long_request_beside_short_ones_is_counted_at_its_length_for_every_row():
    """Issue 21, defect 2: admission summed each request's own length (one 420-token request beside 7 short ones
    counted 504 tokens) while the cache, padded to its longest row, held 8 x 420 slots per layer."""
    adm = Admission(rows=16, max_queue=8, timeout_s=0.05, tokens=1200)
    long = adm.acquire(rows=1, width=420)
    short = [adm.acquire(rows=1, width=12) for _ in range(1)]
    assert adm.kv_slots == 2 * 420
    with pytest.raises(QueueFull):
        adm.acquire(rows=1, width=12)  # a third row would make the padded cache 3 x 420 = 1260 > 1200
    long.release()
    more = [adm.acquire(rows=1, width=12) for _ in range(14)]  # without the long row, short ones fit by the dozen
    assert adm.kv_slots == 15 * 12
    for lease in short + more:
        lease.release()


def test_a_big_request_at_the_head_is_not_overtaken_by_small_ones():
    adm = Admission(rows=4, max_queue=5, timeout_s=5)
    running = adm.acquire(rows=2)
    order: list[str] = []

    def take(name: str, rows: int) -> None:
        lease = adm.acquire(rows=rows)
        order.append(name)
        lease.release()

    big = threading.Thread(target=take, args=("big", 4))
    big.start()
    while adm.waiting < 1:
        threading.Event().wait(0.001)
    small = threading.Thread(target=take, args=("small", 1))
    small.start()
    while adm.waiting < 2:
        threading.Event().wait(0.001)
    assert order == [], "1 row is free, but the big request came first"
    running.release()
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]
