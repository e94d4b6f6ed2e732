"""Which per-model environment a worker forked from the pre-warmed launcher can honour.

The launcher has already imported torch, transformers and huggingface_hub
when it forks a worker, and some of their settings were read from the
environment at that moment. A forked worker must behave exactly like a
plain new process with the same environment, so each variable falls in one
of three groups:

* **read later**: anything the libraries read when they use it (our own
  ``FMA_*``, ``PORT``, ``CUDA_VISIBLE_DEVICES`` and ``PYTORCH_CUDA_ALLOC_CONF``,
  read when CUDA starts in the child - the launcher never starts it).
  Setting ``os.environ`` in the child is enough.
* **re-read after fork**: huggingface_hub computes ``HF_HOME``,
  ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``... once, at import, into
  ``huggingface_hub.constants`` (and transformers copies some of them). The
  child re-reads them (:data:`REREAD_PREFIXES`; ``fma_worker.launcher``).
* **fixed at import**: read by a native library or at import in a way that
  cannot be redone (OpenMP's ``OMP_*`` when libgomp loads, ``TORCH_*``
  logging, transformers' verbosity, the dynamic loader's ``LD_*``...). A
  worker whose value differs from the launcher's is *not* forked: the
  requester starts it as a plain process (:func:`fork_blockers`).
"""

from __future__ import annotations

from collections.abc import Mapping

REREAD_PREFIXES = ("HF_", "HUGGINGFACE_", "XDG_CACHE_HOME")
REREAD_EXACT = frozenset({"TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE"})

FIXED_AT_IMPORT_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "TORCH_", "PYTORCH_", "TRANSFORMERS_",
                            "TOKENIZERS_", "LD_", "PYTHON", "MALLOC_", "CUDA_MODULE_LOADING")
# Under a fixed-at-import prefix, but read only when first used (after fork).
READ_LATER = frozenset({"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "TOKENIZERS_PARALLELISM",
                        "PYTHONUNBUFFERED"})


def is_fixed_at_import(name: str) -> bool:
    if name in READ_LATER or name in REREAD_EXACT:
        return False
    return name.startswith(FIXED_AT_IMPORT_PREFIXES)


def is_reread(name: str) -> bool:
    return name in REREAD_EXACT or name.startswith(REREAD_PREFIXES)


def fork_blockers(launcher_env: Mapping[str, str], worker_env: Mapping[str, str]) -> list[str]:
    """Variables whose value for this worker differs from the launcher's and
    cannot be re-read after fork: if any, start the worker as a plain process."""
    names = {n for n in (*launcher_env, *worker_env) if is_fixed_at_import(n)}
    return sorted(n for n in names if launcher_env.get(n) != worker_env.get(n))
