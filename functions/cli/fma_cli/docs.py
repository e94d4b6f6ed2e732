"""The README's settings tables, generated from the settings classes.

``python -m fma_cli.docs README.md`` rewrites every block between
``<!-- settings:NAME -->`` and ``<!-- /settings:NAME -->`` with the table of
that settings class (``make docs``); ``tests/test_settings.py`` fails when the
README and the classes disagree, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fma_common.settings import EnvSettings, markdown_table


def settings_classes() -> dict[str, type[EnvSettings]]:
    from fma_requester.knative import KnativeSettings
    from fma_requester.settings import RequesterSettings
    from fma_worker.settings import WorkerSettings

    return {"worker": WorkerSettings, "requester": RequesterSettings, "knative": KnativeSettings}


BLOCK = re.compile(r"(<!-- settings:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /settings:(?P=name) -->)", re.S)


def render(text: str) -> str:
    classes = settings_classes()

    def table(match: re.Match[str]) -> str:
        cls = classes[match.group("name")]
        return f"{match.group(1)}{markdown_table(cls)}{match.group(4)}"

    return BLOCK.sub(table, text)


def blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "README.md")
    text = path.read_text()
    new = render(text)
    if new != text:
        path.write_text(new)
        print(f"{path}: settings tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
