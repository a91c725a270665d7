"""A model's cells as the report's tables, summary and plots see them: its cells, the keys
that tell its rows apart, its policies in order and its units. torch-free."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.report.formats import is_num
from bench.report.loading import _SECONDARY, Run, _ordered


@dataclass(frozen=True)
class _Model:
    """What a model's tables need: its cells, row keys and units."""

    name: str
    cells: pd.DataFrame
    row_keys: list[str]
    policies: list[str]
    language: bool  # language models: tokens/s and joules per token

    @property
    def rate_column(self) -> str:
        if self.language and self.cells["tokens_per_s"].notna().any():
            return "tokens_per_s"
        return "samples_per_s"

    @property
    def rate_unit(self) -> str:
        return "tokens/s" if self.rate_column == "tokens_per_s" else "samples/s"

    @property
    def energy_unit(self) -> str:
        return "J/token" if self.language else "J/sample"

    def energy(self, cell: pd.Series) -> float:
        value = cell["joules_per_sample"]
        if self.language and is_num(cell["seq_len"]) and cell["seq_len"] > 0:
            return float(value) / float(cell["seq_len"])
        return float(value)


def _model(run: Run, name: str) -> _Model:
    cells = run.cells[run.cells["model"] == name]
    row_keys = ["batch_size"] + [k for k in _SECONDARY if cells[k].nunique(dropna=False) > 1]
    language = bool(cells["seq_len"].notna().any())
    return _Model(name, cells, row_keys, _ordered(cells["precision"]), language)
