import pytest

from bench import failures
from bench.cell.main import is_oom
from bench.run import launch

OOM = [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total "
    "capacity of 79.19 GiB of which 1.06 GiB is free.",
    "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:3356, unhandled "
    "cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.27.5\n"
    "ncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
    "Failed to CUDA calloc 6291456 bytes",
    "ncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
    "Cuda failure 'out of memory'",
    "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "1073741824 bytes. Error code 12 (Cannot allocate memory)",
    "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 512.00 MiB.",
]
NOT_OOM = [
    "RuntimeError: CUDA error: an illegal memory access was encountered",
    "RuntimeError: CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`",
    "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
    # Not the batch's fault: as oom it would skip every larger batch.
    "ncclSystemError: System call (e.g. socket, malloc) or external library call failed.\n"
    "Last error:\nError while creating shared memory segment /dev/shm/nccl-Xk2 (size 9637888)",
    "ValueError: shapes do not match",
]


@pytest.mark.parametrize("text", OOM)
def test_memory_failures_are_oom_for_the_cell_and_the_runner_alike(text):
    assert failures.is_oom(text)
    assert is_oom(RuntimeError(text))  # the cell's own exception
    assert launch.classify(1, f"Traceback (most recent call last):\n{text}\n")[0] == "oom"


@pytest.mark.parametrize("text", NOT_OOM)
def test_other_failures_are_errors(text):
    assert not failures.is_oom(text)
    assert not is_oom(RuntimeError(text))
    assert launch.classify(1, text)[0] == "error"
