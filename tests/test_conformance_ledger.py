"""docs/knative-conformance.md stays in step with the simulators and the tests it names.

Every row must name upstream source, simulator code that exists (a function,
class, method or constant in the named file) and at least one test that exists;
the ledger must keep at least thirty rows, numbered without gaps.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

LEDGER = REPO / "docs" / "knative-conformance.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::([\w.]+)`")


def rows() -> list[list[str]]:
    out = []
    for line in LEDGER.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            out.append(cells)
    return out


def names_in(path: Path) -> set[str]:
    """Top-level names, and ``Class.method`` for methods, defined in a Python file."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        if isinstance(node, ast.ClassDef):
            found |= {f"{node.name}.{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found |= {t.id for t in targets if isinstance(t, ast.Name)}
            found |= {e.id for t in targets if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Name)}
    return found


def test_the_ledger_has_thirty_rows_or_more_numbered_in_order():
    numbers = [int(r[0]) for r in rows()]
    assert len(numbers) >= 30
    assert numbers == list(range(1, len(numbers) + 1))


def test_every_row_cites_upstream_names_existing_simulator_code_and_an_existing_test():
    cache: dict[str, set[str]] = {}
    for number, behaviour, upstream, releases, simulator, tests, evidence in rows():
        assert re.search(r"`[^`]*/[^`]*\.(go|yaml|sh)`", upstream) or "k8s:" in upstream, f"row {number}: {upstream}"
        assert releases, f"row {number} says for which releases it holds"
        assert evidence in ("source", "artifact"), f"row {number}: evidence {evidence!r}"
        sim_refs, test_refs = REF.findall(simulator), REF.findall(tests)
        assert sim_refs and test_refs, f"row {number} names simulator code and tests"
        for path, name in sim_refs + test_refs:
            defined = cache.setdefault(path, names_in(REPO / path))
            assert name in defined, f"row {number} ({behaviour[:40]}...): {path}::{name} does not exist"
        assert all(name.startswith("test_") for _, name in test_refs), f"row {number}: a test column names a test"


def test_every_test_module_of_the_knative_path_is_in_the_ledger():
    named = {path for r in rows() for path, _ in REF.findall(r[5])}
    for module in ("tests/test_knative_sim.py", "tests/test_knative_ladder_process.py", "tests/test_knative.py"):
        assert module in named
