"""StopTextTracker: what a streaming client sees around stop sequences."""

from fma_worker.text import StopTextTracker


def feed(tracker: StopTextTracker, pieces: list[str], final_last: bool = True) -> list[str]:
    return [tracker.push(piece, final=final_last and i == len(pieces) - 1) for i, piece in enumerate(pieces)]


def test_stop_split_across_tokens_never_leaks_a_partial_stop():
    t = StopTextTracker(("Hello",))
    out = feed(t, ["Say ", "Hel", "lo", " world"])
    assert out == ["Say ", "", "", ""]
    assert t.stopped


def test_false_start_of_stop_is_released_when_it_diverges():
    t = StopTextTracker(("Hello",))
    out = feed(t, ["a He", "lp me"])
    assert "".join(out) == "a Help me"
    assert out[0] == "a "  # "He" held back until it diverged
    assert not t.stopped


def test_held_prefix_is_flushed_at_the_end_of_a_length_stop():
    t = StopTextTracker(("###",))
    out = feed(t, ["abc", "##"], final_last=True)
    assert "".join(out) == "abc##"


def test_earliest_of_several_stops_wins():
    t = StopTextTracker(("world", "lo w"))
    assert "".join(feed(t, ["hello world"])) == "hel"


def test_stop_spanning_three_pieces_is_found():
    t = StopTextTracker(("abcd",))
    assert feed(t, ["xa", "b", "c", "dy"]) == ["x", "", "", ""]
    assert t.stopped


def test_no_stops_streams_everything():
    t = StopTextTracker(())
    assert feed(t, ["a", "b", "c"]) == ["a", "b", "c"]


def test_stop_at_the_very_start_yields_empty_text():
    t = StopTextTracker(("\n",))
    assert feed(t, ["\nfoo"]) == [""]
    assert t.stopped


def test_long_generation_keeps_only_the_held_tail():
    t = StopTextTracker(("STOP",))
    out = feed(t, ["word "] * 2000 + ["ST"], final_last=False)
    assert "".join(out) == "word " * 2000
    assert t._pending == "ST"
