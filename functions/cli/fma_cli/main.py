"""The ``fma`` command (also installed as ``kn-fma``, so ``kn fma ...`` works).

Built on click: it is already in every install (Flask depends on it), starts
fast, and gives nested help, shell completion and a test runner without
another layer (typer would add rich and a second way to declare options).

Server commands exec gunicorn with the checked-in configuration; client
commands talk HTTP to the requester (see :mod:`fma_cli.client` for where it
is found). Nothing heavy is imported until a command needs it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
from click.core import ParameterSource

from .client import (
    EXIT_HTTP_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    RequesterClient,
    resolve,
)
from .render import (
    OUTPUTS,
    dump,
    models_table,
    paint,
    progress_line,
    seconds,
    state_text,
    use_colour,
    workers_table,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FmaGroup(click.Group):
    """Expected failures end as one line on stderr and a documented exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as exc:
            click.echo(f"{ctx.find_root().info_name}: {exc}", err=True)
            ctx.exit(exc.code)
        except KeyboardInterrupt:
            ctx.exit(130)


def _kn_plugin(ctx: click.Context) -> bool:
    return (ctx.find_root().info_name or "").startswith("kn")


@click.group(cls=FmaGroup, context_settings=CONTEXT)
@click.version_option(package_name="fma", prog_name="fma")
def cli() -> None:
    """Fast model actuation: serverless LLM serving with scale to zero.

    \b
    Run the requester here:        fma serve
    Ask it for a completion:       fma complete smollm2-135m-instruct "Hello" --stream
    See every model's worker:      fma workers
    On Knative, as a kn plugin:    kn fma workers -n fma-example

    Client commands find the requester with --url (env FMA_URL); as `kn fma`, or given
    --namespace, with no URL they read the fma-requester Knative Service's URL from the
    cluster in your kubeconfig; else http://localhost:8081.

    \b
    Exit codes: 0 success, 1 the requester answered an error, 2 bad usage or settings,
    3 requester unreachable, 4 unknown model.
    """


# ---- client plumbing ----------------------------------------------------------------


def client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--url", envvar="FMA_URL", metavar="URL",
                     help="the requester [env FMA_URL; default: the cluster's fma-requester as `kn fma`, "
                          "else http://localhost:8081]"),
        click.option("-n", "--namespace", metavar="NS",
                     help="find the requester in this namespace of the kubeconfig's cluster"),
        click.option("--api-key", envvar="FMA_API_KEY", metavar="KEY", show_envvar=True,
                     help="sent as `Authorization: Bearer KEY` when the requester has API keys"),
        click.option("--timeout", type=float, default=600.0, show_default=True,
                     help="seconds to wait for an answer (a cold start can take minutes on a cluster)"),
    ]
    for option in reversed(options):  # decorators apply inside out; --help lists them in this order
        f = option(f)
    return f


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-o", "--output", type=click.Choice(OUTPUTS), default="table", show_default=True,
                        help="table for people; json or yaml (the API's own objects) for scripts")(f)


def connect(ctx: click.Context, url: str | None, namespace: str | None, api_key: str | None,
            timeout: float) -> RequesterClient:
    given = url if ctx.get_parameter_source("url") in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT) \
        else None
    target = resolve(given, namespace, _kn_plugin(ctx), {} if given else os.environ)
    if not target.explicit and target.how != "the default":
        click.echo(f"{ctx.find_root().info_name}: using {target.url} ({target.how})", err=True)
    return RequesterClient(target, timeout=timeout, api_key=api_key)


def complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of model names: asks the requester quickly, offers nothing if it is not there."""
    import httpx

    url = ctx.params.get("url") or os.environ.get("FMA_URL") or "http://localhost:8081"
    try:
        names = [m["id"] for m in httpx.get(f"{url.rstrip('/')}/v1/models", timeout=1.0).json()["data"]]
    except Exception:
        return []
    return [n for n in names if n.startswith(incomplete)]


MODEL = click.argument("model", shell_complete=complete_model)


# ---- client commands -------------------------------------------------------------------


@cli.group(context_settings=CONTEXT, invoke_without_command=True)
@client_options
@output_option
@click.pass_context
def models(ctx: click.Context, url: str | None, namespace: str | None, api_key: str | None, timeout: float,
           output: str) -> None:
    """List the served models: kind, worker state, whether the model cache holds them.

    \b
    Examples:
      fma models
      fma models -o json | jq -r '.data[].id'
      fma models pull qwen3
    """
    if ctx.invoked_subcommand is not None:
        return
    with connect(ctx, url, namespace, api_key, timeout) as client:
        data = client.json("GET", "/v1/models")
    click.echo(models_table(data["data"], use_colour()) if output == "table" else dump(data, output))


@models.command("pull", context_settings=CONTEXT)
@MODEL
@client_options
@click.pass_context
def models_pull(ctx: click.Context, model: str, url: str | None, namespace: str | None, api_key: str | None,
                timeout: float) -> None:
    """Fetch a hub model into the model cache now, so its first cold start downloads nothing.

    Asks the hub what the model's revision points at now and fetches that commit if the cache does not hold
    it; every file is checked against the hub's listing. Needs an admin key where the requester has keys.

    \b
    Examples:
      fma models pull gpt2
      kn fma models pull gpt2 -n fma-example
    """
    import json

    import httpx

    with connect(ctx, url, namespace, api_key, timeout) as client:
        result = None
        try:
            with client.http.stream("POST", f"/v1/models/{model}/pull", timeout=httpx.Timeout(timeout, connect=5.0,
                                                                                               read=None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise client.error(resp, model)
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if "message" in item:
                        click.echo(item["message"], err=True)
                    else:
                        result = item
        except httpx.HTTPError as exc:
            raise CliError(f"the pull stopped: {exc}", EXIT_UNREACHABLE) from exc
    if result is None or "error" in result:
        raise CliError(result["error"] if result else "the requester ended the pull without a result",
                       EXIT_HTTP_ERROR)
    click.echo(f"{result['model']}: {result['files']} files, {result['bytes'] / 1e6:.1f} MB at commit "
               f"{result['commit'][:12]}, in the model cache")


@cli.command(context_settings=CONTEXT)
@client_options
@output_option
@click.option("-w", "--watch", is_flag=True, help="refresh until interrupted (Ctrl-C)")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="seconds between refreshes with --watch")
@click.pass_context
def workers(ctx: click.Context, url: str | None, namespace: str | None, api_key: str | None, timeout: float,
            output: str, watch: bool, interval: float) -> None:
    """Show every model's worker: state, in-flight and queued requests, last actuation, idle time left.

    \b
    Examples:
      fma workers
      fma workers --watch
      fma workers -o yaml
      kn fma workers -n fma-example
    """
    with connect(ctx, url, namespace, api_key, timeout) as client:
        if not watch:
            data = client.json("GET", "/v1/workers")
            click.echo(_render_workers(data, output))
            return
        _watch(client, output, interval)


def _render_workers(data: dict[str, Any], output: str, colour: bool | None = None) -> str:
    if output != "table":
        return dump(data, output)
    return workers_table(data["data"], time.time(), use_colour() if colour is None else colour)


def _watch(client: RequesterClient, output: str, interval: float) -> None:
    terminal = sys.stdout.isatty()
    last = None
    try:
        while True:
            data = client.json("GET", "/v1/workers")
            text = _render_workers(data, output)
            if terminal:
                click.clear()
                click.echo(f"Every {interval:g}s: {client.target.url}   {time.strftime('%H:%M:%S')}\n")
                click.echo(text)
            elif text != last:  # piped: a new block only when something changed
                click.echo(("\n" if last is not None else "") + f"# {time.strftime('%H:%M:%S')}\n{text}")
            last = text
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # the way to stop a watch: not an error


@cli.command(context_settings=CONTEXT)
@MODEL
@click.option("--level", type=click.Choice(("awake", "sleep1", "sleep2")), default="awake", show_default=True,
              help="awake; or load it and then put it to sleep at level 1 or 2, so a later request only wakes it")
@client_options
@output_option
@click.pass_context
def warm(ctx: click.Context, model: str, level: str, url: str | None, namespace: str | None,
         api_key: str | None, timeout: float, output: str) -> None:
    """Start (or wake) MODEL's worker now and wait until it can serve.

    Progress goes to stderr: a spinner with the elapsed time and the worker's state on a
    terminal, a line per change otherwise. Exits non-zero with the reason if it fails.

    \b
    Examples:
      fma warm smollm2-135m-instruct
      fma warm smollm2-135m-instruct -o json
      fma warm smollm2-135m-instruct --level sleep1    # prewarm: a later request wakes it in ~0.1 s
    """
    with connect(ctx, url, namespace, api_key, timeout) as client:
        status = _warm_with_progress(client, model, sys.stderr.isatty() and os.environ.get("TERM") != "dumb",
                                     level)
    if output != "table":
        click.echo(dump(status, output))
        return
    act = status.get("last_actuation")
    how = f" ({act['path']} {seconds(act['seconds'])})" if act else ""
    click.echo(f"{model}: {paint(state_text(status), 'green', use_colour())}{how}")


_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def _warm_with_progress(client: RequesterClient, model: str, terminal: bool, level: str = "awake") \
        -> dict[str, Any]:
    """POST warm on one thread; poll the worker's status on this one, and show it."""
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["status"] = client.json("POST", f"/v1/workers/{model}/warm", model=model,
                                            params={"level": level} if level != "awake" else None)
        except CliError as exc:
            outcome["error"] = exc

    asker = threading.Thread(target=ask, name="fma-warm", daemon=True)
    started = time.monotonic()
    asker.start()
    poller = RequesterClient(client.target, timeout=5.0, api_key=client.api_key)
    shown, current, frame, next_poll = None, None, 0, 0.0
    try:
        while asker.is_alive():
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 0.25
                try:
                    current = poller.json("GET", f"/v1/workers/{model}", model=model)
                except CliError:
                    pass  # the warm call itself reports the real failure
            line = progress_line(model, current, now - started)
            if terminal:
                click.echo(f"\r\x1b[2K{_SPINNER[frame % len(_SPINNER)]} {line}", err=True, nl=False)
                frame += 1
            else:
                key = (current or {}).get("phase"), (current or {}).get("detail")
                if key != shown:
                    click.echo(line, err=True)
                    shown = key
            asker.join(0.1)
    finally:
        poller.__exit__()
        if terminal:
            click.echo("\r\x1b[2K", err=True, nl=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["status"]


@cli.command(context_settings=CONTEXT)
@MODEL
@click.option("--level", type=click.IntRange(1, 2), default=1, show_default=True,
              help="1: weights to host memory (fast wake); 2: weights dropped (memory freed, reloaded on wake)")
@client_options
@output_option
@click.pass_context
def sleep(ctx: click.Context, model: str, level: int, url: str | None, namespace: str | None, api_key: str | None,
          timeout: float, output: str) -> None:
    """Put MODEL's worker to sleep: it keeps its process, frees the accelerator.

    \b
    Examples:
      fma sleep smollm2-135m-instruct
      fma sleep smollm2-135m-instruct --level 2
    """
    with connect(ctx, url, namespace, api_key, timeout) as client:
        status = client.json("POST", f"/v1/workers/{model}/sleep", model=model, params={"level": level})
    click.echo(dump(status, output) if output != "table" else f"{model}: {state_text(status)} (level {level})")


@cli.command(context_settings=CONTEXT)
@MODEL
@client_options
@output_option
@click.pass_context
def release(ctx: click.Context, model: str, url: str | None, namespace: str | None, api_key: str | None,
            timeout: float, output: str) -> None:
    """Scale MODEL's worker to zero now.

    \b
    Examples:
      fma release smollm2-135m-instruct
    """
    with connect(ctx, url, namespace, api_key, timeout) as client:
        status = client.json("DELETE", f"/v1/workers/{model}", model=model)
    click.echo(dump(status, output) if output != "table" else f"{model}: {state_text(status)}")


@cli.command(context_settings=CONTEXT)
@MODEL
@click.argument("prompt")
@click.option("--stream", is_flag=True, help="print tokens as they arrive")
@click.option("--chat", is_flag=True, help="send PROMPT as a user message to /v1/chat/completions")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True)
@click.option("--seed", type=int)
@client_options
@click.option("-o", "--output", type=click.Choice(("text", "json")), default="text", show_default=True,
              help="the text alone, or the whole response object (not with --stream)")
@click.pass_context
def complete(ctx: click.Context, model: str, prompt: str, stream: bool, chat: bool, max_tokens: int,
             temperature: float, seed: int | None, url: str | None, namespace: str | None, api_key: str | None,
             timeout: float, output: str) -> None:
    """Send one completion of PROMPT to MODEL (starting its worker if needed).

    \b
    Examples:
      fma complete smollm2-135m-instruct "Once upon a time" --stream
      fma complete smollm2-135m-instruct "What is 2+2?" --chat --max-tokens 16
    """
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if seed is not None:
        body["seed"] = seed
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with connect(ctx, url, namespace, api_key, timeout) as client:
        if not stream:
            data = client.json("POST", path, model=model, json=body)
            if output == "json":
                click.echo(dump(data, "json"))
            else:
                choice = data["choices"][0]
                click.echo(choice["message"]["content"] if chat else choice["text"])
            return
        _stream(client, path, {**body, "stream": True}, model, chat)


@cli.command(context_settings=CONTEXT)
@MODEL
@click.argument("texts", nargs=-1, required=True)
@client_options
@click.option("-o", "--output", type=click.Choice(("table", "json")), default="table", show_default=True,
              help="one line per text (its dimensions and first values), or the whole response object")
@click.pass_context
def embed(ctx: click.Context, model: str, texts: tuple[str, ...], url: str | None, namespace: str | None,
          api_key: str | None, timeout: float, output: str) -> None:
    """Embed each of TEXTS with MODEL, a model of kind embedding (starting its worker if needed).

    \b
    Examples:
      fma embed all-minilm-l6-v2 "The cat sat on the mat." "A dog slept on the rug."
      fma embed all-minilm-l6-v2 "hello" -o json | jq '.data[0].embedding | length'
    """
    body = {"model": model, "input": list(texts)}
    with connect(ctx, url, namespace, api_key, timeout) as client:
        data = client.json("POST", "/v1/embeddings", model=model, json=body)
    if output == "json":
        click.echo(dump(data, "json"))
        return
    for item, text in zip(data["data"], texts, strict=True):
        vector = item["embedding"]
        head = ", ".join(f"{v:.4f}" for v in vector[:4])
        click.echo(f"{len(vector)} dims  [{head}, ...]  {text[:60]}")
    click.echo(f"{data['usage']['prompt_tokens']} tokens, model {data['model']}")


def _stream(client: RequesterClient, path: str, body: dict[str, Any], model: str, chat: bool) -> None:
    import json

    import httpx

    try:
        with client.http.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                raise client.error(resp, model)
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue  # keepalive comments and blank separators
                data = line[len("data: "):]
                if data == "[DONE]":
                    click.echo()
                    return
                event = json.loads(data)
                if "error" in event:
                    click.echo()
                    raise CliError(f"the stream failed: {event['error'].get('message')}", EXIT_HTTP_ERROR)
                for choice in event.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        click.echo(text, nl=False)
                        sys.stdout.flush()
    except httpx.HTTPError as exc:
        raise CliError(f"the stream from {client.target.url} broke off: {exc}", EXIT_HTTP_ERROR) from exc
    raise CliError("the stream ended without [DONE]: the answer may be cut short", EXIT_HTTP_ERROR)


@cli.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(("bash", "zsh", "fish")))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    Examples:
      eval "$(fma completion bash)"                 # in ~/.bashrc
      fma completion zsh > "${fpath[1]}/_fma"
      fma completion fish > ~/.config/fish/completions/fma.fish
    """
    from click.shell_completion import get_completion_class

    prog = ctx.find_root().info_name or "fma"
    var = f"_{prog.replace('-', '_').replace(' ', '_').upper()}_COMPLETE"
    cls = get_completion_class(shell)
    assert cls is not None  # the choice above lists only shells click knows
    click.echo(cls(cli, {}, prog.replace(" ", "-"), var).source())


# ---- server and tooling commands -------------------------------------------------------


def _exec_gunicorn(config_module: str, app: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    argv = [sys.executable, "-m", "gunicorn", "-c", f"python:{config_module}", app]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


@cli.command(context_settings=CONTEXT)
@click.option("--bind", multiple=True, metavar="HOST:PORT",
              help="repeatable (env FMA_BIND, comma-separated; default 127.0.0.1:8080 and 127.0.0.1:8081)")
@click.option("--models", "models_file", metavar="FILE", help="models YAML file (default: the built-in embedded "
                                                                "model) [env FMA_MODELS]")
@click.option("--actuator", type=click.Choice(("local", "knative")), help="[env FMA_ACTUATOR; default local]")
@click.option("--certfile", metavar="PEM", help="serve HTTPS with this certificate [env FMA_TLS_CERTFILE]")
@click.option("--keyfile", metavar="PEM", help="the certificate's private key [env FMA_TLS_KEYFILE]")
def serve(bind: Sequence[str], models_file: str | None, actuator: str | None, certfile: str | None,
          keyfile: str | None) -> None:
    """Run the requester: the main job. Workers start on the first request.

    \b
    Examples:
      fma serve
      fma serve --bind 0.0.0.0:8081 --models models.yaml
      fma serve --bind 0.0.0.0:8443 --certfile server.pem --keyfile server-key.pem
    Every setting: `fma settings requester`.
    """
    env: dict[str, str] = {}
    if certfile:
        env["FMA_TLS_CERTFILE"] = certfile
    if keyfile:
        env["FMA_TLS_KEYFILE"] = keyfile
    if bind:
        env["FMA_BIND"] = ",".join(bind)
    if models_file:
        env["FMA_MODELS"] = models_file
    if actuator:
        env["FMA_ACTUATOR"] = actuator
    from fma_common.settings import SettingsError
    from fma_requester.registry import ModelRegistry
    from fma_requester.settings import RequesterSettings

    try:
        settings = RequesterSettings.from_env({**os.environ, **env})
        registry = ModelRegistry.load(settings.models_file)
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    first = settings.binds[-1].replace("0.0.0.0", "localhost")
    scheme = "https" if settings.tls_certfile else "http"
    say = lambda text: click.echo(f"fma serve: {text}", err=True)  # noqa: E731
    say(f"requester on {', '.join(f'{scheme}://{b}' for b in settings.binds)}")
    say(f"models: {', '.join(registry.names())}")
    say(f"status page: {scheme}://{first}/ui")
    say("try\n"
        f"  curl -X POST {scheme}://{first}/v1/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{registry.names()[0]}\", \"prompt\": \"Hello, world!\", \"max_tokens\": 50}}'")
    _exec_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", env)


@cli.command("event-log", context_settings=CONTEXT)
def event_log() -> None:
    """Log the CloudEvents sent to it (the Broker's dead letters, lifecycle events).

    The example's event-display: POST / and POST /dead-letter take events, GET /events
    lists the recent ones. Settings: `fma settings eventlog`.

    \b
    Examples:
      fma event-log
      PORT=8090 FMA_EVENTLOG_DATA=true fma event-log
    """
    from fma_common.settings import SettingsError
    from fma_requester.eventlog import EventLogSettings

    try:
        settings = EventLogSettings.from_env()
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    click.echo(f"fma event-log: on http://{settings.address()} (POST /, POST /dead-letter, GET /events)", err=True)
    _exec_gunicorn("fma_requester.eventlog_conf", "fma_requester.eventlog:create_app()", {})


@cli.command(context_settings=CONTEXT)
@click.option("--model", default=lambda: os.environ.get("FMA_MODEL", "smollm2-135m-instruct"), show_default=True,
              help="the served model name [env FMA_MODEL]")
@click.option("--source", help="embedded:NAME, hf:ORG/NAME or path:/folder [env FMA_MODEL_SOURCE]")
@click.option("--port", type=click.IntRange(1, 65535), help="[env PORT; default 8000]")
@click.option("--host", help="[env FMA_HOST]")
@click.option("--device", help="cpu, cuda, cuda:N or auto [env FMA_DEVICE]")
@click.option("--dtype", help="float32, bfloat16, float16 or auto [env FMA_DTYPE]")
def worker(model: str, source: str | None, port: int | None, host: str | None, device: str | None,
           dtype: str | None) -> None:
    """Serve one model: the OpenAI API and the vLLM-style sleep API.

    \b
    Examples:
      fma worker --model smollm2-135m-instruct --port 8000
      fma worker --model my-model --source path:/models/my-model --device cuda
    Every setting: `fma settings worker`.
    """
    env = {"FMA_MODEL": model}
    for key, value in (("FMA_MODEL_SOURCE", source), ("PORT", port), ("FMA_HOST", host), ("FMA_DEVICE", device),
                       ("FMA_DTYPE", dtype)):
        if value:
            env[key] = str(value)
    # Validate before exec so a typo is one clear line, not a gunicorn traceback.
    from fma_common.settings import SettingsError
    from fma_worker.settings import WorkerSettings

    try:
        WorkerSettings.from_env({**os.environ, **env})
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    _exec_gunicorn("fma_worker.gunicorn_conf", "fma_worker.app:create_app()", env)


def _example_file(name: str) -> str | None:
    """``knative/base/NAME`` of the deployed example, from a source checkout (the current folder or ours)."""
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / "knative" / "base" / name
        if candidate.is_file():
            return str(candidate)
    return None


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--models", "models_file", metavar="FILE",
              help="models YAML file (default: FMA_MODELS, else knative/base/models.yaml, else the built-in default)")
@click.option("--worker-template", metavar="FILE",
              help="worker template YAML (default: FMA_WORKER_TEMPLATE, else knative/base/worker-template.yaml)")
@click.option("-n", "--namespace", metavar="NS")
def manifests(model: str | None, models_file: str | None, worker_template: str | None,
              namespace: str | None) -> None:
    """Print the worker Knative Services the deployed requester would create (no cluster access).

    \b
    Examples:
      fma manifests
      fma manifests smollm2-135m-instruct -n llm | kubectl apply --dry-run=server -f -
    """
    import yaml

    from fma_common.settings import SettingsError
    from fma_requester.knative import KnativeSettings, check_models
    from fma_requester.knative_spec import render_worker_service
    from fma_requester.registry import ModelRegistry

    models_path = models_file or os.environ.get("FMA_MODELS") or _example_file("models.yaml")
    template = worker_template or os.environ.get("FMA_WORKER_TEMPLATE") or _example_file("worker-template.yaml")
    env = {**os.environ, **({"FMA_NAMESPACE": namespace} if namespace else {}),
           **({"FMA_WORKER_TEMPLATE": template} if template else {})}
    try:
        registry = ModelRegistry.load(models_path)
        kn = KnativeSettings.from_env(env)
        check_models(registry, kn)
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    click.echo(f"fma manifests: models from {registry.origin}; worker template from "
               f"{template or 'the built-in defaults'}", err=True)
    docs = []
    for name in [model] if model else registry.names():
        spec = registry.get(name)
        if spec is None:
            raise CliError(f"model {name!r} is not configured; configured: {', '.join(registry.names())}",
                           EXIT_USAGE)
        # The owner reference (the requester's uid) and, for shared GPUs, the
        # requester's node and GPU UUIDs are only known inside the cluster.
        assert kn.template is not None
        docs.append(render_worker_service(spec, kn.template, node_name=kn.node_name))
    click.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


@cli.command(context_settings=CONTEXT)
@click.argument("model", default="smollm2-135m-instruct")
@click.option("--dtype", default="float32", show_default=True)
def prepare(model: str, dtype: str) -> None:
    """Convert an embedded model into the cache now, with progress on stderr; print its folder.

    \b
    Examples:
      fma prepare
      fma prepare smollm2-135m-instruct --dtype bfloat16
    """
    from fma_worker import import_cache
    from fma_worker.model_store import EMBEDDED_MODELS, default_cache_dir, ensure_embedded_converted

    if model not in EMBEDDED_MODELS:
        raise CliError(f"{model!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)})", EXIT_USAGE)
    import_cache.install()
    folder = ensure_embedded_converted(model, dtype, default_cache_dir(),
                                       progress=lambda msg: click.echo(f"fma prepare: {msg}", err=True))
    # transformers' import table into the same cache (run at image build: no worker pod pays its scan).
    import transformers  # noqa: F401

    click.echo(folder)


@cli.command(context_settings=CONTEXT)
@click.option("-n", "--namespace", default=None, help="where the example is deployed (default: the kubeconfig "
              "context's namespace, else fma-example)")
@click.option("--kubeconfig", default=None, envvar="KUBECONFIG", help="kubeconfig file (default: $KUBECONFIG, "
              "~/.kube/config, or in-cluster)")
@click.option("--context", "kube_context", default=None, help="kubeconfig context")
@click.option("--no-eventing", is_flag=True, help="skip the Eventing checks (deployed with EVENTING=false)")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def doctor(namespace: str | None, kubeconfig: str | None, kube_context: str | None, no_eventing: bool,
           output: str) -> None:
    """Check a live cluster for what this deployment needs: pass / warn / fail per check, each failure with the
    command that fixes it. Read-only. Exit 1 when any check fails.

    \b
    Examples:
      fma doctor                           # the kubeconfig's cluster, namespace fma-example
      kn fma doctor -n team-a -o json      # for scripts
      fma doctor --no-eventing             # deployed with make deploy EVENTING=false
    """
    from kubernetes import client, config

    from .doctor import FAIL, Cluster, render_json, render_text, run_checks

    configuration = client.Configuration()
    try:
        if kubeconfig or kube_context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_kube_config(config_file=kubeconfig, context=kube_context,
                                    client_configuration=configuration)
            if namespace is None:
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                if kube_context:
                    contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
                    active = next((c for c in contexts if c["name"] == kube_context), active)
                namespace = (active.get("context") or {}).get("namespace")
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise click.ClickException(f"no cluster to check: {exc}") from None
    checks = run_checks(Cluster(configuration), namespace or "fma-example", eventing=not no_eventing)
    click.echo(render_json(checks) if output == "json" else render_text(checks, colour=sys.stdout.isatty()))
    sys.exit(1 if any(c.status == FAIL for c in checks) else 0)


@cli.command("model-path", context_settings=CONTEXT)
@click.argument("model", default="smollm2-135m-instruct")
@click.option("--dtype", default="float32", show_default=True)
def model_path(model: str, dtype: str) -> None:
    """Print the folder of a converted embedded model (it may not exist yet).

    \b
    Examples:
      fma model-path
      ls "$(fma model-path)"
    """
    from fma_worker.model_store import EMBEDDED_MODELS, default_cache_dir, embedded_cache_dir, is_converted

    if model not in EMBEDDED_MODELS:
        raise CliError(f"{model!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)})", EXIT_USAGE)
    folder = embedded_cache_dir(model, dtype, default_cache_dir())
    click.echo(folder)
    if not is_converted(folder):
        click.echo("(not converted yet: run `fma prepare`)", err=True)


@cli.command(context_settings=CONTEXT)
@click.argument("service", type=click.Choice(("requester", "worker", "knative", "eventlog")), default="requester")
@click.option("--markdown", is_flag=True, help="the table of variables, defaults and meanings")
def settings(service: str, markdown: bool) -> None:
    """List a service's settings: what it would use now (VAR=value), or --markdown.

    \b
    Examples:
      fma settings requester
      FMA_IDLE_TIMEOUT=30s fma settings
      fma settings worker --markdown
    """
    from fma_cli.docs import settings_classes
    from fma_common.settings import SettingsError, describe, markdown_table

    cls = settings_classes()[service]
    if markdown:
        click.echo(markdown_table(cls), nl=False)
        return
    try:
        current = describe(cls.from_env())
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    names = cls.env_names()
    for field, value in current.items():
        if field in names and (cls.model_fields[field].json_schema_extra or {}):
            click.echo(f"{names[field]}={'' if value is None else value}")


def main(argv: Sequence[str] | None = None) -> int:
    prog = "kn fma" if os.path.basename(sys.argv[0]).startswith("kn-") else "fma"
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name=prog, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
