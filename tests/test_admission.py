"""Admission: bounded slots and queue, FIFO hand-off, idempotent release."""

import threading

import pytest

from fma_common.errors import QueueFull
from fma_worker.admission import Admission


def test_full_queue_is_refused_at_once_with_retry_after():
    adm = Admission(slots=1, max_queue=0, timeout_s=5)
    lease = adm.acquire()
    with pytest.raises(QueueFull) as info:
        adm.acquire()
    assert info.value.status == 429
    assert int(info.value.headers["Retry-After"]) >= 1
    lease.release()
    adm.acquire().release()


def test_waiter_times_out_with_429():
    adm = Admission(slots=1, max_queue=1, timeout_s=0.05)
    lease = adm.acquire()
    with pytest.raises(QueueFull):
        adm.acquire()
    assert adm.waiting == 0
    lease.release()


def test_release_is_idempotent():
    adm = Admission(slots=1, max_queue=0, timeout_s=1)
    lease = adm.acquire()
    lease.release()
    lease.release()
    assert adm.busy == 0


def test_waiters_are_served_in_arrival_order():
    adm = Admission(slots=1, max_queue=5, timeout_s=10)
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
