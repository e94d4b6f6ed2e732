"""Issue 26: a hub model is fetched once into the model cache, checked file by file, and then loaded with no
network at all. The real ``huggingface_hub`` client against a stand-in hub over HTTP (hub_standin.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hub_standin import HubStandIn, Repo

from fma_common import hub_cache

REPO = "acme/tiny-llama"


@pytest.fixture
def hub(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub's own cache apart: it copies a file it already holds there instead of downloading it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    files = Repo.from_folder(tiny_model_dir).files
    files["tf_model.h5"] = b"not for us" * 100  # another framework's weights: left on the hub
    files["README.md"] = b"# tiny"
    standin = HubStandIn({REPO: Repo(files), "acme/gated": Repo(dict(files), token="hf_right_token")})
    url = standin.start()
    yield standin, url
    standin.stop()


def test_the_first_fetch_downloads_each_needed_file_once_and_a_later_one_asks_the_hub_nothing(hub, tmp_path):
    standin, url = hub
    ref = hub_cache.HubRef.parse(REPO)
    got = hub_cache.fetch(ref, tmp_path, endpoint=url)
    counts = standin.downloads(REPO)
    assert counts and set(counts.values()) == {1}, counts
    assert "tf_model.h5" not in counts and "README.md" not in counts
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(counts)
    assert (got.folder / "model.safetensors").is_file() and not (got.folder / ".cache").exists()
    assert got.commit == standin.repos[REPO].commit
    before = len(standin.requests)
    again = hub_cache.fetch(ref, tmp_path, endpoint=url)
    assert again == got and len(standin.requests) == before, "a cached model must not touch the hub"
    assert hub_cache.cached(ref, tmp_path) == got


def test_two_fetches_at_once_download_once(hub, tmp_path):
    standin, url = hub
    results: list[object] = []
    start = threading.Barrier(3)

    def one() -> None:
        start.wait()
        results.append(hub_cache.fetch(hub_cache.HubRef.parse(REPO), tmp_path, endpoint=url))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3 and len({r.folder for r in results}) == 1  # type: ignore[attr-defined]
    assert set(standin.downloads(REPO).values()) == {1}, standin.downloads(REPO)


@pytest.mark.parametrize("fault", ["corrupt", "cut"])
def test_a_corrupt_or_cut_download_is_never_kept_and_the_next_fetch_gets_it_right(hub, tmp_path, fault):
    standin, url = hub
    getattr(standin, fault).add("model.safetensors")
    ref = hub_cache.HubRef.parse(REPO)
    with pytest.raises(hub_cache.HubFetchError) as err:
        hub_cache.fetch(ref, tmp_path, endpoint=url)
    assert "model.safetensors" in str(err.value) and "nothing was kept" in str(err.value), str(err.value)
    assert hub_cache.cached(ref, tmp_path) is None
    assert [p.name for p in ref.folder(tmp_path).iterdir() if not p.name.startswith(".lock")] in ([], ["refs"])
    getattr(standin, fault).clear()
    assert hub_cache.fetch(ref, tmp_path, endpoint=url).files >= 4


def test_a_missing_model_and_a_refused_token_are_clear_errors_that_never_show_the_token(hub, tmp_path):
    _standin, url = hub
    with pytest.raises(hub_cache.HubFetchError, match="no model acme/nothing-here on the hub"):
        hub_cache.fetch(hub_cache.HubRef.parse("acme/nothing-here"), tmp_path, endpoint=url)
    with pytest.raises(hub_cache.HubFetchError, match="gated or private") as err:
        hub_cache.fetch(hub_cache.HubRef.parse("acme/gated"), tmp_path, endpoint=url, token="hf_wrong_token")
    assert "hf_wrong_token" not in str(err.value)
    ok = hub_cache.fetch(hub_cache.HubRef.parse("acme/gated"), tmp_path, endpoint=url, token="hf_right_token")
    assert ok.files >= 4


def test_an_offline_process_says_what_to_do_instead_of_fetching(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    standin, url = hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub_cache.HubFetchError, match="fma models pull"):
        hub_cache.fetch(hub_cache.HubRef.parse(REPO), tmp_path, endpoint=url)
    assert standin.requests == []


def test_a_revision_is_pinned_at_its_first_fetch(hub, tmp_path):
    standin, url = hub
    ref = hub_cache.HubRef.parse(f"{REPO}@main")
    first = hub_cache.fetch(ref, tmp_path, endpoint=url)
    standin.repos[REPO].commit = "f" * 40  # the branch moves on the hub
    assert hub_cache.fetch(ref, tmp_path, endpoint=url) == first, "a cached revision is used as it is"
    moved = hub_cache.fetch(ref, tmp_path, endpoint=url, refresh=True)
    assert moved.commit == "f" * 40 and hub_cache.cached(ref, tmp_path) == moved


def test_only_what_a_worker_loads_is_wanted():
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
             "onnx/model.onnx", "tokenizer.json", "vocab.json", "merges.txt", "README.md", "64-8bits.tflite",
             "rust_model.ot", "generation_config.json", "1_Pooling/config.json"]
    assert hub_cache.wanted(files) == ["1_Pooling/config.json", "config.json", "generation_config.json",
                                       "merges.txt", "model.safetensors", "tokenizer.json", "vocab.json"]
    assert "pytorch_model.bin" in hub_cache.wanted(["config.json", "pytorch_model.bin"])


def test_ids_that_could_name_a_folder_outside_the_cache_are_refused():
    for bad in ("a/b/c", "../x", "org/m@../../etc", "org/m@/abs", "org/.hidden"):
        with pytest.raises(hub_cache.HubFetchError):
            hub_cache.HubRef.parse(bad)
    assert hub_cache.HubRef.parse("org/m@v1.0").revision == "v1.0"
    from fma_requester.registry import ModelRegistry

    with pytest.raises(Exception, match="not a hub model id"):
        ModelRegistry.from_text("models:\n  - {name: x, source: 'hf:a/b/c'}\n")


def test_a_killed_fetchs_leftovers_are_removed_and_a_malformed_marker_is_a_miss(hub, tmp_path):
    _standin, url = hub
    ref = hub_cache.HubRef.parse(REPO)
    base = ref.folder(tmp_path)
    (base / ".deadbeef.tmp-999999").mkdir(parents=True)  # a fetch killed outright left this
    (base / ".deadbeef.tmp-999999" / "model.safetensors").write_bytes(b"x" * 1000)
    got = hub_cache.fetch(ref, tmp_path, endpoint=url)
    assert not list(base.glob(".*.tmp-*"))
    (got.folder / hub_cache.COMPLETE).write_text('{"no": "files"}')
    assert hub_cache.cached(ref, tmp_path) is None


def test_a_second_layout_of_the_same_weights_is_not_fetched():
    files = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "consolidated.safetensors", "params.json", "tokenizer.json"]
    assert "consolidated.safetensors" not in hub_cache.wanted(files)
    assert {"model-00001-of-00002.safetensors", "model.safetensors.index.json"} <= set(hub_cache.wanted(files))
