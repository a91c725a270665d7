"""The validate directory: every file name in it, and validate.json (each step's state over
every call). torch-free."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from bench import BadInput

STATE = "validate.json"
SUMMARY = "VALIDATE.md"
RUN = "run"  # the run directory every sweep step, parity and peers write into
LOGS = "logs"
MATRICES = "matrices"
ENV_JSON = "env.json"
TESTS_XML = "gpu-tests.xml"
_STATE_VERSION = 1


def now() -> str:
    """UTC now, to the second, as ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all: a killed call never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_state(out: Path) -> dict[str, Any]:
    """DIR/validate.json: every step's latest state and every call; empty when new."""
    path = out / STATE
    if not path.exists():
        return {"version": _STATE_VERSION, "steps": {}, "calls": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: damaged ({exc}); move it away to start over") from None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise BadInput(f"{path}: not a validate state of version {_STATE_VERSION}")
    state.setdefault("steps", {})
    state.setdefault("calls", [])
    return state
