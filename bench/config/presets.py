"""Named presets: each a function returning a Matrix (``preset(name)``), torch-free; ``auto``
takes whether CUDA is present, which the runner asks a child process (bench/cell/probe.py)."""

from __future__ import annotations

from collections.abc import Callable

from bench import BadInput
from bench.config.matrix import NODE, Matrix, ModelAxis

# The FP8 recipe family the GPU presets compare (bench/cell/low_precision.py): float8
# tensorwise, rowwise, rowwise with a bf16 weight gradient, tensorwise behind torchtitan's layer
# filter, and the Blackwell formats (compute capability 10.0+; `unsupported` records elsewhere).
FP8_FAMILY = ("fp8", "fp8-rowwise", "fp8-rowwise-gw-hp", "fp8-filtered", "mxfp8", "nvfp4")


def gpu() -> Matrix:
    """The GPU sweep: full-size reference models, the four main policies and the FP8 family,
    eager and torch.compile (what people train with today), and llama-1b (Llama-3.2-1B's
    shape), ten times their size: under fp32 its batch of 4 x 2048 tokens needs an estimated
    60 GiB (weights, gradients and AdamW's state alone are 20), so on a smaller GPU its larger
    batches are ``oom`` records and the sweep goes on.

    FP8 is meant to run compiled: torch.compile fuses torchao's amax, scale and cast kernels
    around each FP8 matmul, which eager runs one by one; the eager FP8 cells show that cost.
    The FP8 cells need torchao (``pip install -e .[fp8]``) and compute capability 8.9+, mxfp8
    and nvfp4 10.0+ (Blackwell); without them they are ``unsupported`` records in seconds and
    the sweep goes on.
    """
    return Matrix(
        name="gpu",
        models=(
            ModelAxis("resnet50", (32, 64, 128, 256), 224),
            ModelAxis("bert-base", (16, 32, 64, 128), 128),
            ModelAxis("gpt2-small", (4, 8, 16, 32), 1024),
            ModelAxis("llama-small", (4, 8, 16, 32), 1024),
            ModelAxis("llama-1b", (1, 2, 4), 2048),
        ),
        precisions=("fp32", "tf32", "fp16", "bf16", *FP8_FAMILY),
        compile=(False, True),
        device="cuda", warmup=10, steps=50, timeout_s=900.0, parity=True,
        parity_tasks=("gpt2-small-shakespeare",),  # real text: Tiny Shakespeare, 600 steps
    )


def cpu() -> Matrix:
    """The four tiny models (ResNet, BERT, GPT-2, Llama), batch 4 and 8, fp32, fp16 and bf16:
    24 cells, then parity on the tiny tasks and Tiny Shakespeare: 6 min 46 s on 2 idle AMD EPYC
    cores (2026-12-07; docs/runner.md).

    No tf32: on a CPU it is fp32 (TF32 is a GPU tensor-core format), a second fp32 measurement
    whose time went to llama-tiny, the family trained in bf16 today (the calibration cell
    measures the machine's noise). The fp16-noscale ablation is judged where its question is
    live, in parity's underflow task (bench/parity/__init__.py, task_policies): on the tiny
    tasks it passes trivially (their gradients are large), and its FP16 runs are the slowest on
    a CPU without FP16 matmuls (7x fp32's steps on AMD EPYC), which this preset's minutes cannot
    afford twice. Not FP8: off CUDA torchao only emulates it, slowly, and emulated speed says
    nothing (``--precisions fp8`` runs it anyway, for its numerics)."""
    return Matrix(
        name="cpu",
        models=(
            ModelAxis("resnet-tiny", (4, 8), 32),
            ModelAxis("bert-tiny", (4, 8), 32),
            ModelAxis("gpt2-tiny", (4, 8), 64),
            ModelAxis("llama-tiny", (4, 8), 64),
        ),
        precisions=("fp32", "fp16", "bf16"),
        device="cpu", warmup=5, steps=30, timeout_s=300.0, parity=True,
        parity_tasks=("gpt2-tiny-shakespeare",),
    )


def cpu_shakespeare() -> Matrix:
    """Parity on real text on a CPU: gpt2-tiny's cells at batch 8 under fp32 and bf16, then
    parity on its generated task and on Tiny Shakespeare (``gpt2-tiny-shakespeare``: 200
    steps of 32 x 64 characters, FP32 from ln 65 = 4.17 to about 2.45 nats per character),
    with the text each policy's model wrote in the report's appendix: real data in a minute
    (59 s on 2 idle AMD EPYC cores, 2026-12-07: each Shakespeare run 3.5-5 s; the cpu preset
    runs the same task beside fp16). FP32 ended at 2.458 nats per character (seed std 0.043,
    tolerance 0.128), bf16 at 2.453: PASS."""
    return Matrix(
        name="cpu-shakespeare",
        models=(ModelAxis("gpt2-tiny", (8,), 64),),
        precisions=("fp32", "bf16"),
        device="cpu", warmup=5, steps=30, timeout_s=300.0, parity=True,
        parity_tasks=("gpt2-tiny-shakespeare",),
    )


def gpu_quick() -> Matrix:
    """A complete GPU run in about 20 minutes (three `--time-budget 9m` commands): the
    full-size models at one realistic batch each under fp32, tf32, fp16 and bf16, bf16 also
    under torch.compile, the FP8 family under torch.compile only, a short parity.

    Batches are per-GPU batches people train with, and each fits in fp32 on a 40 GB GPU:
    ResNet-50 256 at 224 px (NVIDIA DeepLearningExamples' per-GPU batch), BERT-base 64 at
    sequence 128 (a phase-1 pre-training micro-batch), GPT-2 small 16 at 1024 tokens
    (nanoGPT's 124M recipe uses 12), Llama small (the same size, every matrix dimension a
    multiple of 128) the same. Parity trains 2 seeds x 40 steps (the gpu preset: 3 x
    600): enough to see the path work and a gross divergence, not a fine verdict.

    Estimate for an H100 SXM, to be confirmed by the first GPU run (docs/gpu-runbook.md).
    Training FLOPs per step (models/): ResNet-50 6.3 T, BERT-base 5.5 T, GPT-2 small 14.0 T,
    Llama small 11.7 T. At public eager-PyTorch rates (fp32 ~30 TFLOP/s, 45% of the 67 peak;
    tf32 ~60 for ResNet-50 and ~130 for the transformers; fp16 and bf16 ~75 for ResNet-50,
    about 3,000 images/s, and ~250 for the transformers) a step takes 0.47 s (GPT-2 small fp32)
    down to 0.02 s (BERT-base bf16), and the 25 steps of each process train for ~65 s in all. Per
    process ~8 s more (Python, torch and CUDA start, model build, FLOP count, cuDNN autotuning):
    ~175 s for 22 processes (20 cells, 2 calibration). Compiling forward and backward with an
    empty inductor cache: ~220 s for the four bf16 compiled cells. Parity: 32 runs (4 models x
    4 policies x 2 seeds) in ~110 s, mostly model builds, evaluation and batches made on the
    CPU. Runner start and report ~15 s. Total ~10 minutes; compile time is the least certain
    part. ``timeout_s`` (180 s) is what ``--time-budget`` allows the first cell, the first
    compiled cell and the first torchrun cell; later ones are estimated from those
    (bench/run/budget.py, estimate_s).

    FP8 (an estimate, not yet measured anywhere): on an H100 the four float8 recipes train 12
    compiled cells (ResNet-50's are `unsupported`: no convertible Linear) at ~55 s of compiling
    and ~8 s of start-up each, ~13 minutes, and 32 more parity runs (eager), ~2 minutes; mxfp8
    and nvfp4 are `unsupported` records in seconds (compute capability 10.0+): ~25 minutes in
    all. Without torchao every FP8 cell is an `unsupported` record in seconds. Parity's
    underflow task adds 2 seeds x 60 steps of gpt2-tiny per policy: seconds on a GPU.
    """
    return Matrix(
        name="gpu-quick",
        models=(
            ModelAxis("resnet50", (256,), 224),
            ModelAxis("bert-base", (64,), 128),
            ModelAxis("gpt2-small", (16,), 1024),
            ModelAxis("llama-small", (16,), 1024),
        ),
        # fp8 and fp8-rowwise only compiled: torch.compile is how FP8 is meant to run fast
        # (it fuses torchao's scale and cast kernels); they need torchao (a wheel carried to
        # the box) and compute capability 8.9+, else they are `unsupported` records.
        precisions=("fp32", "tf32", "fp16", "bf16", *FP8_FAMILY),
        compile=(False, True), compile_precisions=("bf16", *FP8_FAMILY),
        compile_only=FP8_FAMILY,
        device="cuda", warmup=5, steps=20, timeout_s=180.0, calibration=2,
        parity=True, parity_steps=40, parity_seeds=2,
    )


# The recipes gpu-fsdp2 compares: bf16 autocast over fp32 master weights, bf16 weights with no
# fp32 masters (rounded to nearest, stochastically rounded, Kahan-summed), and the FP8 family.
BF16_FAMILY = ("bf16", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan")


def gpu_fsdp2() -> Matrix:
    """Today's training recipes under the two ways a node's GPUs share a model: on the Llama
    family, bf16 autocast (fp32 master weights) against bf16-pure, bf16-pure-sr and
    bf16-pure-kahan (bf16 weights, no fp32 masters) and the FP8 family, each under DDP (the
    reference: every rank a whole replica) and under FSDP2 with torchtitan's
    MixedPrecisionPolicy (``fsdp2:bf16/fp32``: parameters gathered in bf16, gradients
    reduce-scattered in fp32), on every GPU of the node: world size ``node``, counted when the
    run starts (a 1-GPU box runs each policy once, on its GPU, with no strategy to compare;
    ``--world-size 1,node`` adds the single-GPU cells the report's scaling table measures
    against). The bf16 family runs eager and compiled, the FP8 family compiled only (as in
    gpu-quick: torch.compile fuses torchao's scale and cast kernels); FP8 needs torchao and
    compute capability 8.9+, mxfp8 and nvfp4 10.0+, else `unsupported` records in seconds.

    Batches are per GPU: llama-small 16 x 1024 tokens (gpu-quick's, so its one-GPU numbers
    compare; 16k tokens per GPU, about nanoGPT's micro-batch), llama-1b 4 x 2048 (8k tokens per
    GPU, the gpu preset's largest: under DDP each rank holds the 1.24B weights, gradients and
    AdamW state, ~20 GiB with fp32 masters, and its activations, the gpu preset's estimated
    60 GiB in all under fp32 and less under bf16, which an 80 GB GPU fits; FSDP2 holds 1/N of
    the states, bf16-pure half of them in any case). Not fp16: FP16 autocast over
    parameters gathered in bf16 computes from bf16-rounded weights, which fsdp2:bf16/fp32
    refuses (bench/strategy.py), and today's recipes are bf16 and FP8.

    Time, an estimate not yet measured anywhere: on an 8-GPU H100 node, 56 torchrun cells of 8
    ranks (2 models x 2 strategies x 14: 4 eager, 4 + 6 compiled; mxfp8 and nvfp4 `unsupported`
    in seconds). A rank's step is 11.7 TFLOP (llama-small) or 67 TFLOP (llama-1b), at ~250-400
    TFLOP/s 0.03-0.3 s, so 40 steps are seconds; start-up (torch, NCCL, model build, ~30 s)
    and compiling (~60-120 s a compiled cell, with an empty inductor cache) dominate: ~35 min
    for llama-small, ~45 min for llama-1b, then parity under fsdp2:bf16/fp32 on the node's
    ranks (each policy, fp32 too, 2 seeds, llama-small 600 steps and llama-1b 300 steps, and
    the low-lr task that judges the bf16-pure policies, against fp32 in one process) ~25
    min: ~1 h 45 min. On one H100: 28 single-process cells, ~30 min, 2 calibration processes
    and the same parity with FSDP2 on one rank (its MixedPrecisionPolicy still applies): ~1
    hour. ``timeout_s`` (600 s), about three times the slowest cell's estimate, is what
    --time-budget allows the first cell of each kind (bench/run/budget.py).
    """
    return Matrix(
        name="gpu-fsdp2",
        models=(
            ModelAxis("llama-small", (16,), 1024),
            ModelAxis("llama-1b", (4,), 2048),
        ),
        precisions=(*BF16_FAMILY, *FP8_FAMILY),
        compile=(False, True), compile_only=FP8_FAMILY,
        world_size=(NODE,), strategies=("ddp", "fsdp2:bf16/fp32"),
        device="cuda", warmup=10, steps=30, timeout_s=600.0, calibration=2,
        # Parity under torchtitan's policy: every recipe trained sharded on the node's GPUs
        # (up to the widest cell, as many as split the parity batches), judged against FP32
        # in one process (bench/parity/sharing.py).
        parity=True, parity_seeds=2, parity_strategy="fsdp2:bf16/fp32",
    )


def cpu_fsdp2() -> Matrix:
    """gpu-fsdp2's question on a CPU: llama-tiny under fp32, bf16 autocast and the pure-bf16
    policies (bf16 weights, no fp32 masters: to nearest, stochastically rounded,
    Kahan-summed), each on 2 ranks over gloo under ``ddp`` and ``fsdp2:bf16/fp32``
    (torchtitan's MixedPrecisionPolicy), then parity with every policy trained under
    fsdp2:bf16/fp32 on 2 ranks against fp32 in one process, on llama-tiny's task and on the
    low-learning-rate task where bf16-pure fails and its two remedies pass. The speeds are a
    CPU's (bf16 matmuls emulated or slow, gloo's collectives): the memory per rank, the
    optimizer state by dtype and the parity verdicts are what carry over to a GPU. Not FP8
    (emulated off CUDA: ``--precisions fp8`` adds it, slowly). 10 cells, 4 calibration
    processes and 36 parity runs: 5 min 46 s on 2 idle Intel Xeon cores (2026-12-07,
    results/intel-xeon/2026-12-07); one rank of bf16-pure under FSDP2
    holds 0.4 MiB of weights and AdamW state, fp32 under DDP 1.5; bf16-pure FAILs the low-lr
    task under fsdp2:bf16/fp32 (+0.366 nats), -sr and -kahan PASS."""
    return Matrix(
        name="cpu-fsdp2",
        models=(ModelAxis("llama-tiny", (8,), 64),),
        precisions=("fp32", "bf16", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan"),
        world_size=(2,), strategies=("ddp", "fsdp2:bf16/fp32"),
        device="cpu", warmup=5, steps=30, timeout_s=300.0,
        parity=True, parity_strategy="fsdp2:bf16/fp32",
    )


def quick() -> Matrix:
    """A handful of tiny cells for smoke tests."""
    return Matrix(
        name="quick",
        models=(ModelAxis("gpt2-tiny", (2,), 64), ModelAxis("resnet-tiny", (2,), 32)),
        precisions=("fp32", "bf16"),
        device="cpu", warmup=1, steps=3, timeout_s=120.0, parity=False, calibration=0,
    )


def auto(has_cuda: bool) -> Matrix:
    """gpu where CUDA is available, cpu otherwise. ``has_cuda`` is torch's answer, asked in a
    child process (bench/cell/probe.py), so that no torch is imported here."""
    return gpu() if has_cuda else cpu()


PRESETS: dict[str, Callable[..., Matrix]] = {"gpu": gpu, "gpu-quick": gpu_quick,
                                            "gpu-fsdp2": gpu_fsdp2, "cpu": cpu,
                                            "cpu-shakespeare": cpu_shakespeare,
                                            "cpu-fsdp2": cpu_fsdp2,
                                            "quick": quick, "auto": auto}


def preset(name: str) -> Matrix:
    """The preset called ``name``; unknown names raise BadInput listing the valid ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise BadInput(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}") from None
