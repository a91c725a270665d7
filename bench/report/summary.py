"""report.md's first screen: is each reduced precision faster than fp32 here, by how much, with
what memory and energy, and does accuracy hold? One row per model and policy, each a point
estimate with its interval, the ones within the noise said to be so; then the parity failures
and the cells' statuses. Also the one-line-per-model headline of results/README.md. torch-free.

The comparison is at one batch size per model and policy, fixed before looking at the numbers:
the largest batch that both the policy and fp32 ran ok. Picking the best of several noisy
ratios would favour luck; the model's section has every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench import store
from bench.analysis import noise
from bench.report import numerics
from bench.report.formats import fmt_change, fmt_ratio, is_num
from bench.report.loading import CONTENDED_MARK, THROTTLED_MARK, Run, _ordered
from bench.report.notes import _label
from bench.report.tables import _compared, _memory_column, _same_key, _speedup, _versus
from bench.report.view import _Model, _model

REFERENCE = "fp32"
CPU_TF32 = "tf32 (fp32 on a CPU)"  # TF32 is a GPU tensor-core format: on a CPU tf32 is fp32


def policy_label(run: Run, policy: str) -> str:
    """A policy as the report names it: tf32 on a CPU says it is fp32."""
    return CPU_TF32 if policy == "tf32" and on_cpu(run) else policy


def on_cpu(run: Run) -> bool:
    device = run.meta.get("device")
    if not device and "device" in run.cells:
        known = run.cells["device"].dropna()
        device = known.iloc[0] if len(known) else None
    return str(device or "").lower() == "cpu"


# ------------------------------------------------------------------------------ first screen


def _answer(ratio: noise.Ratio | None, fmt: Callable[[noise.Ratio], str], faster: str,
            slower: str) -> str:
    """The ratio with its interval and what it means: ``faster``/``slower`` when beyond the
    noise, 'within noise' when not; 'n/a' when nothing compares."""
    if ratio is None:
        return "n/a"
    if not ratio.known:
        return fmt(ratio).removesuffix(" (noise unknown)") + ", not judged (noise not measured)"
    if ratio.beyond_noise:
        verdict = faster if ratio.value > 1 else slower
    else:
        verdict = "no change" if ratio.error == 0 else "within noise"
    return f"{fmt(ratio)} {verdict}"


def _speed_text(model: _Model, cell: pd.Series) -> str:
    """The speedup with its interval and verdict; an emulated or contended one is shown plain,
    never bold, with why it is no finding."""
    ratio = _speedup(model, cell, REFERENCE)
    if ratio is not None and cell["emulated"]:
        return f"{ratio.value:.2f}x (emulated: not a speed finding)"
    if ratio is not None and _contended(model, cell):
        return f"{ratio.value:.2f}x {CONTENDED_MARK} (contended: not a finding)"
    text = _answer(ratio, fmt_ratio, "faster", "slower")
    return text + (f" {THROTTLED_MARK}" if cell["throttled"] else "")


def _parity_text(run: Run, model: str, policy: str) -> str:
    row = run.parity_row(model, policy)
    if row is None:
        return "not run"
    verdict = str(row["verdict"] or "no verdict")
    if row["precision"] != policy:  # judged on several ranks only: say under what
        verdict += f" under {str(row['precision']).partition('@')[2]}"
    if is_num(row.get("delta")) and is_num(row.get("tolerance")):
        delta = f"{row['delta']:+.3g}" if row["delta"] else "0"
        verdict += f" (eval loss {delta} vs fp32, tolerance {row['tolerance']:.3g})"
    return verdict


def summary_rows(run: Run) -> list[list[str]]:
    """Per model and reduced-precision policy: the compared batch, speedup, memory change,
    energy change and parity verdict, as table cells."""
    mem_column, _ = _memory_column(run)
    body = []
    for name in run.cells["model"].drop_duplicates():
        model = _model(run, name)
        for policy in model.policies:
            if policy == REFERENCE:
                continue
            cell = _compared(model, policy)
            if cell is None:
                status = ", ".join(sorted(set(
                    model.cells.loc[model.cells["precision"] == policy, "status"])))
                body.append([name, policy_label(run, policy), "", f"n/a (no ok pair with fp32; "
                             f"{policy}: {status})", "", "", _parity_text(run, name, policy)])
                continue
            memory = _versus(model, cell, REFERENCE, mem_column)
            energy = _versus(model, cell, REFERENCE, "joules_per_sample")
            body.append([name, policy_label(run, policy),
                         _label(cell, model.row_keys).split(", ", 1)[1],  # "batch 8, ..."
                         _speed_text(model, cell),
                         _answer(memory, fmt_change, "more", "less"),
                         _answer(energy, fmt_change, "more", "less"),
                         _parity_text(run, name, policy)])
    return body


def summary(run: Run) -> list[str]:
    """The Summary section's lines."""
    mem_label = _memory_column(run)[1]
    lines = ["## Summary", ""]
    body = summary_rows(run)
    if body:
        lines += [f"Each reduced precision against {REFERENCE} at the largest batch both ran: "
                  f"point estimate and interval ({noise.Z:g} standard errors, on the log "
                  "scale); **bold** and *faster*/*slower* where the interval excludes no "
                  "change, *within noise* where it does not (not a finding). Accuracy: the "
                  "parity verdict against FP32's seed band.", "",
                  tabulate(body, headers=["model", "policy", "compared at",
                                          f"speedup over {REFERENCE}",
                                          f"{mem_label} change", "energy per sample change",
                                          "accuracy (parity)"],
                           tablefmt="github", disable_numparse=True), ""]
        if on_cpu(run) and (run.cells["precision"] == "tf32").any():
            lines += ["tf32 on a CPU is fp32 (TF32 is a GPU tensor-core format): its row "
                      "measures fp32 against itself, a check on the noise.", ""]
    else:
        lines += ["No benchmark cells in this run.", ""]
    lines += numerics.block(run)  # beside the parity verdicts: did the steps stay finite?
    failures = _parity_failures(run)
    if failures:
        lines += [f"**Parity FAIL:** {'; '.join(failures)}.", ""]
    counts = run.cells["status"].value_counts()
    failed = [f"{int(counts[s])} {s}" for s in store.FAILED if s in counts]
    lines += [f"{len(run.cells)} cells: {int(counts.get('ok', 0))} ok"
              + (", " + ", ".join(failed) if failed else "") + ".", ""]
    beside = int(run.cells["co_scheduled"].sum()) if "co_scheduled" in run.cells else 0
    if beside:
        lines += [f"{beside} of {len(run.cells)} cells ran beside others on this node's other "
                  "devices (`run --devices`): their numbers include their neighbours' share "
                  "of power, heat and host (see the notes under the tables).", ""]
    return lines


def _parity_failures(run: Run) -> list[str]:
    if run.parity is None:
        return []
    fails = run.parity[run.parity["verdict"] == "FAIL"]
    out = []
    for _, row in fails.iterrows():
        detail = ""
        if is_num(row["delta"]):
            detail = f" (eval loss {row['delta']:+.3g} vs fp32"
            detail += f", tolerance {row['tolerance']:.3g})" if is_num(row["tolerance"]) else ")"
        if is_num(row["nonfinite_steps"]) and row["nonfinite_steps"] > 0:
            detail += f", {int(row['nonfinite_steps'])} non-finite steps"
        out.append(f"{row['model']} {row['precision']}{detail}")
    return out


# ------------------------------------------------------------------------------ headline


@dataclass(frozen=True)
class Headline:
    """A model's best numbers over FP32 across its cells, and its parity verdicts: a line of
    results/README.md, the index of published runs."""

    model: str
    speedup: str
    memory_saving: str
    energy_saving: str
    parity: str


_SHOWN = 0.005  # the smallest change a headline shows as a number: 1% or 0.01x after rounding


def _contended(model: _Model, cell: pd.Series) -> bool:
    """The cell, or the fp32 cell it is compared with, ran beside others' work."""
    fp32 = _same_key(model, cell, REFERENCE)
    return bool(cell["contended"] or (fp32 is not None and fp32["contended"]))


def _best(model: _Model, ratio_of: Any, better: int, fmt: Any) -> str:
    """The best of ``ratio_of(cell)`` over ok non-fp32 cells that is beyond noise in the good
    direction (``better`` +1: above 1; -1: below 1), as 'text (policy, batch N)'; 'none beyond
    noise' when no cell's interval excludes no change that way, 'n/a' when nothing compares."""
    candidates = [cell for _, cell in model.cells.iterrows()  # emulated speed is no finding
                  if cell["status"] == "ok" and cell["precision"] != REFERENCE
                  and not cell["emulated"]]
    found = [(r, cell) for cell in candidates
             if not _contended(model, cell) and (r := ratio_of(cell)) is not None]
    if not found:
        left_out = any(_contended(model, cell) for cell in candidates)
        return "n/a" + (" (contended cells left out)" if left_out else "")
    good = [(r, cell) for r, cell in found
            if r.beyond_noise and (r.value - 1) * better >= _SHOWN]
    if not good:
        known = any(r.known for r, _ in found)
        return "none beyond noise" if known else "not judged (noise not measured)"
    ratio, cell = max(good, key=lambda item: (item[0].value - 1) * better)
    mark = f" {THROTTLED_MARK}" if cell["throttled"] else ""
    text = fmt(ratio).replace("**", "")  # every headline is beyond the noise: no bold
    return f"{text} ({_label(cell, model.row_keys)}){mark}"


def _parity_summary(run: Run, name: str) -> str:
    if run.parity is None:
        return "not run"
    rows = run.parity[run.parity["model"] == name]
    if rows.empty:
        return "not run"
    parts = []
    for verdict in ("FAIL", "INCONCLUSIVE"):
        policies = _ordered(rows.loc[rows["verdict"] == verdict, "precision"])
        if policies:
            parts.append(f"{verdict}: {', '.join(policies)}")
    judged = rows[rows["verdict"] != ""]
    if not parts:
        return f"PASS ({len(judged)} policies)" if len(judged) else "no verdicts"
    return "; ".join(parts)


def headline(run: Run) -> list[Headline]:
    """Per model: best speedup, memory change and energy change over FP32 beyond the noise,
    parity verdicts."""
    mem_column, _ = _memory_column(run)
    out = []
    for name in run.cells["model"].drop_duplicates():
        model = _model(run, name)
        out.append(Headline(
            model=name,
            speedup=_best(model, lambda c, m=model: _speedup(m, c, REFERENCE), +1, fmt_ratio),
            memory_saving=_best(model, lambda c, m=model: _versus(m, c, REFERENCE, mem_column),
                                -1, fmt_change),
            energy_saving=_best(model, lambda c, m=model: _versus(m, c, REFERENCE,
                                                                  "joules_per_sample"),
                                -1, fmt_change),
            parity=_parity_summary(run, name),
        ))
    return out
