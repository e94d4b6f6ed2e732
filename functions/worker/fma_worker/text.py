"""Stop sequences over streamed text, for streaming and whole answers alike.

Pure Python, no torch: the generation loop feeds each new piece of decoded
text (``tokenizers``' ``DecodeStream`` already holds back the bytes of a
character split across tokens) and gets back the part that is safe to send.
The longest tail that is a prefix of a stop sequence ("Hel" while waiting to
see whether "Hello" follows) is held back until it resolves, so a partial
stop string never leaks to the client. Only the held-back tail is kept, so
each step costs the length of the stop sequences, not of the text so far.
"""

from __future__ import annotations


class StopTextTracker:
    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""  # decoded text not yet handed out (at most a stop's length, after a push)
        self.stopped = False

    def push(self, piece: str, *, final: bool = False) -> str:
        """Feed the next decoded piece; return the new safe text.

        After a stop sequence is found, ``stopped`` is True and the text
        before the stop sequence has been returned; later calls return "".
        With ``final`` (the choice ends here) nothing is held back.
        """
        if self.stopped:
            return ""
        text = self._pending + piece
        hit = self._find_stop(text)
        if hit is not None:
            self.stopped = True
            self._pending = ""
            return text[:hit]
        hold = 0 if final else self._held_prefix(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(stop) for stop in self.stops) if i != -1]
        return min(hits) if hits else None

    def _held_prefix(self, text: str) -> int:
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold
