"""Reloading the models file when it changes, so editing models never needs a rollout.

On Knative the models file is a mounted ConfigMap without a name hash: the
kubelet swaps the file's contents in place (within about a minute) and the
requester's revision - and the GPU it holds - stays. A thread reads the
watched files every ``FMA_MODELS_RELOAD`` and, when their contents change,
parses them and hands the new registry to the actuator; a file that does not
parse, or that Knative would refuse, is logged and the running models stay.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fma.requester.reload")


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"<missing>")
    return h.hexdigest()


class FileWatcher:
    def __init__(self, paths: list[Path], interval_s: float, on_change: Callable[[], None]) -> None:
        self.paths = paths
        self.interval_s = interval_s
        self.on_change = on_change
        self._seen = _digest(paths)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fma-models-reload", daemon=True)

    def start(self) -> FileWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def check(self) -> bool:
        """Reload now if the files changed; True if they did."""
        digest = _digest(self.paths)
        if digest == self._seen:
            return False
        self._seen = digest
        try:
            self.on_change()
        except Exception as exc:  # a bad edit must not take the running models down
            log.error("the changed models file was not applied: %s", exc)
        return True

    def stop(self) -> None:
        self._stop.set()
