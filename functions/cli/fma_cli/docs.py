"""Documentation generated from the code: the README's settings tables, design.md's state diagram.

``python -m fma_cli.docs README.md docs/design.md`` (``make docs``) rewrites
every block between ``<!-- settings:NAME -->`` and ``<!-- /settings:NAME -->``
with the table of that settings class, and the block between
``<!-- state-diagram -->`` and ``<!-- /state-diagram -->`` with the state
machine's transition table as a Mermaid diagram. Tests fail when a document
and the code disagree, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fma_common.settings import EnvSettings, markdown_table


def settings_classes() -> dict[str, type[EnvSettings]]:
    from fma_requester.eventlog import EventLogSettings
    from fma_requester.knative import KnativeSettings
    from fma_requester.settings import RequesterSettings
    from fma_worker.settings import WorkerSettings

    return {"worker": WorkerSettings, "requester": RequesterSettings, "knative": KnativeSettings,
            "eventlog": EventLogSettings}


BLOCK = re.compile(r"(<!-- settings:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /settings:(?P=name) -->)", re.S)


def render(text: str) -> str:
    classes = settings_classes()

    def table(match: re.Match[str]) -> str:
        cls = classes[match.group("name")]
        return f"{match.group(1)}{markdown_table(cls)}{match.group(4)}"

    return BLOCK.sub(table, text)


def blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


DIAGRAM = re.compile(r"(<!-- state-diagram -->\n)(?P<body>.*?)(<!-- /state-diagram -->)", re.S)


def diagram_block() -> str:
    from fma_requester.lifecycle import state_diagram

    return f"```mermaid\n{state_diagram()}```\n"


def render_diagram(text: str) -> str:
    return DIAGRAM.sub(lambda m: f"{m.group(1)}{diagram_block()}{m.group(3)}", text)


def diagram_in(text: str) -> str | None:
    m = DIAGRAM.search(text)
    return m.group("body") if m else None


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    for name in args or ["README.md", "docs/design.md"]:
        path = Path(name)
        text = path.read_text()
        new = render_diagram(render(text))
        if new != text:
            path.write_text(new)
            print(f"{path}: generated blocks updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
