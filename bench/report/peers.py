"""The "Peers" section of report.md: our models next to transformers' and torchvision's, from
``RUN_DIR/peers.csv`` (``ampbench peers --out-dir RUN_DIR``, bench/peers.py): whether
they compute the same thing, and our step time over theirs with its spread. torch-free."""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.report.loading import Run
from bench.report.tables import is_num


def _number(row: pd.Series, column: str) -> float | None:
    value = row.get(column)
    return float(value) if is_num(value) else None


def _text(value: Any) -> str:
    return "" if value is None or pd.isna(value) else str(value).strip()


def _peer(row: pd.Series) -> str:
    """'GPT2LMHeadModel (4.46.0)'; empty where an older peers.csv has no peer column."""
    name, version = _text(row.get("peer")), _text(row.get("peer_version"))
    return f"{name} ({version})" if name and version else name


def _params(row: pd.Series) -> str:
    ours, peer = _number(row, "params_ours"), _number(row, "params_peer")
    if ours is None or peer is None:
        return ""
    return f"{ours:,.0f}" + (" (equal)" if ours == peer else f" vs {peer:,.0f}")


def _diff(row: pd.Series, *columns: str) -> str:
    """The differences in ``columns`` joined by ' / ' ('' where none was measured)."""
    values = [_number(row, c) for c in columns]
    if all(v is None for v in values):
        return ""
    return " / ".join("n/a" if v is None else f"{v:.2g}" for v in values)


def _ratio(row: pd.Series) -> str:
    """Our step time over the peer's: the median of the per-step ratios, IQR as the spread."""
    median = _number(row, "ratio_ours_per_peer_median")
    if median is None:
        return ""
    iqr, steps = _number(row, "ratio_ours_per_peer_iqr"), _number(row, "timed_steps")
    if iqr is None and steps is not None and steps < 2:
        return f"{median:.2f}x (IQR n/a: {steps:.0f} step has no spread)"
    return f"{median:.2f}x" + (f" (IQR {iqr:.2f})" if iqr is not None else "")


def _ms(row: pd.Series) -> str:
    ours, peer = _number(row, "ours_step_ms_median"), _number(row, "peer_step_ms_median")
    if ours is None or peer is None:
        return ""
    return " / ".join(f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in (ours, peer))


def _shape(row: pd.Series) -> str:
    """'1 x 128': batch and sequence length or image size ('' where an older file lacks them)."""
    batch = _number(row, "batch_size")
    size = _number(row, "seq_len") or _number(row, "image_size")
    return f"{batch:.0f} x {size:.0f}" if batch is not None and size is not None else ""


def section(run: Run) -> list[str]:
    """report.md's Peers section; [] without peers.csv."""
    if run.peers is None:
        return []
    body: list[list[Any]] = []
    for _, row in run.peers.iterrows():
        status, precision = _text(row.get("status")), _text(row.get("precision"))
        body.append([row["model"], _peer(row), precision, _shape(row), status, _params(row),
                     _diff(row, "logit_max_abs_diff", "logit_max_abs_diff_train"),
                     _diff(row, "loss_abs_diff"), _ms(row),
                     _ratio(row)])
    table = tabulate(body, headers=["model", "peer", "policy", "batch x size", "status",
                                    "parameters (ours vs peer)", "max logit diff, eval / train",
                                    "loss diff",
                                    "step ms, ours / peer", "step time ours / peer"],
                     tablefmt="github", disable_numparse=True)
    return ["## Peers", "",
            "Our models with their weights copied into the library's implementation "
            "(transformers, torchvision): the same parameters and outputs mean the same "
            "computation; step times interleaved ours/peer, the ratio is the median of per-step "
            "ratios (below 1x: ours is faster) with its interquartile range.", "",
            table, ""]
