"""What `ampbench run` shows on the console: a progress bar with one line per finished process
(``progress``, ``write_line``; the line itself is store.record_line, which a cell prints too)
and, after the sweep, the summary table (``summarize``). torch-free.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from bench import store
from bench.analysis import cells, noise


def progress(total: int, initial: int) -> Any:
    """A progress bar on a terminal; nothing where stderr is a file or a pipe (CI logs), where
    the one plain line per finished cell is the progress."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, unit="cell", dynamic_ncols=True,
                disable=not sys.stderr.isatty(),
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")


def write_line(text: str) -> None:
    """One line on stderr that leaves a progress bar in place."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def _column(key: cells.CellKey) -> tuple[Any, ...]:
    """A cell's key without model and precision: one column of the summary."""
    return (key.batch_size, key.seq_len or key.image_size, key.grad_accum, key.compile,
            key.world_size, key.strategy)


def _column_label(column: tuple[Any, ...], show_size: bool) -> str:
    batch, size, accum, compiled, world, shared = column
    return "".join([f"b={batch}", f" size={size}" if show_size else "",
                    f" ga={accum}" if accum != 1 else "", " compile" if compiled else "",
                    f" ws={world}" if world != 1 else "",
                    f" {shared}" if shared != "ddp" else ""])


def _model_table(model: str, by_cell: dict[cells.CellKey, list[dict[str, Any]]],
                 estimates: dict[cells.CellKey, noise.Estimate]) -> str:
    """One model's block: its policies x cells, samples/s and the speedup over fp32."""
    from tabulate import tabulate

    keys = [key for key in by_cell if key.model == model]
    columns = sorted({_column(k) for k in keys}, key=lambda c: (c[4], c[5], c[2], c[3], c[1], c[0]))
    show_size = len({c[1] for c in columns}) > 1
    body = []
    for policy in dict.fromkeys(k.precision for k in keys):
        mine = {_column(k): k for k in keys if k.precision == policy}
        emulated = any(store.truthy(r.get("emulated")) for k in mine.values() for r in by_cell[k])
        line = [f"{policy} (emulated)" if emulated else policy]
        for column in columns:
            key = mine.get(column)
            value = estimates.get(key) if key else None
            if key is None or value is None:  # no ok process: the last one's status, or none ran
                line.append(by_cell[key][-1]["status"] if key else "")
                continue
            text = f"{value.value:,.1f}"
            base = estimates.get(key._replace(precision="fp32"))
            if base is not None and policy != "fp32":
                ratio = value.ratio(base)
                span = f" [{ratio.low:.2f}-{ratio.high:.2f}]" if ratio.known else ""
                text += f" ({ratio.value:.2f}x{span}{'*' if ratio.beyond_noise else ''})"
            line.append(text)
        body.append(line)
    headers = ["policy", *(_column_label(c, show_size) for c in columns)]
    return (f"{model}: samples/s (speedup over fp32; * beyond the noise)\n"
            + tabulate(body, headers=headers, tablefmt="github"))


def summarize(records: Iterable[dict[str, Any]]) -> str:
    """Per model: policies x cells (batch size, world size ...), median samples/s of the ok
    processes with the speedup over fp32 in the same column and its noise interval."""
    from tabulate import tabulate

    records = list(records)
    by_cell = cells.group(records)  # bench/analysis/cells.py; max-batch searches are no cells
    ok = {key: [r for r in rows if r.get("status") == "ok"] for key, rows in by_cell.items()}
    estimates, band = noise.cell_estimates(ok, "samples_per_s")
    blocks = [_model_table(model, by_cell, estimates)
              for model in dict.fromkeys(key.model for key in by_cell)]
    if estimates:
        blocks.append(f"noise: {noise.describe(band)}")
    searched = [r for r in records if cells.is_search(r)]
    if searched:
        body = [[r["model"], r["precision"], r["max_batch"]] for r in searched]
        blocks.append("largest batch that fits\n" + tabulate(
            body, headers=["model", "policy", "max batch"], tablefmt="github"))
    return "\n\n".join(blocks) or "no records"
