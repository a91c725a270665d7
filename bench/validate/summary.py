"""VALIDATE.md: the plan's steps with their estimates against the measured wall times, status,
exit code and log, for a person to read after each step. torch-free."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import store
from bench.validate.plan import Step, Target
from bench.validate.state import RUN, STATE, SUMMARY, write_atomic


def save(out: Path, state: dict[str, Any], steps: Sequence[Step], target: Target) -> None:
    """validate.json and VALIDATE.md as they stand now."""
    write_atomic(out / STATE, json.dumps(state, indent=1) + "\n")
    write_atomic(out / SUMMARY, render_summary(state, steps, target, out))


def render_summary(state: dict[str, Any], steps: Sequence[Step], target: Target,
                   out: Path) -> str:
    """VALIDATE.md: each step's estimate against its measured wall time, status and log."""
    from tabulate import tabulate

    rows = []
    planned = measured = 0.0
    for step in steps:
        entry = state["steps"].get(step.name, {})
        wall = entry.get("wall_s")
        if step.skip is None and wall is not None:
            planned += step.estimate_s
            measured += wall
        log = entry.get("log")
        rows.append([step.name, step.what,
                     "" if step.skip else f"{step.estimate_s:.0f}",
                     "" if wall is None else f"{wall:.0f}",
                     f"not planned: {step.skip}" if step.skip else entry.get("status", "pending"),
                     "" if entry.get("exit_code") is None else entry["exit_code"],
                     f"[{log}]({log})" if log else ""])
    calls = "; ".join(f"call {i + 1} at {c['started']}, budget {c['budget_s']:.0f} s, "
                      f"{c.get('wall_s', 0):.0f} s used" for i, c in enumerate(state["calls"]))
    links = [f"[{text}]({RUN}/{name})" for text, name in (
        ("report", store.REPORT), ("results.csv", store.RESULTS), ("parity.csv", store.PARITY),
        ("peers.csv", store.PEERS)) if (out / RUN / name).exists()]
    return "\n".join([
        f"# ampbench validate: {target.name}", "",
        f"{calls or 'not started yet'}.", "",
        tabulate(rows, headers=["step", "what", "estimate s", "wall s", "status", "exit", "log"],
                 tablefmt="github"), "",
        f"Steps that ran: {measured:.0f} s measured against {planned:.0f} s estimated.",
        *(["", "Results: " + ", ".join(links) + "."] if links else []),
        *([f"\nNote: {target.costs.note}"] if target.costs.note else []), ""])
