"""What a failed cell died of, read from its error text: the one place that says what is an OOM.

A cell classifies its own exception (bench/cell/main.py) and the runner the stderr of a child that
left no record (bench/run/sweep.py); both ask ``is_oom``, so a cell is ``oom`` the same way
whichever side sees it, and ``--find-max-batch`` stops at the first batch that does not fit.
torch-free.
"""

from __future__ import annotations

import re

# Running out of memory, by where it surfaces. A failure that does not depend on the batch
# (NCCL's "Cannot allocate memory" for a /dev/shm that is too small) is deliberately not here:
# as oom it would skip every larger batch.
_OOM = re.compile(
    r"OutOfMemoryError"  # torch.OutOfMemoryError, from the caching allocator
    r"|out of memory"  # CUDA and HIP runtimes; NCCL's "Cuda failure 'out of memory'"
    r"|can't allocate memory|not enough memory: you tried"  # torch's CPU allocator
    r"|[A-Z]+_STATUS_ALLOC_FAILED"  # cuBLAS, cuDNN 8, cuSPARSE, cuSOLVER handles, workspaces
    r"|[A-Z]+_STATUS_INTERNAL_ERROR_(?:HOST|DEVICE)_ALLOCATION_FAILED"  # cuDNN 9
    r"|NOT_ENOUGH_WORKSPACE"  # a cuDNN workspace that could not be had
    r"|Failed to CUDA (?:calloc|malloc|host alloc)"  # NCCL's own buffers
)


def is_oom(text: str) -> bool:
    """Whether an error message or a stderr says the process ran out of memory."""
    return _OOM.search(text) is not None
