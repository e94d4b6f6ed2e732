"""What the CLI prints: durations, tables, colour rules (pure functions, no requester)."""

from __future__ import annotations

import io
import re

import pytest

from fma_cli.render import ago, paint, progress_line, seconds, table, use_colour, workers_table

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.mark.parametrize(("value", "text"), [(0.951, "0.95s"), (9.994, "9.99s"), (12.34, "12.3s"), (245, "4m05s"),
                                             (7800, "2h10m"), (None, "-")])
def test_durations_read_like_people_write_them(value, text):
    assert seconds(value) == text


@pytest.mark.parametrize(("delta", "text"), [(0.2, "just now"), (42, "42s ago"), (185, "3m ago"), (7300, "2h ago"),
                                             (5 * 86400 + 5, "5d ago")])
def test_times_ago(delta, text):
    assert ago(1000.0, 1000.0 + delta) == text
    assert ago(None, 5.0) == "never"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color():
    assert use_colour(_Tty(), {}) is True
    assert use_colour(io.StringIO(), {}) is False, "piped output stays plain"
    assert use_colour(_Tty(), {"NO_COLOR": "1"}) is False
    assert use_colour(_Tty(), {"TERM": "dumb"}) is False
    assert paint("ready", "green", True) == "\x1b[32mready\x1b[0m" and paint("ready", "green", False) == "ready"


def _rows():
    return [{"model": "smollm2-135m-instruct", "state": "ready", "phase": "ready", "backend": "local",
             "in_flight": 2, "queued": 0, "last_used": 990.0, "last_actuation": {"path": "cold", "seconds": 0.951},
             "idle_left_s": 290.0},
            {"model": "acme/m", "state": "sleeping", "phase": "waking", "backend": "local", "in_flight": 0,
             "queued": 12, "last_used": None, "last_actuation": None, "idle_left_s": None},
            {"model": "broken", "state": "failed", "phase": "failed", "backend": "local", "in_flight": 0,
             "queued": 0, "last_used": 100.0, "last_actuation": None, "error": "worker failed to start: no weights"}]


def test_a_coloured_table_lines_up_exactly_like_the_plain_one():
    plain = workers_table(_rows(), 1000.0, colour=False)
    coloured = workers_table(_rows(), 1000.0, colour=True)
    assert "\x1b[32m" in coloured and "\x1b[31m" in coloured
    assert ANSI.sub("", coloured) == plain, "colour codes must not shift the columns"
    lines = plain.splitlines()
    header, first, second = lines[0], lines[1], lines[2]
    for column in ("STATE", "BACKEND", "LAST USED", "LAST ACTUATION", "IDLE LEFT"):
        start = header.index(column)
        assert first[start - 2:start] == "  " and second[start - 2:start] == "  ", column
    assert "10s ago" in first and "cold 0.95s" in first and "4m50s" in first
    assert "sleeping (waking)" in second and "never" in second
    # right-aligned counts: the last digit under the header's last letter
    end = header.index("QUEUED") + len("QUEUED")
    assert second[end - 2:end] == "12"
    assert lines[-1] == "broken: worker failed to start: no weights", "the reason for a failure is shown in full"


def test_table_with_no_rows_is_the_header():
    assert table(("A", "BB"), []) == "A  BB"


def test_warm_progress_names_the_state_and_what_it_waits_for():
    line = progress_line("m", {"state": "starting", "phase": "starting", "detail": "waiting for a node"}, 3.2)
    assert line == "m: 3.20s starting: waiting for a node"
    assert progress_line("m", None, 0.01) == "m: 0.01s asking the requester"


def test_an_unknown_embedded_model_is_one_line_naming_the_known_ones(capsys):
    """Issue 21, defect 9: `fma model-path nosuch` ended in a KeyError traceback."""
    from fma_cli.main import main

    assert main(["model-path", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fma: 'nosuch' is not an embedded model (smollm2-135m-instruct, all-minilm-l6-v2)"
