"""functions/requester and functions/worker as Knative Functions: their func.yaml (issue 23, first part).

* Each func.yaml validates against knative/func's own JSON schema (vendored from c18d604, the newest commit
  mirrored: tests/data/knative-func-c18d604/) with one allowed difference: ``build.builder: host``, which func's
  CLI accepts (``cmd/build.go``) though the schema's enum lists only pack and s2i.
* Where a func.yaml and the kustomize manifests say the same thing (the requester's env, probes, scale,
  resources, ServiceAccount; a worker's env, probes and scale as the requester renders it), they agree.
* The shared code a folder-alone build needs (pack, s2i, on-cluster): ``make function-sources`` copies it into
  each function's folder, and a copy that differs from its source fails here (pack would ship the stale one).
"""

from __future__ import annotations

import copy
import filecmp
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_manifests import by_kind, containers, render

from conftest import REPO

SCHEMA = json.loads((REPO / "tests/data/knative-func-c18d604/func_yaml-schema.json").read_text())
FUNCTIONS = ["requester", "worker"]


def func_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "functions" / name / "func.yaml").read_text())


def schema_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())
    # YAML reads the timestamp as a datetime; func writes and reads it as an RFC 3339 string.
    doc = {**doc, "created": doc["created"].isoformat().replace("+00:00", "Z")} \
        if not isinstance(doc.get("created"), str) else doc
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_func_yaml_validates_against_funcs_schema_but_for_the_host_builder(name: str):
    doc = func_yaml(name)
    assert doc["specVersion"] == "0.36.0", "func's last migration (pkg/functions/function_migrations.go)"
    assert doc["runtime"] == "python" and doc["name"] == f"fma-{name}"
    errors = schema_errors(doc, SCHEMA)
    assert errors == ["build/builder: 'host' is not one of ['pack', 's2i']"], errors
    allowed = copy.deepcopy(SCHEMA)
    allowed["definitions"]["BuildSpec"]["properties"]["builder"]["enum"].append("host")
    assert schema_errors(doc, allowed) == []


def test_the_requester_function_says_what_its_kustomize_service_says():
    (svc,) = by_kind(render("knative/base"), "Service", "fma-requester")
    (container,) = containers(svc)
    doc = func_yaml("requester")
    env = {e["name"]: e.get("value") for e in container["env"]}
    for item in doc["run"]["envs"]:
        if item["value"].startswith("{{ secret:"):
            _, secret, key = item["value"].strip("{} ").split(":")
            ref = next(e for e in container["env"] if e["name"] == item["name"])["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret, key), item
        else:
            assert env[item["name"]] == item["value"], item
    health = doc["deploy"]["healthEndpoints"]
    assert health == {"liveness": container["livenessProbe"]["httpGet"]["path"],
                      "readiness": container["readinessProbe"]["httpGet"]["path"]}
    annotations = svc["spec"]["template"]["metadata"]["annotations"]
    scale = doc["deploy"]["options"]["scale"]
    assert (str(scale["min"]), str(scale["max"])) == (annotations["autoscaling.knative.dev/min-scale"],
                                                      annotations["autoscaling.knative.dev/max-scale"])
    resources = doc["deploy"]["options"]["resources"]
    assert resources["requests"] == container["resources"]["requests"]
    limits = {k: v for k, v in container["resources"]["limits"].items() if k != "nvidia.com/gpu"}
    assert {k: v for k, v in resources["limits"].items() if k != "concurrency"} == limits, \
        "all but the GPU, which func.yaml cannot express"
    assert resources["limits"]["concurrency"] == svc["spec"]["template"]["spec"]["containerConcurrency"]
    assert doc["deploy"]["serviceAccountName"] == svc["spec"]["template"]["spec"]["serviceAccountName"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in svc["spec"]["template"]["spec"]["volumes"]}
    for vol in doc["run"]["volumes"]:
        source = volumes[mounts[vol["path"]]]
        assert source.get("configMap", {}).get("name") == vol.get("configMap") or \
            source.get("secret", {}).get("secretName") == vol.get("secret"), vol
    labels = {label["key"]: label["value"] for label in doc["deploy"]["labels"]}
    assert labels.items() <= svc["metadata"]["labels"].items()


def test_the_worker_function_says_what_the_requester_renders_for_a_worker():
    from fma_requester.knative_spec import READINESS_PATH, WorkerTemplate, render_worker_service
    from fma_requester.registry import ModelRegistry

    spec = ModelRegistry.from_text("models:\n  - {name: smollm2-135m-instruct, source: "
                                   "'embedded:smollm2-135m-instruct', knative: {gpus: 0}}\n").get(
        "smollm2-135m-instruct")
    svc = render_worker_service(spec, WorkerTemplate(namespace="fma-example", cpu="2", memory="8Gi"))
    (container,) = svc["spec"]["template"]["spec"]["containers"]
    doc = func_yaml("worker")
    env = {e["name"]: e.get("value") for e in container["env"]}
    for item in doc["run"]["envs"]:
        assert env[item["name"]] == item["value"], item
    assert doc["deploy"]["healthEndpoints"]["readiness"] == READINESS_PATH == \
        container["readinessProbe"]["httpGet"]["path"]
    annotations = svc["spec"]["template"]["metadata"]["annotations"]
    scale = doc["deploy"]["options"]["scale"]
    assert (str(scale["min"]), str(scale["max"])) == (annotations["autoscaling.knative.dev/min-scale"],
                                                      annotations["autoscaling.knative.dev/max-scale"])
    assert doc["deploy"]["options"]["resources"]["requests"] == container["resources"]["requests"]
    labels = {label["key"]: label["value"] for label in doc["deploy"]["labels"]}
    assert labels.items() <= svc["spec"]["template"]["metadata"]["labels"].items()


def test_the_schema_is_funcs_own_unchanged():
    source = (REPO / "tests/data/knative-func-c18d604/SOURCE").read_text()
    assert "c18d6045a1b0cb6c2b411f03082ab9ed20ba90b3" in source
    assert SCHEMA["$ref"] == "#/definitions/Function" and "BuildSpec" in SCHEMA["definitions"]


def differences(copy_dir: Path, source: Path) -> list[str]:
    """Files that differ between a copy of a package and its source (bytecode caches aside)."""
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    ours, theirs = files(copy_dir), files(source)
    _, mismatch, errors = filecmp.cmpfiles(copy_dir, source, sorted(ours & theirs), shallow=False)
    return sorted((ours ^ theirs) | set(mismatch) | set(errors))


def test_both_functions_take_their_shared_code_from_one_build_hook():
    hooks = [(REPO / "functions" / name / "hatch_build.py").read_text() for name in FUNCTIONS]
    assert hooks[0] == hooks[1]
    for name in FUNCTIONS:
        pyproject = (REPO / "functions" / name / "pyproject.toml").read_text()
        assert "[tool.hatch.build.targets.wheel.hooks.custom]" in pyproject
        assert "force-include" not in pyproject and "fma_worker/protocol" not in pyproject, \
            "the hook alone says where fma_common comes from"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_copy_of_the_shared_code_in_a_function_folder_equals_its_source(name: str):
    copied = REPO / "functions" / name / "vendored" / "fma_common"
    assert copied.is_dir(), f"no copy in functions/{name}/vendored: make test makes one (make function-sources)"
    assert differences(copied, REPO / "functions/common/fma_common") == [], \
        f"functions/{name}/vendored/fma_common is stale: run make function-sources before a pack or s2i build"


def test_the_repositorys_own_install_imports_the_shared_code_from_its_source():
    """Not from a function's copy: setuptools' package discovery over functions/* would otherwise map fma_common
    to functions/requester/vendored's copy, and an edit to the source would not be what runs."""
    import fma_common

    assert Path(fma_common.__file__).parent == REPO / "functions/common/fma_common"


def test_make_function_sources_copies_the_shared_code_into_each_folder(tmp_path: Path):
    functions = tmp_path / "functions"
    shutil.copytree(REPO / "functions/common/fma_common", functions / "common/fma_common")
    (functions / "requester").mkdir()
    (functions / "worker/vendored/fma_common").mkdir(parents=True)
    (functions / "worker/vendored/fma_common/removed_since.py").write_text("")  # a stale copy is replaced, not merged
    subprocess.run(["make", "-s", "function-sources", f"FUNCTIONS={functions}"], cwd=REPO, check=True,
                   capture_output=True, timeout=60)
    for name in FUNCTIONS:
        assert differences(functions / name / "vendored/fma_common", REPO / "functions/common/fma_common") == []
    assert (REPO / ".gitignore").read_text().count("/vendored/") >= 2, "the copies are never committed"
    for name in FUNCTIONS:
        # An on-cluster build uploads the folder less what the folder's own .gitignore names (knative/func
        # pkg/pipelines/tekton/pipelines_provider.go sourcesAsTarStream): the copy must not be named there.
        own = REPO / "functions" / name / ".gitignore"
        assert not own.exists() or "vendored" not in own.read_text()
