"""Parity on real data in the report: the line that says what a real-data task's eval loss is
measured on, and the appendix with the text each policy's model wrote (parity_samples.csv)
and the data files the runs read (parity_data.json). torch-free."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bench.parity import data
from bench.parity.stage import DATA_FILES, SAMPLE_COLUMNS, SAMPLES
from bench.report.formats import is_num
from bench.report.loading import Run, _ordered

_FENCE = "````"  # four backticks: generated text never closes it by accident


def describe(name: str) -> str | None:
    """What a real-data task's eval loss is measured on; None for a generated task."""
    if name in data.SHAKESPEARE_TASKS:
        return (f"Eval loss in nats per character on Tiny Shakespeare's last "
                f"{1 - data.TRAIN_FRACTION:.0%} (fixed windows; the first "
                f"{data.TRAIN_FRACTION:.0%} trains); a model that learnt nothing scores "
                "ln 65 = 4.17. The text each policy's model wrote is in the appendix.")
    if name in data.CIFAR_TASKS:
        return ("Eval loss and accuracy on CIFAR-10's test_batch.bin (from --data-dir), "
                "trained on data_batch_1..5.bin.")
    if name in data.TOKEN_TASKS:
        return ("Eval loss in nats per token on val.bin (fixed windows; from --data-dir), "
                "trained on train.bin.")
    return None


def _samples(run: Run) -> pd.DataFrame | None:
    path = run.path / SAMPLES
    if not run.path.is_dir() or not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    if frame.empty or not set(SAMPLE_COLUMNS) <= set(frame.columns):
        return None
    return frame


def _files(run: Run) -> list[dict[str, Any]]:
    path = run.path / DATA_FILES
    if not run.path.is_dir() or not path.is_file():
        return []
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files or [] if isinstance(f, dict) and "path" in f]


def _judged(run: Run, model: str, policy: str) -> str:
    """'FAIL, eval loss 3.912' from parity.csv's row of (model, policy)."""
    row = run.parity_row(model, policy)
    if row is None:
        return ""
    verdict = row["verdict"] or ("reference" if policy == "fp32" else "")
    loss = f"eval loss {row['eval_loss']:.4g}" if is_num(row["eval_loss"]) else ""
    return ", ".join(p for p in (verdict, loss) if p)


def appendix(run: Run) -> list[str]:
    """The report's appendix: generated text per task and policy, and the data files read;
    [] when the run has neither."""
    frame, files = _samples(run), _files(run)
    if frame is None and not files:
        return []
    lines = ["## Appendix: parity on real data", ""]
    if files:
        lines += ["Data files the parity runs read:", ""]
        for item in files:
            size = f"{int(item['bytes']):,} bytes" if is_num(item.get("bytes")) else ""
            sha = f", sha256 {item['sha256']}" if item.get("sha256") else ""
            tasks = f" ({', '.join(item['tasks'])})" if item.get("tasks") else ""
            lines.append(f"- `{item['path']}`: {size}{sha}{tasks}")
        lines.append("")
    if frame is not None:
        lines += ["Text each policy's model wrote after training (seed 0; seeded sampling at "
                  f"temperature 0.8, {data.SAMPLE_CHARS} characters after the prompt, the same "
                  "random numbers for every policy): a policy that FAILs shows it here as "
                  "text that is not English.", ""]
        for model in frame["model"].drop_duplicates():
            rows = frame[frame["model"] == model]
            lines += [f"### {model}", ""]
            for policy in _ordered(list(rows["precision"].drop_duplicates())):
                row = rows[rows["precision"] == policy].iloc[0]
                judged = _judged(run, model, policy)
                lines += [f"**{policy}**" + (f" ({judged})" if judged else ""), "",
                          _FENCE, (row["prompt"] + row["text"]).replace(_FENCE, "'" * 4),
                          _FENCE, ""]
    return lines
