"""The command line's value types: each parses one flag's text or raises ``argparse``'s error
naming the flag's problem in one line (bench/cli.py uses them; ``duration_s`` is shared with the
stages that read --time-budget)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from bench import BadInput, paths


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:  # NaN included
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0}
_MAX_DURATION_S = 7 * 24 * 3600.0


def duration_s(text: str) -> float:
    """Seconds in a duration: 25m, 540s, 1h, 1h30m, or a bare number of seconds."""
    compact = text.strip().lower()
    try:
        seconds = float(compact)
    except ValueError:
        parts = _DURATION_PART.findall(compact)
        if not parts or "".join(number + unit for number, unit in parts) != compact:
            raise argparse.ArgumentTypeError(
                f"expected a duration like 25m, 540s or 1h, got '{text}'") from None
        seconds = sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    if not 0 < seconds <= _MAX_DURATION_S:  # NaN and infinity included
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 7 days, got '{text}'")
    return seconds


def duration(text: str) -> str:
    """A checked duration, kept as written (the resume command repeats it so)."""
    duration_s(text)
    return text.strip()


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
    return items


def path_type(check: Callable[[str, str], object]) -> Callable[[str], str]:
    """An argparse type that checks an output path before any work (bench/paths.py)."""
    def parse(text: str) -> str:
        try:
            check(text, "path")
        except BadInput as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("path ")) from None
        return text

    return parse


out_dir = path_type(paths.output_dir)
out_file = path_type(paths.output_file)
out_csv = path_type(lambda text, flag: paths.output_file(text, flag, make_parents=True))


def comma_ints(text: str) -> list[int]:
    return [positive_int(item) for item in comma_list(text)]


def world_sizes(text: str) -> list[int | str]:
    """--world-size: processes per node, comma-separated, where ``node`` is every GPU of this
    node (the runner counts them after its device probe: bench/config/matrix.py, NODE)."""
    from bench.config.matrix import NODE

    sizes: list[int | str] = []
    for item in comma_list(text):
        try:
            sizes.append(NODE if item.lower() == NODE else positive_int(item))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} (or {NODE}: every GPU of this node)") \
                from None
    return sizes


def strategy_name(text: str) -> str:
    """A strategy (bench/strategy.py) in its canonical spelling: fsdp2:fp32/fp32 is fsdp2."""
    from bench import strategy

    try:
        return strategy.canonical(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
