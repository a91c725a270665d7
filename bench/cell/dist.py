"""A cell on several processes: torchrun's ranks, the process group, and one measurement of all.

Under torchrun (``torchrun --nproc-per-node 2 -m bench cell ...``) every process is a rank with
its own GPU (NCCL) or CPU (gloo) and trains a DistributedDataParallel replica. ``process_group``
opens the group and closes it on every way out; ``gather`` and ``combine_ranks`` make rank 0's
record from every rank's measurement: the slowest rank's step times (raw list included), the
largest peak memory, power and energy summed over the GPUs.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bench import store
from bench.run import proctree
from bench.telemetry.monitor import combine_power

COLLECTIVE_TIMEOUT_S = 600.0  # a rank's wait for its peers, without a runner's timeout
# DDP waits for the GPU in the forwards of its first 11 synced steps (runtime statistics
# that time the step before): with DDP, the warmup runs at least these.
DDP_SYNCING_STEPS = 11
# A rank's timing fields that go together: the slowest rank's set becomes the record's.
_TIMING = (*store.STEP_STATS, store.STEP_TIMES, "host_ms_median", "queued_ms_median",
           "host_bound")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks torchrun set in the environment, or None for a plain single process."""
        if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return cls(int(os.environ.get("RANK", "0")), int(os.environ["LOCAL_RANK"]),
                   int(os.environ["WORLD_SIZE"]))


def warmup_steps(asked: int, ranks: Ranks | None) -> int:
    """The warmup a cell runs: under DDP at least DDP_SYNCING_STEPS."""
    return max(asked, DDP_SYNCING_STEPS) if ranks is not None else asked


@contextmanager
def process_group(device: Any, ranks: Ranks | None) -> Iterator[None]:
    """torch.distributed's process group for a torchrun job (NCCL on GPU, gloo on CPU), gone
    on every way out, so that no peer waits for this rank; nothing for a single process."""
    if ranks is None:
        yield
        return
    from datetime import timedelta

    import torch.distributed as dist

    cuda = device.type == "cuda"  # run_cell made it the current device
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                            timeout=timedelta(seconds=collective_timeout_s()))
    failed = True
    try:
        yield
        # Only when all went well: no rank tears down its connections while another still
        # uses them. After a failure the other ranks may be gone: no barrier then.
        dist.barrier()
        failed = False
    except BaseException as exc:
        # The failed step's frames hold the DDP replica: freed after the group is gone, it
        # can abort the process. What the record needs is the exception's text alone.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        _close_group(failed)


def collective_timeout_s() -> float:
    """How long a rank waits for its peers: below the cell's own deadline (the runner's
    proctree.TIMEOUT_ENV), so that a wait for a dead peer ends in an error, not a kill; without
    a runner, 600 s, not NCCL's 10 minutes and gloo's 30."""
    try:
        cell_s = float(os.environ.get(proctree.TIMEOUT_ENV) or 0)
    except ValueError:
        cell_s = 0.0
    return 0.9 * cell_s if 0 < cell_s < float("inf") else COLLECTIVE_TIMEOUT_S


def _close_group(failed: bool) -> None:
    """Destroy the process group; after a failure on NCCL, abort it: NCCL's destroy first
    waits for this rank's collectives in flight, which a failed peer may never join."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    abort = getattr(distributed_c10d, "_abort_process_group", None)  # NCCL only, experimental
    if failed and abort is not None and dist.get_backend() == "nccl":
        abort()
    else:
        dist.destroy_process_group()


def wait_for_peers(ranks: Ranks | None) -> None:
    """A barrier under torchrun (every rank starts its next phase together); nothing alone."""
    if ranks is not None:
        import torch.distributed as dist

        dist.barrier()


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, on every rank."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def combine_ranks(per_rank: list[dict[str, Any]], num_samples: int) -> dict[str, Any]:
    """One measurement from every rank's: the slowest rank's step times (it sets the pace of
    the job), the largest peak memory (and the smallest rank's), power and energy summed over
    the GPUs."""
    slowest = max(per_rank, key=lambda m: m["step_ms_median"])
    memory = {field: max((m[field] for m in per_rank if m[field] is not None), default=None)
              for field in store.PEAK_MEMORY}
    # The smallest rank's peak beside the largest: how evenly the ranks carry the cell.
    own = [m["peak_mem_allocated_gib"] if m["peak_mem_allocated_gib"] is not None
           else m["peak_rss_gib"] for m in per_rank]
    memory["peak_mem_rank_min_gib"] = min((v for v in own if v is not None), default=None)
    return {**{f: slowest.get(f) for f in _TIMING},
            **memory, **combine_power(per_rank, num_samples)}
