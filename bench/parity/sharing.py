"""Parity on several ranks: which runs train under a strategy, on how many ranks. torch-free.

``ampbench parity --strategy S --ranks N`` (and a matrix's ``parity_strategy``) trains every
policy, FP32 too, on N torchrun processes that share the model as S says (FSDP2 shards under
its MixedPrecisionPolicy, or DDP replicas: bench/strategy.py), each rank its slice of every
batch (bench/parity/train.py). FP32 also trains in one process, the reference band every row
is judged against, as always: a sharded policy passes only if it reaches what plain FP32
training reaches. The rows read ``POLICY@STRATEGY`` (tasks.run_label).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench import BadInput
from bench.parity.tasks import run_label
from bench.strategy import Strategy
from bench.strategy import parse as parse_strategy


@dataclass(frozen=True)
class Sharing:
    """Every policy trains under ``strategy`` on ``ranks`` torchrun processes; with
    ``fit`` (a run's matrix, whose widest cell says ``ranks``) on the most ranks up to
    ``ranks`` that split every parity batch evenly."""

    strategy: Strategy
    ranks: int = 2
    fit: bool = False

    @classmethod
    def parse(cls, text: str, ranks: int, fit: bool = False) -> Sharing:
        """``--strategy TEXT --ranks N``, checked: BadInput (one line) for either."""
        try:
            shared = parse_strategy(text)
        except ValueError as exc:
            raise BadInput(f"--strategy: {exc}") from None
        if ranks < 1:
            raise BadInput(f"--ranks must be at least 1, got {ranks}")
        return cls(shared, ranks, fit)

    @classmethod
    def of_matrix(cls, text: str, world_sizes: Sequence[int]) -> Sharing | None:
        """A run's parity on several ranks: its matrix's ``parity_strategy`` (None when "")
        on as many ranks as its widest cell, fitted to the GPUs and batches."""
        return cls.parse(text, max(world_sizes), fit=True) if text else None

    def checked(self, device: str, device_count: int | None,
                batches: dict[str, int]) -> Sharing:
        """These ranks on ``device`` (the plan's: cpu, cuda, cuda:N; ``device_count`` GPUs
        seen there) for the parity ``batches`` (model -> batch size); BadInput (one line) for
        more ranks than GPUs, one GPU named for several ranks, or a batch they cannot split
        evenly. With ``fit`` the ranks come down to what fits instead."""
        ranks = self.ranks
        if self.fit:
            ranks = min(ranks, device_count or ranks) if device.startswith("cuda") else ranks
            ranks = max(r for r in range(1, ranks + 1)
                        if all(batch % r == 0 for batch in batches.values()))
        if device.startswith("cuda:") and ranks > 1:
            raise BadInput(f"--ranks {ranks}: each rank trains on the GPU of its local rank; "
                           f"use --device cuda, not {device}")
        if device.startswith("cuda") and device_count is not None and ranks > device_count:
            raise BadInput(f"--ranks {ranks}: one GPU each, and this machine shows "
                           f"{device_count}")
        for model, batch in batches.items():
            if batch % ranks:
                raise BadInput(f"--ranks {ranks}: {model}'s parity batch of {batch} does not "
                               "split evenly over the ranks; choose ranks that divide it")
        return replace(self, ranks=ranks)


def labels(policies: Sequence[str], sharing: Sharing | None) -> list[tuple[str, int]]:
    """(run label, ranks: 0 for one process) of each of ``policies`` parity trains on a
    model: in one process, or with ``sharing`` FP32 in one process (the reference) and every
    policy, FP32 too, under the strategy on its ranks."""
    if sharing is None:
        return [(name, 0) for name in policies]
    shared = sharing.strategy.name
    return [("fp32", 0)] + [(run_label(name, shared), sharing.ranks) for name in policies]
