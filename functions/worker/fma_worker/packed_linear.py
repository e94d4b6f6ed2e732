"""bfloat16 linear layers on a CPU through weights laid out once for oneDNN.

Why: on this project's CPUs (avx512_bf16 / AMX) ``torch.nn.functional.linear``
over a plain bfloat16 weight streams the model's 269 MB at 10-16 GB/s, while the
same product over a weight reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's ``freezing`` pass
does for CPU inference) runs at memory speed: all 211 of the embedded model's
linear weights, model-sized so none sits in cache, took 33-36 ms against 27-28 ms
per decode step at 1-16 rows, with bit-identical outputs
(``tests/test_packed_linear.py``); at 256 rows (a prefill chunk) one run gave
81 against 106 ms and later runs, on a noisier machine, no clear difference.
In float32, MKL's plain path was faster at one row (22 against 29 ms) and
packing gained 6-25 % at 8-16 rows for a second copy of 540 MB: only bfloat16
is packed.

How, without slowing a cold start: reordering all weights costs 80-110 ms, more
than half of a forked worker's cold start, so nothing is packed at load. The
batch scheduler packs one transformer layer's weights (about 3 ms) after each
of its steps (:meth:`Packer.pack_next`), so a loaded model serves its first
token on the plain weights and is fully packed after a few dozen steps.

What keeps it safe:

* Each module keeps its ``weight`` parameter: the state dict, sleep, the
  level-1 fingerprint and the level-2 remap see the model as loaded. A packed
  copy is used only while that parameter is still the tensor it was made from
  (same storage, same shape); anything else runs the plain product.
* Sleep drops every packed copy (:meth:`Packer.drop`), so a sleeping worker
  holds one copy of its weights and a wake is verified on the plain ones,
  from which the copies are made again.
* The first packed weight is checked against the plain product on a random
  input, bit for bit; a mismatch (another oneDNN, another CPU) turns packing
  off with a log line instead of serving numbers that would depend on how far
  packing has got since the last load or wake.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("fma.worker.packed_linear")

# The row count oneDNN is told to expect; any count works (1..prefill), this one is the batch's typical size.
_ROWS_HINT = 8


def supported(torch: Any, device: str, dtype: str) -> bool:
    """Packing helps and is available: bfloat16 on a CPU whose torch has oneDNN's linear ops."""
    if device != "cpu" or dtype != "bfloat16" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


class Packer:
    """The model's packable linear layers, their packed copies, and the forward that uses them."""

    def __init__(self, torch: Any, model: Any) -> None:
        self._torch = torch
        self._packed: list[Any] = []
        self._checked = False
        self.disabled = False
        self._bytes = 0
        self._seconds = 0.0
        linear = torch.nn.Linear
        groups: dict[str, list[Any]] = {}
        for name, module in model.named_modules():
            if type(module) is linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
                module.forward = _forward(torch, module)
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                # A decoder layer's attention and MLP together: "model.layers.3.self_attn.q_proj" -> "model.layers.3"
                key = parent.rsplit(".", 1)[0] if parent.endswith(("attn", "mlp")) else parent
                groups.setdefault(key, []).append(module)
        self._groups = list(groups.values())  # one group per packing step
        self._pending: list[list[Any]] = list(self._groups)
        self.model = model
        self.modules = sum(len(g) for g in self._groups)

    @property
    def done(self) -> bool:
        return self.disabled or not self._pending

    def pack_next(self) -> None:
        """Pack the next group (one transformer layer's weights, or the output head); a no-op when done."""
        if self.done:
            return
        torch = self._torch
        started = time.perf_counter()
        group = self._pending.pop(0)
        try:
            for module in group:
                weight = module.weight
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
                if not self._checked and not self._check(module, packed):
                    return
                module._fma_packed = (packed, weight.data_ptr(), tuple(weight.shape))
                self._packed.append(module)
                self._bytes += weight.numel() * weight.element_size()
        except Exception as exc:  # an optimisation: never a reason to fail the requests in the batch
            log.warning("packing linear weights failed (%s: %s); serving with plain weights", type(exc).__name__, exc)
            self.disabled = True
            self.drop()
            return
        self._seconds += time.perf_counter() - started
        if not self._pending:
            log.info("packed %d linear weights (%.0f MB) for oneDNN in %.0f ms, over the first steps",
                     len(self._packed), self._bytes / 1e6, self._seconds * 1000)

    def _check(self, module: Any, packed: Any) -> bool:
        torch = self._torch
        self._checked = True
        probe = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, module.bias, "none", [], "")
            want = torch.nn.functional.linear(probe, module.weight, module.bias)
        if torch.equal(got, want):  # bit for bit: the text must not depend on how far packing has got
            return True
        log.warning("oneDNN's packed linear disagrees with torch's plain one on this machine (largest difference "
                    "%.3g); serving with plain weights", float((got.float() - want.float()).abs().max()))
        self.disabled = True
        self._pending = []
        return False

    def drop(self) -> None:
        """Forget every packed copy (sleep): the next steps pack again from the weights as they are then."""
        for module in self._packed:
            module.__dict__.pop("_fma_packed", None)
        self._packed = []
        self._bytes = 0
        self._seconds = 0.0
        self._pending = [] if self.disabled else list(self._groups)

    @property
    def packed_bytes(self) -> int:
        return self._bytes


def _forward(torch: Any, module: Any) -> Any:
    linear = torch.nn.functional.linear
    pointwise = torch.ops.mkldnn._linear_pointwise

    def forward(x: Any) -> Any:
        packed = module.__dict__.get("_fma_packed")
        weight = module.weight
        if packed is not None and packed[1] == weight.data_ptr() and packed[2] == tuple(weight.shape) \
                and x.dtype == weight.dtype:
            return pointwise(x, packed[0], module.bias, "none", [], "")
        return linear(x, weight, module.bias)

    return forward
