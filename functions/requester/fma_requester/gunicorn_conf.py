"""gunicorn configuration of the requester (``gunicorn -c python:fma_requester.gunicorn_conf``).

Concurrency model: **one process, gevent**. The requester only waits - on
workers starting, on upstream tokens, on clients reading - so it is I/O bound;
gevent serves thousands of concurrent (streaming) connections from one
process with a small footprint. One process is also the single owner of the
actuator's state: with several, each would start its own worker per model.
Background work (starters, watchers, the idle reaper) runs as greenlets.

Binds: every address in ``FMA_BIND`` (locally 8080 and 8081, the FMA
requester's probes and SPI ports; in Knative, ``$PORT``) serves every route.

SIGTERM: gunicorn stops accepting and lets in-flight requests finish for
``graceful_timeout`` (``FMA_DRAIN_TIMEOUT``); then ``worker_exit`` stops every
worker process. The lifeline pipe (see ``local.py``) covers harder deaths.
"""

from fma_requester.settings import RequesterSettings

_settings = RequesterSettings.from_env()

bind = list(_settings.binds)
worker_class = "gevent"
workers = 1
worker_connections = _settings.connections
timeout = 120
graceful_timeout = int(_settings.drain_timeout_s)
keepalive = 75
accesslog = None
errorlog = "-"
loglevel = _settings.log_level
proc_name = "fma-requester"
# gunicorn 25+ opens a management socket at one fixed path ($HOME/.gunicorn/gunicorn.ctl): two requesters (or a
# requester and its workers) would fight over it, and whoever reaches it can stop or reconfigure the server.
control_socket_disable = True
if _settings.tls_certfile and _settings.tls_keyfile:  # HTTPS on every bind (fma serve --certfile/--keyfile)
    certfile = str(_settings.tls_certfile)
    keyfile = str(_settings.tls_keyfile)


def post_worker_init(worker) -> None:
    """On SIGTERM, note the drain deadline too (see ``drain.py``), close the connections that are between
    requests, then let gunicorn drain as it does.

    gunicorn's gevent worker exits once every connection's handler has ended, and a handler waiting for a
    kept-alive client's next request ends only at the keep-alive timeout (75 s here): any client that kept a
    connection open (a proxy pooling connections, as Go's transport under Knative's queue-proxy does by
    default) made every SIGTERM wait the whole graceful timeout. A connection between requests is shut at
    the drain's start (a client may always find an idle keep-alive connection closed, and retries on a new
    one); one with a request's bytes already waiting, or in progress, ends after its answer, which
    says ``Connection: close`` (``app.py``).
    """
    import signal
    import socket

    from fma_requester import drain

    previous = signal.getsignal(signal.SIGTERM)
    between: dict[int, socket.socket] = {}  # connections waiting for their next request, by id
    handle, handle_request = worker.handle, worker.handle_request

    def tracked_handle(listener, client, addr):  # one per connection
        between[id(client)] = client
        try:
            return handle(listener, client, addr)
        finally:
            between.pop(id(client), None)

    def tracked_request(listener_name, req, client, addr):  # one per request on it
        between.pop(id(client), None)
        try:
            return handle_request(listener_name, req, client, addr)
        finally:
            if not drain.draining():
                between[id(client)] = client

    worker.handle, worker.handle_request = tracked_handle, tracked_request

    try:  # the worker is gevent's: its select would yield; a zero timeout must not
        from gevent import monkey

        poll_now = monkey.get_original("select", "select")
    except ImportError:
        from select import select as poll_now

    def on_term(sig, frame) -> None:
        drain.begin(_settings.drain_timeout_s)
        for client in list(between.values()):
            try:
                if poll_now([client.fileno()], [], [], 0)[0]:
                    continue  # a request's bytes are already here: it is in flight, served, then closed
                client.shutdown(socket.SHUT_RDWR)  # its handler reads the end and returns
            except (OSError, ValueError):
                pass
        if callable(previous):
            previous(sig, frame)

    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn set it: SIGTERM must not interrupt requests' I/O


def worker_exit(server, worker) -> None:
    from fma_requester.app import shutdown_all

    shutdown_all(timeout=max(5.0, _settings.drain_timeout_s))
