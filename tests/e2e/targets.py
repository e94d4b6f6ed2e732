"""Where the end-to-end suite runs: the simulated cluster here, or a real one.

Both give the tests the same handles and nothing more: a Kubernetes API client
(``kube``: what ``kubectl`` would read and edit), the requester's route
(``url``, with the Secret's API and admin keys), the Broker's ingress
(``broker_url``) and the namespace. The tests never reach into a process.

* :class:`SimTarget` (``make e2e``): the fake API server (tests/kube_fake.py)
  with the requester's own Role enforced on its requests, Knative simulated
  (tests/knative_sim.py: worker pods are real worker processes), the Broker
  simulated (tests/broker_sim.py). "Deploying" applies the rendered overlay and
  knative/eventing to the fake API server, creates the Secret as
  ``make deploy`` does, and plays the kubelet for the requester's and the
  event log's pods: their container's environment resolved from the stored
  Service (values, ``secretKeyRef``, ``fieldRef``, ``$(VAR)``), its ConfigMap
  and Secret volumes as files (kept in sync with later edits, as the kubelet
  does), credentials for its ServiceAccount, and K_SINK / K_CE_OVERRIDES as
  the SinkBinding gives them.
* :class:`RealTarget` (``make e2e KUBECONFIG=... REGISTRY=...``): ``make
  deploy`` with your images into a namespace of its own, ``kubectl
  port-forward`` to the requester's pod and to Eventing's broker-ingress, and
  the deployment deleted afterwards. Not run here (no cluster).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from fma_common.procs import free_port, start_gunicorn, stop_process_group, wait_ready

REPO = Path(__file__).resolve().parents[2]


def _render(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kube_client(kubeconfig: Path) -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


class Target:
    ns: str
    url: str
    broker_url: str
    api_key: str
    admin_key: str
    kubeconfig: Path
    timescale: float  # seconds of cluster time per real second (a simulated cluster runs faster)

    def api(self) -> Any:
        return kube_client(self.kubeconfig)

    def close(self) -> None:
        raise NotImplementedError


# ---- the simulated cluster ------------------------------------------------------------------------------

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class SimTarget(Target):
    def __init__(self, workdir: Path, cache_dir: Path, overlay: str = "knative/overlays/cpu",
                 speed: float = 20.0) -> None:
        self.overlay = overlay
        self.dir = workdir
        self.timescale = speed
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.broker: Any = None
        self.sim: Any = None
        try:
            self._deploy(cache_dir, speed)
        except BaseException:
            self.close()
            raise

    def _deploy(self, cache_dir: Path, speed: float) -> None:
        from broker_sim import SimulatedBroker
        from knative_sim import SimulatedKnative
        from knative_webhook import ClusterConfig
        from kube_fake import FakeKube, load_role

        base = REPO / "knative" / "base"
        self.kube = FakeKube(role=load_role(base / "role.yaml", base / "tokenreview-rbac.yaml",
                                            base / "knative-version-rbac.yaml")).start()
        admin = secrets.token_urlsafe(16)
        self.kube.admin_tokens.add(admin)
        self.kubeconfig = self._kubeconfig("admin", admin)
        flags = yaml.safe_load((REPO / "knative/cluster/config-features.yaml").read_text())["data"]
        self.sim = SimulatedKnative(self.kube, self.dir, cache_dir=cache_dir, default="process", speed=speed,
                                    config=ClusterConfig(features=flags))
        docs = _render(self.overlay)
        eventing = _render("knative/eventing")
        self.ns = next(d["metadata"]["namespace"] for d in docs if d["kind"] == "Service")
        self._apply(docs + eventing)
        log_port = free_port()
        self.log_url = f"http://127.0.0.1:{log_port}"
        self._start("fma_requester.eventlog_conf", "fma_requester.eventlog:create_app()",
                    {**os.environ, "FMA_BIND": f"127.0.0.1:{log_port}"}, "event-log")
        urls: dict[str, str] = {"fma-event-log": self.log_url}
        broker = next(d for d in eventing if d["kind"] == "Broker")
        triggers = [d for d in eventing if d["kind"] == "Trigger"]
        # Eventing's authentication-oidc, as the example runs: each delivery carries its Trigger's token, which
        # the requester checks with a TokenReview against the fake API server.
        self.broker = SimulatedBroker(broker, triggers, lambda dest: urls[dest["ref"]["name"]] + dest.get("uri", ""),
                                      speed=speed, oidc_token=lambda user, audience:
                                      self.kube.issue_token(user, (audience,)))
        self.broker_url = self.broker.url
        self.url = self._start_requester(eventing)
        urls["fma-requester"] = self.url
        # The simulator reconciles worker Services only; these two pods are played here, so their Services'
        # status is written here, as Knative's controllers would once each pod was ready.
        for name, url in (("fma-requester", self.url), ("fma-event-log", self.log_url)):
            self.kube.set_status(self.ns, name, {
                "observedGeneration": 1, "url": f"http://{name}.{self.ns}.svc.cluster.local",
                "address": {"url": url}, "latestCreatedRevisionName": f"{name}-00001",
                "latestReadyRevisionName": f"{name}-00001",
                "conditions": [{"type": t, "status": "True"} for t in ("ConfigurationsReady", "Ready",
                                                                       "RoutesReady")]})

    def _kubeconfig(self, user: str, token: str) -> Path:
        from kube_fake import write_kubeconfig

        return write_kubeconfig(self.dir / f"kubeconfig-{user}", self.kube.url, namespace="fma-example", token=token,
                                user=user)

    def _apply(self, docs: list[dict[str, Any]]) -> None:
        """What `make deploy` applies, as far as the fake API server serves it; and the Secret it creates."""
        keys = {"api-keys": f"fma-{secrets.token_urlsafe(16)}", "admin-keys": f"fma-{secrets.token_urlsafe(16)}",
                "worker-token": f"fma-{secrets.token_urlsafe(16)}"}
        self.api_key, self.admin_key = keys["api-keys"], keys["admin-keys"]
        self.kube.put_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fma-keys",
                                                                                "namespace": self.ns},
                              "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}},
                             plural="secrets")
        for doc in docs:
            kind, api = doc["kind"], doc["apiVersion"]
            if kind == "ConfigMap":
                self.kube.put_object(doc, plural="configmaps")
            elif kind == "Service" and api.startswith("serving.knative.dev"):
                self.kube.put_object(doc)
            elif api.split("/")[0] in ("eventing.knative.dev", "sources.knative.dev"):
                group, plural = api.split("/")[0], kind.lower() + "s"
                self.kube.put_generic(doc, group, plural)
            # RBAC objects are enforced by the fake (its Role is the manifests'); a Namespace, NetworkPolicy and
            # the decode Deployment at 0 have nothing to simulate.

    # ---- the kubelet's part for the two pods played here ---------------------------------------------------

    def _container_env(self, svc: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
        spec = svc["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                value = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
            else:
                ref = item["valueFrom"]
                if "secretKeyRef" in ref:
                    secret = self.kube.get_object(self.ns, ref["secretKeyRef"]["name"], plural="secrets") or {}
                    value = base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]).decode()
                else:
                    path = ref["fieldRef"]["fieldPath"]
                    value = {"spec.nodeName": "sim-node-1", "metadata.namespace": self.ns}.get(path, "")
            # A path inside the container -> where its volume's files are here (the deepest mount that holds it).
            for mount in sorted(mounts, key=len, reverse=True):
                if value == mount or value.startswith(mount.rstrip("/") + "/"):
                    value = str(mounts[mount]) + value[len(mount.rstrip("/")):]
                    break
            env[item["name"]] = value
        return env

    def _mount(self, svc: dict[str, Any], name: str) -> dict[str, Path]:
        spec = svc["spec"]["template"]["spec"]
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for m in container.get("volumeMounts") or []:
            local = self.dir / name / m["mountPath"].strip("/").replace("/", "-")
            local.mkdir(parents=True, exist_ok=True)
            vol = volumes[m["name"]]
            if "configMap" in vol:
                self._write_config(vol["configMap"]["name"], local)
                self.kube.listeners.append(lambda kind, plural, obj, cm=vol["configMap"]["name"], to=local:
                                           self._write_config(cm, to) if plural == "configmaps" and
                                           obj["metadata"]["name"] == cm else None)
            elif "secret" in vol:
                secret = self.kube.get_object(self.ns, vol["secret"]["secretName"], plural="secrets") or {}
                for key, data in (secret.get("data") or {}).items():
                    (local / key).write_bytes(base64.b64decode(data))
            mounts[m["mountPath"]] = local
        return mounts

    def _write_config(self, name: str, folder: Path) -> None:
        cm = self.kube.get_object(self.ns, name, plural="configmaps") or {}
        for key, text in (cm.get("data") or {}).items():
            tmp = folder / f".{key}.tmp"
            tmp.write_text(text)
            tmp.replace(folder / key)  # atomically, as the kubelet swaps its ..data link

    def _start_requester(self, eventing: list[dict[str, Any]]) -> str:
        svc = self.kube.get_object(self.ns, "fma-requester")
        assert svc is not None
        mounts = self._mount(svc, "requester")
        env = self._container_env(svc, mounts)
        binding = next(d for d in eventing if d["kind"] == "SinkBinding")
        import json

        port = free_port()
        env.update({
            # The ServiceAccount's credentials (in a pod: the projected token and in-cluster config).
            "KUBECONFIG": str(self._kubeconfig("fma-requester", "requester-sa-token")),
            "FMA_NAMESPACE": self.ns, "FMA_BIND": f"127.0.0.1:{port}", "PORT": str(port),
            # The SinkBinding's webhook (sinkbinding_lifecycle.go, Do): the Broker's address and the overrides.
            "K_SINK": self.broker_url, "K_CE_OVERRIDES": json.dumps({"extensions": binding["spec"]
                                                                         ["ceOverrides"]["extensions"]}),
            "K_SERVICE": "fma-requester",
        })
        self._start("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", {**os.environ, **env},
                    "requester")
        return f"http://127.0.0.1:{port}"

    def _start(self, conf: str, app: str, env: dict[str, str], name: str) -> None:
        log = self.dir / f"{name}.log"
        proc = start_gunicorn(conf, app, env, log, cwd=REPO)
        self.procs.append((proc, log))
        port = env["FMA_BIND"].rsplit(":", 1)[1]
        wait_ready(f"http://127.0.0.1:{port}", proc, 90, log)

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc, _ in reversed(self.procs):
            stop_process_group(proc, 60)
        for part in (self.broker, self.sim, getattr(self, "kube", None)):
            if part is not None:
                part.stop()


# ---- a real cluster -----------------------------------------------------------------------------------------

class RealTarget(Target):
    """``make deploy`` into ``namespace`` with the images in ``registry``; port-forwards for the routes."""

    def __init__(self, kubeconfig: Path, registry: str, tag: str, overlay: str, namespace: str) -> None:
        self.kubeconfig, self.ns, self.timescale = kubeconfig, namespace, 1.0
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.make = ["make", "-s", f"REGISTRY={registry}", f"TAG={tag}", f"OVERLAY={overlay}",
                     f"NAMESPACE={namespace}"]
        self.forwards: list[subprocess.Popen] = []
        subprocess.run([*self.make, "deploy"], cwd=REPO, env=self.env, check=True, timeout=900)
        self._kubectl("wait", "--for=condition=Ready", "ksvc/fma-requester", "--timeout=600s")
        keys = yaml.safe_load(self._kubectl("get", "secret", "fma-keys", "-o", "yaml"))["data"]
        self.api_key = base64.b64decode(keys["api-keys"]).decode().splitlines()[0]
        self.admin_key = base64.b64decode(keys["admin-keys"]).decode().splitlines()[0]
        pod = self._kubectl("get", "pods", "-l", "serving.knative.dev/service=fma-requester", "-o",
                            "jsonpath={.items[0].metadata.name}").strip()
        self.url = self._forward(["-n", namespace, f"pod/{pod}", ":8080"])
        ingress = self._forward(["-n", "knative-eventing", "svc/broker-ingress", ":80"])
        self.broker_url = f"{ingress}/{namespace}/fma"

    def _kubectl(self, *args: str) -> str:
        return subprocess.run(["kubectl", "-n", self.ns, *args], env=self.env, capture_output=True, text=True,
                              check=True, timeout=900).stdout

    def _forward(self, args: list[str]) -> str:
        proc = subprocess.Popen(["kubectl", "port-forward", *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.forwards.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            if m:
                threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
                return f"http://127.0.0.1:{m.group(1)}"
        raise RuntimeError(f"kubectl port-forward {' '.join(args)} did not start")

    def close(self) -> None:
        for proc in self.forwards:
            proc.terminate()
        subprocess.run(["kubectl", "-n", self.ns, "delete", "ksvc", "-l", "app.kubernetes.io/managed-by=fma-requester",
                        "--wait=true"], env=self.env, timeout=600, check=False)
        rendered = subprocess.run([*self.make, "deploy-manifests"], cwd=REPO, env=self.env, capture_output=True,
                                  text=True, timeout=300).stdout
        subprocess.run(["kubectl", "delete", "--ignore-not-found", "-f", "-"], input=rendered, text=True,
                       env=self.env, timeout=600, check=False)


def make_target(workdir: Path, cache_dir: Path | None) -> Target:
    """A real cluster when E2E_REGISTRY (make e2e REGISTRY=...) and a kubeconfig are given, else the simulated one."""
    registry = os.environ.get("E2E_REGISTRY")
    if registry:
        kubeconfig = Path(os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config")
        if not shutil.which("kubectl") or not kubeconfig.is_file():
            raise RuntimeError(f"E2E_REGISTRY is set but there is no kubectl or kubeconfig ({kubeconfig})")
        return RealTarget(kubeconfig, registry, os.environ.get("E2E_TAG", "latest"),
                          os.environ.get("E2E_OVERLAY", "knative/overlays/cpu"),
                          os.environ.get("E2E_NAMESPACE", "fma-e2e"))
    assert cache_dir is not None
    return SimTarget(workdir, cache_dir)
