"""Metrics as Prometheus reads them: promtool on both /metrics after traffic, the scrape objects, the dashboard.

``promtool`` is Debian's ``prometheus`` package (``make test`` installs it; without it these tests fail).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import EMBEDDED, REPO, requester, worker_state

PROMTOOL = shutil.which("promtool")
MONITORING = REPO / "knative" / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # No skip: without promtool these fail and say why.
    assert PROMTOOL is not None, ("promtool is not installed: `make test` installs Debian's prometheus package with "
                                  "tests/system-deps.sh (root and apt-get needed), or `apt-get install prometheus`")
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


def exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def metric_names(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def series_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(fma_[a-z0-9_]+)", expr))


@pytest.mark.process
def test_both_metrics_endpoints_pass_promtool_after_traffic_and_feed_every_dashboard_query(tmp_path: Path,
                                                                                           converted_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', dtype: float32}}\n"
                      f"  - {{name: broken, source: 'path:{tmp_path}'}}\n")
    with requester(tmp_path, models) as req:
        body = {"model": EMBEDDED, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{req.spi}/v1/completions", json=body, timeout=120).status_code == 200
        with httpx.stream("POST", f"{req.spi}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and list(r.iter_lines())
        chat = {"model": EMBEDDED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert httpx.post(f"{req.spi}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        assert httpx.post(f"{req.spi}/v1/completions", json={**body, "model": "nope"}).status_code == 404
        assert httpx.post(f"{req.spi}/v1/completions", json={**body, "model": "broken"}, timeout=60).status_code \
            == 503
        assert httpx.post(f"{req.spi}/v1/workers/{EMBEDDED}/sleep", params={"level": 1}, timeout=60).is_success
        assert httpx.post(f"{req.spi}/v1/completions", json=body, timeout=60).headers["X-FMA-Actuation"] \
            .startswith("wake;")
        worker_url = worker_state(req.spi)["url"]
        texts = {"requester": httpx.get(f"{req.spi}/metrics").text, "worker": httpx.get(f"{worker_url}/metrics").text}
    for name, text in texts.items():
        checked = promtool("check", "metrics", stdin=text)
        assert checked.returncode == 0 and checked.stdout.strip() == "" and checked.stderr.strip() == "", \
            f"{name}: {checked.stdout}{checked.stderr}"
    requester_text = texts["requester"]
    for sample in ('fma_actuation_seconds_count{model="smollm2-135m-instruct",path="cold"} 1.0',
                   'fma_actuation_seconds_count{model="smollm2-135m-instruct",path="wake"} 1.0',
                   'fma_workers{state="ready"} 1.0', 'fma_workers{state="failed"} 1.0',
                   'fma_queue_wait_seconds_count{model="smollm2-135m-instruct"} 4.0'):
        assert sample in requester_text, sample
    assert 'fma_last_time_to_ready_seconds{model="smollm2-135m-instruct",path="wake"}' in requester_text
    served = metric_names(requester_text) | metric_names(texts["worker"])
    # A histogram's series are NAME_bucket/_sum/_count, a counter's NAME_total.
    served |= {f"{n}_{suffix}" for n in served for suffix in ("bucket", "sum", "count", "total")}
    for expr in exprs():
        missing = series_names(expr) - served
        assert not missing, f"the dashboard asks for series nobody serves: {missing} in {expr}"


def test_every_dashboard_query_is_valid_promql():
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"fma:dashboard_query_{i}",
         "expr": e.replace("$__rate_interval", "5m").replace('"$model"', '".*"')} for i, e in enumerate(exprs())]}]}
    path = REPO / "build"
    path.mkdir(exist_ok=True)
    (path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path / "dashboard-rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_shows_what_operators_ask_for():
    titles = " | ".join(p["title"] for p in DASHBOARD["panels"])
    for wanted in ("Actuation latency", "Queue depth", "Rejections", "Tokens per second", "Workers by state"):
        assert wanted in titles
    text = json.dumps(DASHBOARD)
    assert "fma_actuation_seconds_bucket" in text and "by (le, path)" in text
    assert DASHBOARD["templating"]["list"][0]["type"] == "datasource", "no hard-coded datasource uid"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_the_plain_scrape_config_is_a_valid_prometheus_config(tmp_path: Path):
    scrape = yaml.safe_load((MONITORING / "prometheus-scrape.yml").read_text())
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "15s"}, **scrape}))
    checked = promtool("check", "config", "--syntax-only", str(config))
    if "field kubernetes_sd_configs not found" in checked.stdout + checked.stderr:
        # Debian builds Prometheus without the Kubernetes discovery: check everything else (relabelling
        # rules, regexes, intervals) with the discovery swapped for a static target.
        for job in scrape["scrape_configs"]:
            assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
            job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
        config.write_text(yaml.safe_dump({"global": {"scrape_interval": "15s"}, **scrape}))
        checked = promtool("check", "config", "--syntax-only", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    assert set(jobs) == {"fma-requester", "fma-workers"}
    for job in jobs.values():
        keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        assert {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "user-port",
                "action": "keep"} in keep, "the container's port, never the queue-proxy's"


def test_monitors_select_exactly_the_requester_and_worker_pods():
    from test_manifests import by_kind, render

    docs = render("knative/monitoring")
    (svc,) = by_kind(docs, "Service")
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (pods,) = by_kind(docs, "PodMonitor")
    (dashboard,) = by_kind(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["fma-dashboard.json"]) == DASHBOARD
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert svc["spec"]["ports"][0]["targetPort"] == "user-port"
    (requester_ksvc,) = [d for d in render("knative/base") if d["kind"] == "Service"
                         and d["apiVersion"].startswith("serving.knative.dev")]
    pod_labels = requester_ksvc["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items(), "the metrics Service selects the requester pod"
    worker = yaml.safe_load(subprocess.run([str(Path(sys.executable).parent / "fma"), "manifests", EMBEDDED],
                                           capture_output=True, text=True, check=True, cwd=REPO, timeout=60).stdout)
    worker_pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    selector = pods["spec"]["selector"]["matchLabels"]
    assert selector.items() <= worker_pod_labels.items(), "the PodMonitor selects the worker pods"
    assert not selector.items() <= pod_labels.items(), "and not the requester"
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "user-port"
    (example,) = [d for d in render("knative/overlays/examples/fma-requester") if d["kind"] == "Service"
                  and d["apiVersion"].startswith("serving.knative.dev")]
    assert svc["metadata"]["namespace"] == example["metadata"]["namespace"], "beside the example's requester"
