"""Incremental detokenized text with stop sequences, for streaming.

Pure Python, no torch: the engine feeds the full decoded text of a choice after
every token and gets back the part that is safe to send. Two things are held
back until they resolve:

* a trailing U+FFFD, which is how a byte-level BPE renders the first bytes of
  a multi-byte character whose remaining bytes come with the next token;
* the longest tail that is a prefix of a stop sequence ("Hel" while waiting to
  see whether "Hello" follows), so a partial stop string never leaks to the
  client, streaming or not.
"""

from __future__ import annotations


class StopTextTracker:
    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, text: str, *, final: bool = False) -> str:
        """Feed the whole decoded text so far; return the new safe suffix.

        After a stop sequence is found, ``stopped`` is True and the text before
        the stop sequence has been returned; later calls return "".
        """
        if self.stopped:
            return ""
        hit = self._find_stop(text)
        if hit is not None:
            self.stopped = True
            delta = text[self.emitted:hit]
            self.emitted = hit
            return delta
        end = len(text)
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
            end -= self._held_prefix(text, end)
        if end <= self.emitted:
            return ""
        delta = text[self.emitted:end]
        self.emitted = end
        return delta

    def _find_stop(self, text: str) -> int | None:
        best: int | None = None
        for stop in self.stops:
            # Only text that was not yet emitted (plus an overlap) can hold a new match.
            start = max(0, self.emitted - len(stop) + 1)
            idx = text.find(stop, start)
            if idx != -1 and (best is None or idx < best):
                best = idx
        return best

    def _held_prefix(self, text: str, end: int) -> int:
        hold = 0
        available = end - self.emitted
        for stop in self.stops:
            for k in range(min(len(stop) - 1, available), hold, -1):
                if text.endswith(stop[:k], 0, end):
                    hold = k
                    break
        return hold
