"""gunicorn configuration of the event log (``fma event-log``): one process, a few threads; it only logs."""

from fma_requester.eventlog import EventLogSettings

_settings = EventLogSettings.from_env()

bind = [_settings.address()]
worker_class = "gthread"
workers = 1
threads = 4
timeout = 30
graceful_timeout = 10
accesslog = None
errorlog = "-"
loglevel = _settings.log_level
proc_name = "fma-event-log"
