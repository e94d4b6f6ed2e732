"""ReplyCache: one answer per event id, however the deliveries overlap (fma_requester/replies.py)."""

from __future__ import annotations

import threading
import time

import pytest

from fma_requester.replies import ReplyCache


def test_a_repeat_that_arrives_while_the_first_is_answered_waits_for_that_answer():
    cache = ReplyCache()
    runs: list[int] = []
    release = threading.Event()

    def slow() -> str:
        runs.append(1)
        release.wait(5)
        return "reply-1"

    answers: list[str] = []
    first = threading.Thread(target=lambda: answers.append(cache.answer(("/s", "e"), slow)))
    second = threading.Thread(target=lambda: answers.append(cache.answer(("/s", "e"), slow)))
    first.start()
    time.sleep(0.1)
    second.start()
    time.sleep(0.1)
    release.set()
    first.join(5)
    second.join(5)
    assert answers == ["reply-1", "reply-1"] and len(runs) == 1 and cache.repeats == 1


def test_a_repeat_of_a_first_delivery_that_raised_does_the_work_itself():
    cache = ReplyCache()
    started = threading.Event()
    fail = threading.Event()

    def failing() -> str:
        started.set()
        fail.wait(5)
        raise RuntimeError("queue full")

    errors: list[BaseException] = []

    def first() -> None:
        try:
            cache.answer(("/s", "e"), failing)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    started.wait(5)
    answers: list[str] = []
    waiter = threading.Thread(target=lambda: answers.append(cache.answer(("/s", "e"), lambda: "done-by-the-retry")))
    waiter.start()
    time.sleep(0.1)
    fail.set()
    t.join(5)
    waiter.join(5)
    assert errors and answers == ["done-by-the-retry"]


def test_answers_are_forgotten_after_their_ttl_and_beyond_the_bound(monkeypatch: pytest.MonkeyPatch):
    cache = ReplyCache(keep=2, ttl_s=60)
    for i in range(3):
        cache.answer(("/s", str(i)), lambda i=i: f"r{i}")
    assert cache.answer(("/s", "0"), lambda: "again") == "again", "the oldest was evicted"
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 61)
    assert cache.answer(("/s", "2"), lambda: "fresh") == "fresh", "past its ttl"
