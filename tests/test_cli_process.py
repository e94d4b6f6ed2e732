"""The installed console scripts (``fma``, ``kn-fma``) as subprocesses against a real requester."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kube_fake import FakeKube, write_kubeconfig

from conftest import EMBEDDED, Requester, free_port, requester, worker_state

pytestmark = pytest.mark.process

BIN = Path(sys.executable).parent
FMA = str(BIN / "fma")
KN_FMA = str(BIN / "kn-fma")
ENV = {k: v for k, v in os.environ.items() if k not in ("FMA_URL", "FMA_API_KEY", "KUBECONFIG", "NO_COLOR")}


def run(*args: str, exe: str = FMA, env: dict[str, str] | None = None, timeout: float = 180) -> \
        subprocess.CompletedProcess:
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, converted_model_dir: Path):
    tmp = tmp_path_factory.mktemp("cli")
    models = tmp / "models.yaml"
    models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', dtype: float32}}\n"
                      f"  - {{name: broken, source: 'path:{tmp}'}}\n")
    with requester(tmp, models) as req:
        yield req


def columns(header: str) -> list[int]:
    return [header.index(name) for name in header.split("  ") if name.strip()]


def test_every_command_has_help_with_examples():
    top = run("--help")
    assert top.returncode == 0 and "Exit codes" in top.stdout
    commands = [line.split()[0] for line in top.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert {"serve", "worker", "models", "workers", "warm", "sleep", "release", "complete", "manifests",
            "completion", "event-log", "settings", "prepare", "model-path"} <= set(commands)
    for command in commands:
        done = run(command, "--help")
        assert done.returncode == 0 and f"Usage: fma {command}" in done.stdout, command
        assert "Examples:" in done.stdout, command
    assert "Usage: kn fma" in run("--help", exe=KN_FMA).stdout, "as a kn plugin it names itself kn fma"


def test_shell_completion_scripts_and_live_completion():
    assert "_FMA_COMPLETE=bash_complete" in run("completion", "bash").stdout
    assert "compdef" in run("completion", "zsh").stdout
    done = run(env={"_FMA_COMPLETE": "bash_complete", "COMP_WORDS": "fma wor", "COMP_CWORD": "1"})
    assert done.returncode == 0 and "plain,worker" in done.stdout and "plain,workers" in done.stdout


def test_listings_as_table_json_and_yaml(shared: Requester):
    url = ["--url", shared.spi]
    table = run("workers", *url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "STATE", "BACKEND", "IN-FLIGHT", "QUEUED", "LAST", "USED", "LAST",
                                "ACTUATION", "IDLE", "LEFT"]
    assert "\x1b[" not in table.stdout, "no colour when piped"
    starts = columns(lines[0])
    for row in lines[1:3]:
        assert all(row[s - 2:s] == "  " for s in starts[1:]), f"columns line up: {row!r}"
    as_json = json.loads(run("workers", *url, "-o", "json").stdout)
    assert {w["model"] for w in as_json["data"]} == {EMBEDDED, "broken"}
    assert yaml.safe_load(run("workers", *url, "--output", "yaml").stdout) == as_json
    models_table = run("models", *url).stdout.splitlines()
    assert models_table[0].split() == ["MODEL", "KIND", "STATE", "BACKEND", "CACHE", "ALIASES"]
    assert models_table[1].split()[:2] == [EMBEDDED, "chat"]
    models = json.loads(run("models", *url, "-o", "json").stdout)
    assert [m["id"] for m in models["data"]] == [EMBEDDED, "broken"]
    assert yaml.safe_load(run("models", *url, "-o", "yaml").stdout) == models


def test_warm_shows_progress_lines_then_ready_and_the_table_shows_the_cold_start(shared: Requester):
    url = ["--url", shared.spi]
    run("release", EMBEDDED, *url)
    warm = run("warm", EMBEDDED, *url)
    assert warm.returncode == 0, warm.stderr
    progress = warm.stderr.splitlines()
    assert progress and all(line.startswith(f"{EMBEDDED}: ") for line in progress), progress
    assert any("starting" in line for line in progress), "a line per state while it starts"
    assert "\r" not in warm.stderr, "no spinner when stderr is not a terminal"
    assert warm.stdout.startswith(f"{EMBEDDED}: ready (cold ") and warm.stdout.rstrip().endswith("s)")
    listing = run("workers", *url).stdout
    row = next(line for line in listing.splitlines() if line.startswith(EMBEDDED))
    assert " ready " in row and " cold " in row and ("just now" in row or "s ago" in row)
    status = json.loads(run("warm", EMBEDDED, *url, "-o", "json").stdout)
    assert status["state"] == "ready" and status["last_actuation"]["path"] in ("cold", "warm")


def test_warm_on_a_terminal_shows_a_spinner_with_the_elapsed_time(shared: Requester):
    import pty

    run("release", EMBEDDED, "--url", shared.spi)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([FMA, "warm", EMBEDDED, "--url", shared.spi], stdin=follower, stdout=follower,
                            stderr=follower, env={**ENV, "TERM": "xterm"}, close_fds=True)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command is done
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(60) == 0
    text = out.decode(errors="replace")
    assert "\r\x1b[2K" in text and any(frame in text for frame in "⠋⠙⠹⠸"), "a spinner redrawn in place"
    assert f"{EMBEDDED}: 0." in text and "starting" in text, "the elapsed time and the state"
    assert "\x1b[32mready\x1b[0m" in text, "the final state coloured on a terminal"


def test_complete_streams_tokens_and_answers_chat(shared: Requester):
    url = ["--url", shared.spi]
    streamed = run("complete", EMBEDDED, "Once upon a time", "--stream", "--max-tokens", "8", *url)
    assert streamed.returncode == 0 and streamed.stdout.startswith(", the city"), streamed
    whole = run("complete", EMBEDDED, "Once upon a time", "--max-tokens", "8", *url, "-o", "json")
    body = json.loads(whole.stdout)
    assert body["object"] == "text_completion" and streamed.stdout.strip() == body["choices"][0]["text"].strip()
    chat = run("complete", EMBEDDED, "What is the capital of France?", "--chat", "--max-tokens", "20", *url)
    assert chat.returncode == 0 and "Paris" in chat.stdout
    chat_stream = run("complete", EMBEDDED, "What is the capital of France?", "--chat", "--stream",
                      "--max-tokens", "20", *url)
    assert chat_stream.returncode == 0 and chat_stream.stdout.strip() == chat.stdout.strip()


def test_sleep_and_release_say_the_new_state(shared: Requester):
    url = ["--url", shared.spi]
    run("warm", EMBEDDED, *url)
    slept = run("sleep", EMBEDDED, "--level", "2", *url)
    assert slept.returncode == 0 and slept.stdout.strip() == f"{EMBEDDED}: sleeping (level 2)"
    assert worker_state(shared.spi)["state"] == "sleeping"
    released = run("release", EMBEDDED, *url, "-o", "json")
    assert released.returncode == 0 and json.loads(released.stdout)["state"] == "cold"


def test_warm_to_a_sleep_level_parks_the_worker_and_the_next_request_only_wakes_it(shared: Requester):
    import httpx

    url = ["--url", shared.spi]
    run("release", EMBEDDED, *url)
    parked = run("warm", EMBEDDED, "--level", "sleep1", *url)
    assert parked.returncode == 0 and parked.stdout.startswith(f"{EMBEDDED}: sleeping"), parked
    resp = httpx.post(f"{shared.spi}/v1/completions", timeout=120,
                      json={"model": EMBEDDED, "prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200 and resp.headers["X-FMA-Actuation"].startswith("wake;")


def test_exit_codes_and_one_line_reasons(shared: Requester):
    url = ["--url", shared.spi]
    unknown = run("warm", "nope", *url)
    assert unknown.returncode == 4
    assert unknown.stderr.strip().splitlines()[-1] == f"fma: unknown model 'nope'; configured: {EMBEDDED}, broken"
    assert run("complete", "nope", "hi", *url).returncode == 4
    down_url = f"http://127.0.0.1:{free_port()}"
    down = run("workers", "--url", down_url)
    assert down.returncode == 3 and len(down.stderr.strip().splitlines()) == 1 and down_url in down.stderr
    via_env = run("models", env={"FMA_URL": down_url})
    assert via_env.returncode == 3 and down_url in via_env.stderr, "FMA_URL is the URL tried"
    run("release", "broken", *url)
    conflict = run("sleep", "broken", *url)
    assert conflict.returncode == 1 and conflict.stderr.startswith("fma: 409 ")
    assert len(conflict.stderr.strip().splitlines()) == 1
    failed = run("warm", "broken", *url)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("fma: 503 worker_failed: worker for broken failed")
    usage = run("sleep", EMBEDDED, "--level", "3", *url)
    assert usage.returncode == 2 and "Invalid value for '--level'" in usage.stderr


def test_workers_watch_prints_a_block_per_change_until_interrupted(shared: Requester):
    import queue
    import threading

    # Ctrl-C from a terminal: SIGINT at its default in the CLI, whatever this test process has it set to (a
    # SIG_IGN here would be inherited and make the watch deaf to it; the watch failed this way in full runs only).
    inherited = signal.getsignal(signal.SIGINT)
    proc = subprocess.Popen([FMA, "workers", "--watch", "--interval", "0.2", "--url", shared.spi],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Both pipes read all along: a watch keeps printing (the idle countdown changes every second), and one
    # left unread could fill and block it; this failed twice in full runs, never alone.
    lines: queue.Queue[str] = queue.Queue()
    errors: list[str] = []
    readers = [threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True),
               threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)]
    for t in readers:
        t.start()
    try:
        first = [lines.get(timeout=60) for _ in range(2)]
        assert first[0].startswith("# ") and first[1].startswith("MODEL"), first
        run("warm", EMBEDDED, "--url", shared.spi)
        seen = ""
        while " ready " not in seen:  # a new block comes once the state changed
            line = lines.get(timeout=60)
            seen += line if line.startswith(EMBEDDED) else ""
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        assert code == 0, (f"Ctrl-C ends a watch without an error; SIGINT here was {inherited!r}; "
                           f"stderr: {''.join(errors)[-2000:]}")


def test_kn_plugin_finds_the_requester_through_the_cluster(shared: Requester, tmp_path: Path):
    kube = FakeKube().start()
    try:
        kube.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                         "metadata": {"name": "fma-requester", "namespace": "llm"}, "spec": {},
                         "status": {"url": shared.spi}})
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, kube.url, namespace="llm", token="t", user="me")
        env = {"KUBECONFIG": str(kubeconfig)}
        found = run("models", "-o", "json", exe=KN_FMA, env=env)
        assert found.returncode == 0, found.stderr
        assert f"kn fma: using {shared.spi} (the fma-requester Knative Service in namespace llm)" in found.stderr
        assert json.loads(found.stdout)["data"][0]["id"] == EMBEDDED
        elsewhere = run("models", "-n", "other", exe=KN_FMA, env=env)
        assert elsewhere.returncode == 3
        assert "no Knative Service fma-requester in namespace other" in elsewhere.stderr
        assert run("models", "--url", shared.spi, exe=KN_FMA, env=env).stderr == "", "--url wins, quietly"
        plain = run("models", env={**env, "FMA_URL": shared.spi})
        assert plain.returncode == 0 and "using" not in plain.stderr
    finally:
        kube.stop()


def test_api_key_is_sent_as_a_bearer_token():
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b'{"object": "list", "data": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert run("workers", "--url", url, "--api-key", "k-123").returncode == 0
        assert run("models", "--url", url, env={"FMA_API_KEY": "k-env"}).returncode == 0
        assert run("models", "--url", url).returncode == 0
        assert seen == ["Bearer k-123", "Bearer k-env", None]
    finally:
        server.shutdown()
        server.server_close()
