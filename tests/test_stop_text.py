"""StopTextTracker: what a streaming client sees around stop sequences and UTF-8."""

from fma_worker.text import StopTextTracker


def feed(tracker: StopTextTracker, pieces: list[str], final_last: bool = True) -> list[str]:
    text, out = "", []
    for i, piece in enumerate(pieces):
        text += piece
        out.append(tracker.push(text, final=final_last and i == len(pieces) - 1))
    return out


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


def test_incomplete_utf8_replacement_char_is_held_until_resolved():
    t = StopTextTracker(())
    assert t.push("caf\ufffd") == "caf"
    assert t.push("café") == "é"


def test_no_stops_streams_everything():
    t = StopTextTracker(())
    assert feed(t, ["a", "b", "c"]) == ["a", "b", "c"]


def test_stop_at_the_very_start_yields_empty_text():
    t = StopTextTracker(("\n",))
    assert feed(t, ["\nfoo"]) == [""]
    assert t.stopped
