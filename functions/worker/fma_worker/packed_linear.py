"""Linear layers on a CPU through weights laid out once for oneDNN.

Why: torch's ``F.linear`` over a plain weight does not stream the weights at
memory speed at decode sizes (1-16 rows) on either CPU this project has measured
on; the same product over a weight reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's ``freezing`` pass
does for CPU inference) comes close:

* bfloat16 on an Intel Xeon with AVX-512 and AMX: all 211 of the embedded
  model's linear weights, model-sized so none sits in cache, took 27-28 ms
  against 33-36 ms per decode step at 1-16 rows, with bit-identical outputs.
  oneDNN packs bfloat16 only where the CPU has AVX-512 BW/VL/DQ or AVX-NE-CONVERT
  (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); elsewhere nothing is packed.
* float32 on an AMD EPYC with AVX2 and no AVX-512, where the plain product is
  MKL's ``sgemm``: at 2-16 rows it ran at a third to a half of memory speed (the
  output head, 113 MB, at 8 rows: 31 ms plain, 11 ms packed). A whole decode step
  at 8 rows took 158 against 212 ms, and the in-process mixed plan at 8 clients
  gave +30 % tokens/s. On the Xeon, float32 packing gained nothing on the same
  plan and lost at one row (22 against 29 ms). Vendor and capability both differ
  between the two machines; ``auto`` follows the one torch reports, packing
  float32 only where the CPU capability is AVX2 (:func:`wanted`), and
  ``FMA_PACK_WEIGHTS=true`` packs it anywhere.

How, without slowing a cold start: reordering all weights costs 80-110 ms in
bfloat16 (0.5-0.7 s in float32 on the AVX2 machine), more than a forked
worker's whole cold start, so nothing is packed at load. The batch scheduler
packs one transformer layer's weights after each of its steps
(:meth:`Packer.pack_next`), so a loaded model serves its first token on the
plain weights and is fully packed after a few dozen steps.

What keeps it safe:

* Each module keeps its ``weight`` parameter: the state dict, sleep, the
  level-1 fingerprint and the level-2 remap see the model as loaded. A packed
  copy is used only while that parameter is still the tensor it was made from
  (same storage, same shape); anything else runs the plain product.
* Sleep drops every packed copy (:meth:`Packer.drop`), so a sleeping worker
  holds one copy of its weights and a wake is verified on the plain ones,
  from which the copies are made again.
* The first packed weight is checked against the plain product on a random
  input. In bfloat16 both are oneDNN's and must agree bit for bit, so the text
  never depends on how far packing has got since the last load or wake. In
  float32 the plain product is MKL's and the two differ in the last bits, as
  MKL's own results differ with the number of rows in the batch (row 0 of a
  3-row product is not row 0 alone): they must agree to float32 rounding
  (:data:`_F32_SLACK`). A greedy float32 answer may therefore differ
  between the first steps after a load and later ones only where two tokens'
  logits tie to the last bits, as it already may between a request alone and
  the same request in a batch. A mismatch beyond that turns packing off with a
  log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("fma.worker.packed_linear")

# The row count oneDNN is told to expect; any count works (1..prefill), this one is the batch's typical size.
_ROWS_HINT = 8
# float32: the packed product's error against the exact (float64) one may be this many times the plain
# product's own error. Both are rounding of the sums, which grows with the layer's width and its weights, so the
# bound scales with them; a wrong layout is off by the order of the values themselves, far beyond it.
_F32_SLACK = 8.0
_DTYPES = ("bfloat16", "float32")


def wanted(mode: str, device: str, dtype: str, capability: str, bf16_packable: bool) -> bool:
    """Pack this model's linear weights? ``mode`` is ``FMA_PACK_WEIGHTS``; ``capability`` torch's CPU
    capability (``AVX512``, ``AVX2``, ``DEFAULT``); ``bf16_packable`` whether oneDNN packs bfloat16 on this CPU.

    ``auto``: bfloat16 wherever oneDNN packs it; float32 only on AVX2 (x86 below AVX-512), where MKL's small-batch
    product is far from memory speed (on the AVX-512 machine measured, an Intel Xeon, float32 gained nothing)."""
    if mode == "false" or device != "cpu" or dtype not in _DTYPES:
        return False
    if dtype == "bfloat16":
        return bf16_packable
    return mode == "true" or capability == "AVX2"  # other CPUs (ARM, POWER, x86 without AVX2) were not measured


def supported(torch: Any, device: str, dtype: str, mode: str = "auto") -> bool:
    """Packing is wanted (:func:`wanted`) and this torch has oneDNN's linear ops."""
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    bf16 = hasattr(ops, "_is_mkldnn_bf16_supported") and bool(ops._is_mkldnn_bf16_supported())
    return wanted(mode, device, dtype, torch.backends.cpu.get_cpu_capability(), bf16)


class Packer:
    """The model's packable linear layers, their packed copies, and the forward that uses them."""

    def __init__(self, torch: Any, model: Any, dtype: Any = None) -> None:
        """Wraps the model's linear layers of ``dtype`` (by default its first linear weight's): a model that
        keeps some layers in another type (transformers' ``_keep_in_fp32_modules``) packs only the chosen one."""
        self._torch = torch
        self._packed: list[Any] = []
        self._checked = False
        self.disabled = False
        self._bytes = 0
        self._seconds = 0.0
        linear = torch.nn.Linear
        if dtype is None:
            dtype = next((m.weight.dtype for m in model.modules() if type(m) is linear), torch.float32)
        dtypes = (dtype,) if dtype in (torch.bfloat16, torch.float32) else ()
        groups: dict[str, list[Any]] = {}
        for name, module in model.named_modules():
            if type(module) is linear and module.weight.dtype in dtypes and module.weight.device.type == "cpu":
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
        dtype = module.weight.dtype
        probe = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, module.bias, "none", [], "")
            want = torch.nn.functional.linear(probe, module.weight, module.bias)
        if dtype == torch.bfloat16:
            agree = torch.equal(got, want)  # bit for bit: the text must not depend on how far packing has got
        else:  # MKL against oneDNN: float32 rounding, as MKL against itself at another batch size
            bias = module.bias.detach().double() if module.bias is not None else None
            exact = torch.nn.functional.linear(probe.double(), module.weight.detach().double(), bias)
            plain_error = float((want.double() - exact).abs().max())
            floor = 1e-6 * float(exact.abs().max())  # where the plain product happens to be exact
            agree = float((got.double() - exact).abs().max()) <= _F32_SLACK * plain_error + floor
        if agree:
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
