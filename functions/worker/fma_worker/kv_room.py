"""Room at the right of the batch's KV cache, so a decode step writes its column in place.

transformers' ``DynamicLayer`` appends a step's keys and values with
``torch.cat``, which copies the layer's whole cache on every step. In a batch
of 16 rows, 400 columns wide (bfloat16, this CPU) those copies were a third of
the step's time (``aten::cat`` 287 of 833 ms over 10 steps under
``torch.profiler``); with room kept, the step went from 83 to 52 ms. The
attention kernel reads the strided views as they are.

The room is bounded by how wide the batch can still grow (the batcher's
``reach``: each row's length plus the tokens it may still feed), so the cache
never holds more slots than admission allowed for; ``ROOM`` bounds it further,
so a batch that soon shrinks did not pay for columns it never uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.cache_utils import DynamicLayer

ROOM = 64  # columns kept free at the right of each layer's cache: one copy of the cache per 64 steps, not per step


class RoomyLayer(DynamicLayer):
    """A full-attention layer whose ``keys``/``values`` are views of longer buffers (the room): columns
    ``start..end`` hold the cache, a step writes its column at ``end`` in place, trimming padding from the left
    moves ``start``. Anything else that assigns ``keys``/``values`` leaves the views behind, and the next step
    then appends as ``DynamicLayer`` does until :func:`ensure_room` gives the layer room again."""

    def __init__(self, key_room: Any, value_room: Any, start: int, end: int) -> None:
        super().__init__()
        self.is_initialized = True
        self.device = key_room.device
        self._key_room, self._value_room = key_room, value_room
        self._start, self._end = start, end
        self._viewing()

    @classmethod
    def around(cls, keys: Any, values: Any, capacity: int) -> RoomyLayer:
        """``keys``/``values`` copied into room ``capacity`` columns wide."""
        length = keys.shape[-2]
        key_room = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        value_room = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        key_room[:, :, :length].copy_(keys)
        value_room[:, :, :length].copy_(values)
        return cls(key_room, value_room, 0, length)

    def _viewing(self) -> None:
        self.keys = self._key_room[:, :, self._start:self._end]
        self.values = self._value_room[:, :, self._start:self._end]
        self._view = self.keys

    @property
    def capacity(self) -> int:
        """Columns the cache can span before it is copied again."""
        return self._key_room.shape[-2] - self._start

    def free(self) -> int:
        """Columns that can still be written in place (0 once ``keys`` was replaced)."""
        if self.keys is not self._view:
            return 0
        return self._key_room.shape[-2] - self._end

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        added = key_states.shape[-2]
        if self.free() < added:
            return super().update(key_states, value_states, *args, **kwargs)
        self._key_room[:, :, self._end:self._end + added].copy_(key_states)
        self._value_room[:, :, self._end:self._end + added].copy_(value_states)
        self._end += added
        self._viewing()
        return self.keys, self.values

    def select_rows(self, index: Any) -> None:
        """Keep the rows of ``index``, with their room (one copy, as selecting them from a plain layer costs)."""
        if self.keys is not self._view:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
            return
        self._key_room = self._key_room[:, :, self._start:].index_select(0, index)
        self._value_room = self._value_room[:, :, self._start:].index_select(0, index)
        self._end -= self._start
        self._start = 0
        self._viewing()

    def trim_left(self, columns: int) -> None:
        """Drop the first ``columns`` (padding in every row): no copy, the view starts later."""
        if self.keys is not self._view:
            self.keys, self.values = self.keys[:, :, columns:, :], self.values[:, :, columns:, :]
            return
        self._start += columns
        self._viewing()


def ensure_room(cache: Any, reach: Callable[[], int]) -> int:
    """Room for the next column in every plain full-attention layer (other kinds append as they always do):
    up to ``ROOM`` more, never past ``reach()``. The cache's capacity in columns: what it holds memory for."""
    capacity = 0
    limit: int | None = None
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, RoomyLayer) and layer.free() >= 1:
            capacity = max(capacity, layer.capacity)
            continue
        if type(layer) not in (DynamicLayer, RoomyLayer) or not layer.is_initialized or layer.keys.dim() != 4:
            continue
        length = layer.keys.shape[-2]
        if limit is None:
            limit = reach()
        roomy = RoomyLayer.around(layer.keys, layer.values, max(length + 1, min(length + ROOM, limit)))
        cache.layers[i] = roomy
        capacity = max(capacity, roomy.capacity)
    return capacity
