"""Training-step micro-benchmarks with pytest-benchmark: tiny models x policies, CPU and CUDA.

    nox -s perf                                   # run them (pytest -m perf --benchmark-only)
    nox -s perf -- --benchmark-autosave           # keep the result in .benchmarks/
    nox -s perf -- --benchmark-compare --benchmark-compare-fail=median:5%
    pytest-benchmark compare                      # table of the saved results

These complement the matrix runner: one process, no NVML windows per cell, pytest-benchmark's
storage and comparison. Each round is one optimizer step followed by a device synchronize, so
the host clock covers the GPU's work, not just its launch. ``extra_info`` of each result
carries samples/s (batch over the median round), peak memory and, with NVML, power.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bench import precision  # noqa: E402  (after the importorskip above)
from bench.cell.timing import peak_memory, reset_peak_memory  # noqa: E402
from bench.cell.train import prepare  # noqa: E402
from bench.telemetry.monitor import PowerMonitor  # noqa: E402

pytestmark = pytest.mark.perf

MODELS = ("resnet-tiny", "bert-tiny", "gpt2-tiny")
POLICIES = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
BATCH_SIZE = 8
WARMUP_ROUNDS = 3
ROUNDS = 20


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model", MODELS)
def test_train_step(benchmark, model: str, policy: str, device: str) -> None:
    dev = torch.device(device)
    reason = precision.get(policy).unsupported_reason(dev)
    if reason:
        pytest.skip(reason)
    trainer = prepare(model, policy, BATCH_SIZE, device=dev)
    trainer.step()  # first call allocates optimizer state and picks kernels: keep it out
    trainer.sync()
    reset_peak_memory(dev)
    losses = []

    def one_step() -> None:
        losses.append(trainer.step())
        trainer.sync()  # pytest-benchmark times on the host: wait for the device's work

    # Group by device and model so a comparison table puts the policies side by side.
    benchmark.group = f"{device} {model} b={BATCH_SIZE}"
    # By UUID, as the cell does: torch's cuda:N need not be NVML's GPU N.
    gpu = str(torch.cuda.get_device_properties(dev).uuid) if dev.type == "cuda" else None
    monitor = PowerMonitor(gpu)
    monitor.measure_idle()
    with monitor:
        benchmark.pedantic(one_step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    num_samples = BATCH_SIZE * len(losses)
    power = monitor.fields(num_samples)
    benchmark.extra_info.update(
        model=model, precision=policy, device=device, batch_size=BATCH_SIZE,
        **peak_memory(dev),  # on CPU: the peak RSS of this whole pytest process
        **{k: power[k] for k in ("power_avg_w", "joules_per_sample", "energy_source",
                                 "throttled")},
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["samples_per_s"] = BATCH_SIZE / benchmark.stats.stats.median

    # A benchmark of a step that diverged would time the wrong thing.
    assert torch.isfinite(torch.stack(losses)).all(), f"non-finite loss under {policy}"
