"""The ``fma`` command (also installed as ``kn-fma``, so ``kn fma ...`` works).

Server commands exec gunicorn with the checked-in configuration; client
commands talk HTTP to ``--url`` (env ``FMA_URL``, default
``http://localhost:8081``). Nothing heavy is imported until a command needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "http://localhost:8081"


def _exec_gunicorn(config_module: str, app: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    argv = [sys.executable, "-m", "gunicorn", "-c", f"python:{config_module}", app]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def cmd_worker(args: argparse.Namespace) -> int:
    env = {"FMA_MODEL": args.model}
    if args.source:
        env["FMA_MODEL_SOURCE"] = args.source
    if args.port:
        env["PORT"] = str(args.port)
    if args.host:
        env["FMA_HOST"] = args.host
    if args.device:
        env["FMA_DEVICE"] = args.device
    if args.dtype:
        env["FMA_DTYPE"] = args.dtype
    # Validate before exec so a typo is one clear line, not a gunicorn traceback.
    from fma_common.settings import SettingsError
    from fma_worker.settings import WorkerSettings

    try:
        WorkerSettings.from_env({**os.environ, **env})
    except SettingsError as exc:
        print(f"fma worker: {exc}", file=sys.stderr)
        return 2
    _exec_gunicorn("fma_worker.gunicorn_conf", "fma_worker.app:create_app()", env)
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    env: dict[str, str] = {}
    if args.bind:
        env["FMA_BIND"] = ",".join(args.bind)
    if args.models:
        env["FMA_MODELS"] = args.models
    if args.actuator:
        env["FMA_ACTUATOR"] = args.actuator
    from fma_common.settings import SettingsError
    from fma_requester.registry import ModelRegistry
    from fma_requester.settings import RequesterSettings

    try:
        settings = RequesterSettings.from_env({**os.environ, **env})
        registry = ModelRegistry.load(settings.models_file)
    except SettingsError as exc:
        print(f"fma serve: {exc}", file=sys.stderr)
        return 2
    first = settings.binds[-1].replace("0.0.0.0", "localhost")
    print(f"fma serve: requester on {', '.join('http://' + b for b in settings.binds)}", file=sys.stderr)
    print(f"fma serve: models: {', '.join(registry.names())}", file=sys.stderr)
    print("fma serve: try\n"
          f"  curl -X POST http://{first}/v1/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{registry.names()[0]}\", \"prompt\": \"Hello, world!\", \"max_tokens\": 50}}'",
          file=sys.stderr)
    _exec_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", env)
    return 0  # not reached


def _example_file(name: str) -> str | None:
    """``knative/base/NAME`` of the deployed example, from a source checkout (the current folder or ours)."""
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / "knative" / "base" / name
        if candidate.is_file():
            return str(candidate)
    return None


def cmd_manifests(args: argparse.Namespace) -> int:
    """Print the worker Services the deployed requester would create (no cluster access)."""
    import yaml

    from fma_common.settings import SettingsError
    from fma_requester.knative import KnativeSettings, check_models
    from fma_requester.knative_spec import render_worker_service
    from fma_requester.registry import ModelRegistry

    models = args.models or os.environ.get("FMA_MODELS") or _example_file("models.yaml")
    template = args.worker_template or os.environ.get("FMA_WORKER_TEMPLATE") or _example_file("worker-template.yaml")
    env = {**os.environ, **({"FMA_NAMESPACE": args.namespace} if args.namespace else {}),
           **({"FMA_WORKER_TEMPLATE": template} if template else {})}
    try:
        registry = ModelRegistry.load(models)
        kn = KnativeSettings.from_env(env)
        check_models(registry, kn)
    except SettingsError as exc:
        print(f"fma manifests: {exc}", file=sys.stderr)
        return 2
    print(f"fma manifests: models from {registry.origin}; worker template from {template or 'the built-in defaults'}",
          file=sys.stderr)
    names = [args.model] if args.model else registry.names()
    docs = []
    for name in names:
        spec = registry.get(name)
        if spec is None:
            print(f"fma manifests: model {name!r} is not configured; configured: {', '.join(registry.names())}",
                  file=sys.stderr)
            return 2
        # The owner reference (the requester's uid) and, for shared GPUs, the
        # requester's node and GPU UUIDs are only known inside the cluster.
        assert kn.template is not None
        docs.append(render_worker_service(spec, kn.template, node_name=kn.node_name))
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert an embedded model into the cache now, with progress on stderr."""
    from fma_worker.model_store import EMBEDDED_MODELS, default_cache_dir, ensure_embedded_converted

    if args.model not in EMBEDDED_MODELS:
        print(f"fma prepare: {args.model!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)})",
              file=sys.stderr)
        return 2
    folder = ensure_embedded_converted(args.model, args.dtype, default_cache_dir(),
                                       progress=lambda msg: print(f"fma prepare: {msg}", file=sys.stderr))
    print(folder)
    return 0


def cmd_model_path(args: argparse.Namespace) -> int:
    """Print the converted folder of an embedded model (it may not exist yet)."""
    from fma_worker.model_store import default_cache_dir, embedded_cache_dir, is_converted

    folder = embedded_cache_dir(args.model, args.dtype, default_cache_dir())
    print(folder)
    if not is_converted(folder):
        print("(not converted yet: run `fma prepare`)", file=sys.stderr)
    return 0


def cmd_event_log(args: argparse.Namespace) -> int:
    from fma_common.settings import SettingsError
    from fma_requester.eventlog import EventLogSettings

    try:
        settings = EventLogSettings.from_env()
    except SettingsError as exc:
        print(f"fma event-log: {exc}", file=sys.stderr)
        return 2
    print(f"fma event-log: on http://{settings.address()} (POST /, POST /dead-letter, GET /events)", file=sys.stderr)
    _exec_gunicorn("fma_requester.eventlog_conf", "fma_requester.eventlog:create_app()", {})
    return 0  # not reached


def cmd_settings(args: argparse.Namespace) -> int:
    """Every setting of a service: variable, default, meaning (the README's tables are this output)."""
    from fma_cli.docs import settings_classes
    from fma_common.settings import SettingsError, describe, markdown_table

    cls = settings_classes()[args.service]
    if args.markdown:
        print(markdown_table(cls), end="")
        return 0
    try:
        current = describe(cls.from_env())
    except SettingsError as exc:
        print(f"fma settings: {exc}", file=sys.stderr)
        return 2
    names = cls.env_names()
    for field, value in current.items():
        if field in names and (cls.model_fields[field].json_schema_extra or {}):
            print(f"{names[field]}={'' if value is None else value}")
    return 0


# ---- client commands --------------------------------------------------------

def _client(args: argparse.Namespace) -> Any:
    import httpx

    return httpx.Client(base_url=args.url.rstrip("/"), timeout=httpx.Timeout(args.timeout, connect=5.0))


def _show_error(resp: Any) -> int:
    try:
        err = resp.json()["error"]
        print(f"error {resp.status_code} ({err.get('code')}): {err.get('message')}", file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(f"error {resp.status_code}: {resp.text[:500]}", file=sys.stderr)
    return 1


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.get("/v1/models")
    if resp.status_code != 200:
        return _show_error(resp)
    print(json.dumps(resp.json(), indent=2))
    return 0


def _print_or_error(resp: Any) -> int:
    if resp.status_code != 200:
        return _show_error(resp)
    print(json.dumps(resp.json(), indent=2))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.get("/v1/workers")
    if resp.status_code != 200:
        return _show_error(resp)
    rows = resp.json()["data"]
    print(f"{'MODEL':40} {'STATE':9} {'IN-FLIGHT':>9} {'QUEUED':>6}  LAST ACTUATION")
    for w in rows:
        act = w.get("last_actuation")
        last = f"{act['path']} {act['seconds']:.2f}s" if act else "-"
        state = w["state"] if w.get("phase", w["state"]) == w["state"] else f"{w['state']} ({w['phase']})"
        print(f"{w['model']:40} {state:9} {w['in_flight']:>9} {w['queued']:>6}  {last}"
              + (f"  error: {w['error'][:80]}" if w.get("error") else ""))
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_or_error(client.post(f"/v1/workers/{args.model}/warm"))


def cmd_sleep(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_or_error(client.post(f"/v1/workers/{args.model}/sleep", params={"level": args.level}))


def cmd_release(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_or_error(client.delete(f"/v1/workers/{args.model}"))


def cmd_complete(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens,
                            "temperature": args.temperature}
    if args.seed is not None:
        body["seed"] = args.seed
    with _client(args) as client:
        if not args.stream:
            resp = client.post("/v1/completions", json=body)
            if resp.status_code != 200:
                return _show_error(resp)
            print(resp.json()["choices"][0]["text"])
            return 0
        body["stream"] = True
        with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                return _show_error(resp)
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    print(f"\nerror: {event['error'].get('message')}", file=sys.stderr)
                    return 1
                for choice in event.get("choices", []):
                    sys.stdout.write(choice.get("text", ""))
                    sys.stdout.flush()
        print()
    return 0


def build_parser(prog: str = "fma") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Fast model actuation: serverless LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the requester (local actuator by default): the main job")
    p.add_argument("--bind", action="append", help="HOST:PORT, repeatable (default 127.0.0.1:8080 and :8081)")
    p.add_argument("--models", help="models YAML file (default: the built-in embedded model)")
    p.add_argument("--actuator", choices=["local", "knative"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("event-log", help="log the CloudEvents sent to it (the Broker's dead letters, lifecycle "
                                         "events): the example's event-display")
    p.set_defaults(func=cmd_event_log)

    p = sub.add_parser("worker", help="serve one model (OpenAI API + vLLM-style sleep API)")
    p.add_argument("--model", default=os.environ.get("FMA_MODEL", "smollm2-135m-instruct"))
    p.add_argument("--source", help="embedded:NAME, hf:ORG/NAME or path:/folder")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("manifests", help="print the worker Knative Service YAML for a model (or all)")
    p.add_argument("model", nargs="?")
    p.add_argument("--models", help="models YAML file (default: FMA_MODELS, else knative/base/models.yaml, else the "
                                    "built-in default)")
    p.add_argument("--worker-template", help="worker template YAML (default: FMA_WORKER_TEMPLATE, else "
                                             "knative/base/worker-template.yaml)")
    p.add_argument("--namespace")
    p.set_defaults(func=cmd_manifests)

    p = sub.add_parser("prepare", help="convert an embedded model into the cache now")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("model-path", help="print the folder of a converted embedded model")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_model_path)

    p = sub.add_parser("settings", help="list a service's settings (what it would use now, or --markdown)")
    p.add_argument("service", nargs="?", choices=["requester", "worker", "knative", "eventlog"],
                   default="requester")
    p.add_argument("--markdown", action="store_true", help="the table of variables, defaults and meanings")
    p.set_defaults(func=cmd_settings)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("FMA_URL", DEFAULT_URL))
        p.add_argument("--timeout", type=float, default=600.0, help="seconds (cold starts can be slow)")

    p = sub.add_parser("models", help="list the served models")
    client_args(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("workers", help="show every model's worker state")
    client_args(p)
    p.set_defaults(func=cmd_workers)

    for name, func, text in (("warm", cmd_warm, "start (or wake) a model's worker now"),
                             ("release", cmd_release, "scale a model's worker to zero now")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        client_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("sleep", help="put a model's worker to sleep")
    p.add_argument("model")
    p.add_argument("--level", type=int, choices=[1, 2], default=1)
    client_args(p)
    p.set_defaults(func=cmd_sleep)

    p = sub.add_parser("complete", help="send one completion")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    client_args(p)
    p.set_defaults(func=cmd_complete)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    prog = "kn fma" if os.path.basename(sys.argv[0]).startswith("kn-") else "fma"
    args = build_parser(prog).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a CLI prints one line, not a traceback, for expected failures
        import httpx

        if isinstance(exc, httpx.HTTPError):
            print(f"{prog}: cannot reach {getattr(args, 'url', '?')}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
