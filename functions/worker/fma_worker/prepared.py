"""A model's parts built ahead of its worker: config, tokenizer and an empty model.

On this project's CPUs a forked worker spent most of its cold start on work
that does not depend on the weights: parsing ``tokenizer.json`` (0.2-0.4 s
of Rust parsing for a 49k-token BPE vocabulary) and building the model's
modules (0.1-0.3 s, most of it transformers initialising parameters that are
about to be replaced). The launcher does both once per model, before any
fork, with :func:`prepare`; each forked child finds them in its copy of this
module's table and :func:`take` hands them to the engine. A plain process
finds nothing and builds them itself, so the table is an optimisation,
never a dependency.

What makes this safe:

* **Nothing here touches a device.** The model is only built for a CPU
  worker (a CUDA worker loads with ``from_pretrained(device_map=...)``), its
  parameters are the weight files' private mappings (``map_into``; mapping
  reads no page) or, where mapping cannot load the checkpoint, empty on the
  ``meta`` device; so CUDA is never initialised in the launcher and its
  children may still use the GPU.
* **Each child owns its copy.** After ``fork`` the child's table is
  copy-on-write memory and its mappings private: a child touching or
  emptying its parameters changes its own pages only. A child keeps the
  entry it takes and sets the others aside (:func:`set_aside_others`),
  letting go of their mapped weight files once it is ready
  (:func:`release_set_aside`), so it does not hold other models' files open
  for its lifetime.
* **Stale parts are never used.** Each entry records the size, mtime and
  inode of the files it was built from, the weight files included;
  :func:`take` returns ``None`` when they changed (a folder converted again,
  a model replaced, even by a copy keeping the old mtime), and the launcher
  drops such entries before each fork (:func:`drop_stale`), so it does not
  keep a replaced file's blocks alive either.
* The tokenizer is built with ``TOKENIZERS_PARALLELISM=false``
  (``runtime_env``), so no Rust thread pool exists to be lost across ``fork``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fma.worker.prepared")

# The files whose change invalidates prepared parts.
_WATCHED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json")


@dataclass
class Parts:
    folder: str
    dtype: str
    config: Any
    tokenizer: Any
    skeleton: Any | None  # the modules, for a CPU worker (weights mapped if ``filled``, else meta); None otherwise
    signature: tuple[tuple[str, int, int, int], ...]
    seconds: float
    filled: bool = False  # the skeleton's parameters are the weight files' mapped pages (map_into), untouched


_table: dict[tuple[str, str], Parts] = {}


def _signature(folder: Path, weights: bool = False) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    names = [*_WATCHED, *(sorted(p.name for p in folder.glob("*.safetensors")) if weights else ())]
    for name in names:
        try:
            st = (folder / name).stat()
        except OSError:
            continue
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Skip transformers' random initialisation of parameters that are about to be replaced.

    On meta tensors it still runs every ``normal_`` through torch's Python reference
    implementations: 0.2-0.4 s for the embedded model, for nothing.
    """
    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:  # 4.x kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def auto_class(kind: str) -> Any:
    """transformers' class for a model of this kind: an encoder's bare states for embeddings, else a causal LM."""
    import transformers

    return transformers.AutoModel if kind == "embedding" else transformers.AutoModelForCausalLM


def empty_model(config: Any, dtype: Any, kind: str = "chat") -> Any:
    """The model's modules with every parameter on the meta device (buffers real, on the CPU)."""
    from accelerate import init_empty_weights

    with no_init(), init_empty_weights(include_buffers=False):
        return auto_class(kind).from_config(config, dtype=dtype)


def build(folder: Path, dtype_name: str, *, with_skeleton: bool, kind: str = "chat") -> Parts:
    """The parts; with a skeleton, its parameters are mapped onto the weight files as well (``map_into``):
    mapping 272 tensors and assigning them cost a forked worker 20 ms of its cold start, and the mapping
    reads nothing, so the launcher holds no weight in memory for it. The child touches the pages itself."""
    import torch
    import transformers

    started = time.monotonic()
    signature = _signature(folder, weights=with_skeleton)
    config = transformers.AutoConfig.from_pretrained(str(folder))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    skeleton, filled = None, False
    if with_skeleton:
        dtype = getattr(torch, dtype_name)
        skeleton = empty_model(config, dtype, kind)
        if any(folder.glob("*.safetensors")):
            filled = map_into(skeleton, folder, dtype) is not None
            if not filled:  # partly assigned: the child starts from an empty one and falls back as it would
                skeleton = empty_model(config, dtype, kind)
    return Parts(str(folder), dtype_name, config, tokenizer, skeleton, signature, time.monotonic() - started,
                 filled)


def map_into(model: Any, folder: Path, dtype: Any) -> list[Any] | None:
    """Map the folder's safetensors into ``model``'s empty parameters; the mapped tensors, or None when mapping
    cannot load this checkpoint as ``from_pretrained`` would (several dtypes, keys left unfilled or unused).

    ``load_file`` maps each file (a private mapping: nothing is read until a page is touched, and the model may
    still write to its copy); ``assign=True`` makes the parameters those tensors, no copy.
    """
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if any(v.dtype != dtype for v in state.values() if v.is_floating_point()):
        return None
    state = _as_named_by(model, state)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if (folder / "generation_config.json").is_file():  # from_pretrained reads it; sampling defaults, EOS
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [k for k in result.unexpected_keys if not any(p.search(k) for p in ignored)]
    if unexpected or left:
        log.info("mapping the weights left %s unfilled and %s unused; loading with from_pretrained instead",
                 left[:3], unexpected[:3])
        return None
    return list(state.values())


def _as_named_by(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint saved from the base model (GPT-2's own on the hub: ``h.0.attn.c_attn.weight``, not
    ``transformer.h.0...``) named as the model with its head names it, as ``from_pretrained`` does: by the
    model's ``base_model_prefix``, for the keys that match only with it."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or any(k.startswith(prefix + ".") for k in state):
        return state
    names = set(model.state_dict())
    return {(f"{prefix}.{k}" if k not in names and f"{prefix}.{k}" in names else k): v for k, v in state.items()}


def prepare(folder: Path, dtype_name: str, *, with_skeleton: bool, kind: str = "chat") -> Parts:
    """Build and keep the parts of the model in ``folder`` (the launcher, before any fork)."""
    parts = build(folder, dtype_name, with_skeleton=with_skeleton, kind=kind)
    _table[(str(folder), dtype_name)] = parts
    return parts


def take(folder: str | Path, dtype_name: str) -> Parts | None:
    """The prepared parts of this model, removed from the table (a child uses them once); None if none or stale."""
    parts = _table.pop((str(folder), dtype_name), None)
    if parts is None:
        return None
    if parts.signature != _signature(Path(folder), weights=parts.skeleton is not None):
        log.info("prepared parts of %s are stale (its files changed); building them again", folder)
        return None
    return parts


def forget_all() -> None:
    _table.clear()
    _set_aside.clear()


# Other models' parts a forked child found in its table, kept out of the way (set_aside_others).
_set_aside: list[Parts] = []


def set_aside_others() -> None:
    """A forked child, once it has taken its own entry: the rest of the table is the launcher's, not ours.

    Why not drop it here: freeing another model's tokenizer in a forked child writes to the heap pages it shares
    with the launcher, copying each one; that cost 17-27 ms of the cold start per model prepared beside ours
    (measured in forked children of a launcher holding two models), and the copies are memory the child keeps.
    Left untouched they cost nothing. What must not stay is their mapped weight files, or a file replaced on
    disk keeps its blocks for this worker's lifetime: :func:`release_set_aside` lets go of those, after the start.
    """
    _set_aside.extend(_table.values())
    _table.clear()


def set_aside_weights() -> list[Parts]:
    """The set-aside models still holding mapped weight files (a skeleton that is not ``filled`` maps none)."""
    return [parts for parts in _set_aside if parts.skeleton is not None and parts.filled]


def release_set_aside(parts_list: list[Parts] | None = None) -> None:
    """Let go of the set-aside models' mapped weights (their modules); their configs and tokenizers stay.
    ``parts_list``: only these (what was set aside when the release was scheduled)."""
    for parts in _set_aside if parts_list is None else parts_list:
        if parts.filled:
            parts.skeleton = None
            parts.filled = False


def drop_stale() -> None:
    """Forget entries whose files changed (the launcher, before a fork): a replaced weight file's blocks are
    freed only once no process maps it."""
    for key, parts in list(_table.items()):
        if parts.signature != _signature(Path(parts.folder), weights=parts.skeleton is not None):
            del _table[key]


def target(env: Mapping[str, str]) -> tuple[Path, str, bool] | None:
    """What a worker with this environment would load, decided without touching a device or converting.

    Returns ``(folder, dtype, with_skeleton)``, or None when it cannot be known cheaply here: a hub model not
    in the model cache yet (the requester fetches it before the worker starts), an embedded model not converted
    yet (the worker converts it), or a worker that may run on CUDA with ``dtype=auto`` (its dtype depends on a
    device this process must not initialise).
    """
    import torch

    from . import dtype_policy
    from .model_store import embedded_cache_dir, is_converted, parse_source
    from .settings import WorkerSettings

    settings = WorkerSettings.from_env(env)
    cuda_possible = settings.device != "cpu" and torch.backends.cuda.is_built() and \
        env.get("CUDA_VISIBLE_DEVICES", None) not in ("", "-1")
    if settings.device.startswith("cuda") or cuda_possible:
        if settings.dtype == "auto":
            return None
        device_cpu = False
    else:
        device_cpu = True
    source = parse_source(settings.source or "")
    hub_folder = None
    if source.kind == "hf":  # once in the model cache, a folder like any other (hub_cache.py; no network here)
        from fma_common import hub_cache

        hit = hub_cache.cached(hub_cache.HubRef.parse(source.ref), settings.hub_cache_dir or settings.cache_dir)
        if hit is None:
            return None
        hub_folder = hit.folder
    if settings.dtype != "auto":
        dtype = settings.dtype
    else:  # device_cpu here: the same choice the engine will make (dtype_policy), from the CPU's flags
        checkpoint = dtype_policy.folder_checkpoint_dtype(hub_folder) if hub_folder else \
            dtype_policy.source_checkpoint_dtype(source)
        dtype = dtype_policy.choose("auto", "cpu", checkpoint, dtype_policy.host_native("cpu")).dtype
    if hub_folder is not None:
        folder = hub_folder
    elif source.kind == "embedded":
        assert settings.cache_dir is not None
        folder = embedded_cache_dir(source.ref, dtype, settings.cache_dir)
        if not is_converted(folder):
            return None
    elif source.kind == "path":
        folder = Path(source.ref)
        if not (folder / "config.json").is_file():
            return None
    else:
        return None
    # The engine maps weights into a skeleton on a CPU only; a CUDA worker builds its model in from_pretrained.
    return folder, dtype, device_cpu
