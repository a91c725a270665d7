"""The layout's rules, measured from the sources (tools/layout.py): no import circles, torch
only on the side that trains, modules and functions of a size a newcomer reads, and the parent
side never reaching into the child side."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("layout", ROOT / "tools" / "layout.py")
layout = importlib.util.module_from_spec(_spec)
sys.modules["layout"] = layout  # dataclasses look their module up while the class is made
_spec.loader.exec_module(layout)

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# Where torch may be imported at all: the processes that build, train or measure a model.
# telemetry.env reads torch's and CUDA's versions for the fingerprint, in processes of their own
# (a cell, the run's device probe, `ampbench env`).
TORCH_SIDE = ("bench.cell", "bench.parity.train", "bench.parity.tasks", "bench.parity.probes",
              "bench.parity.updates",  # the child counts which updates reached the weights
              "bench.parity.data",  # like tasks: names and file checks torch-free, data in a child
              "bench.peers", "bench.precision", "bench.telemetry.env", "models")
# The parent side: plans, launches, keeps records, reads files. It starts children by argv and
# reads what they write; it never imports their code.
PARENT_SIDE = ("bench.cli", "bench.run", "bench.config", "bench.store", "bench.analysis",
               "bench.report", "bench.validate", "bench.parity.stage", "bench.parity.verdict",
               "bench.parity.sharing",
               "bench.parity.convergence")
CHILD_SIDE = ("bench.cell", "bench.parity.train")


@pytest.fixture(scope="module")
def found():
    return layout.scan(ROOT)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_circles(found):
    assert layout.circles(found) == []


def test_torch_is_imported_only_where_a_model_trains(found):
    users = [n for n, m in found.items() if m.torch_top or m.torch_lazy]
    assert users and all(_within(n, TORCH_SIDE) for n in users), \
        [n for n in users if not _within(n, TORCH_SIDE)]


def test_the_parent_side_never_imports_the_child_side(found):
    crossing = {n: sorted(t for t in m.imports if _within(t, CHILD_SIDE))
                for n, m in found.items() if _within(n, PARENT_SIDE)}
    assert {n: t for n, t in crossing.items() if t} == {}


def test_no_module_is_longer_than_a_newcomer_reads(found):
    long = {n: m.lines for n, m in found.items() if m.lines > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_longer_than_a_screen(found):
    long = {f"{n}:{f}": lines for n, m in found.items() for f, lines in m.functions
            if lines > MAX_FUNCTION_LINES}
    assert long == {}


def test_the_tool_sees_a_circle_and_a_torch_import(tmp_path):
    # The rules above are only as good as the scan: a planted circle and torch import show.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n    import torch\n")
    scanned = layout.scan(tmp_path, ("pkg",))
    assert layout.circles(scanned) == [["pkg.a", "pkg.b"]]
    assert scanned["pkg.b"].torch_lazy and not scanned["pkg.b"].torch_top
