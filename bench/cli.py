"""The ampbench command line: ``python -m bench COMMAND`` (or ``ampbench COMMAND``).

Thin by design: each command parses its flags here and hands them to the stage that owns it.
Bad input raises ``BadInput`` anywhere below; it becomes one line on stderr and exit code 2.
Every command's --help lists each flag's accepted values (from the presets', policies' and
models' registries) and its default, and ends with an example; a flag error names the command
(``ampbench run: error: ...``): bench/cli_help.py.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import BadInput
from bench.cli_help import (
    REFERENCES,
    Parser,
    by_preset,
    example,
    joined,
    model_names,
    model_or_reference,
    one_of,
    policy_names,
    preset_names,
)
from bench.cli_types import (
    comma_ints,
    comma_list,
    duration,
    non_negative_int,
    out_csv,
    out_dir,
    out_file,
    positive_float,
    positive_int,
    strategy_name,
    world_sizes,
)
from bench.run.cluster import EXECUTORS


def _add_cell(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cell", help="train one cell (model x precision x batch), write its record",
        description="Train one cell (model x precision policy x batch size) in this process: "
        "warmup steps, then a timed window measuring step time, memory, power and FLOPs. "
        "Writes one JSON record (also for a failed cell, exit 1); bad input exits 2.",
        epilog=example("ampbench cell --model gpt2-tiny --precision bf16 --batch-size 8 "
                       "--device cpu --out record.json"))
    p.add_argument("--model", required=True, **model_or_reference(),
                   help=f"the model: one of {joined(model_names())} (`ampbench models` "
                        f"describes each), or a module of your own: {REFERENCES} "
                        "(docs/your-model.md)")
    p.add_argument("--precision", required=True, **one_of(policy_names(), "precision"),
                   help="the precision policy")
    p.add_argument("--batch-size", type=positive_int, required=True,
                   help="samples per micro-batch")
    p.add_argument("--seq-len", type=positive_int,
                   help="tokens per sequence (language models; default: the model's)")
    p.add_argument("--image-size", type=positive_int,
                   help="image side in pixels (vision models; default: the model's)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--strategy", type=strategy_name, default="ddp", metavar="STRATEGY",
                   help="how ranks under torchrun share the model: ddp (default), fsdp2, or "
                        "fsdp2:PARAM/REDUCE with PARAM bf16|fp32 and REDUCE fp32|bf16 "
                        "(docs/runner.md); only under torchrun")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"),
                   help="image models' layout (default: channels_last on CUDA, contiguous on CPU)")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="untimed warmup steps")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the initial weights and the synthetic batches (default 0)")
    p.add_argument("--peak-tflops", type=positive_float,
                   help="override the device's dense peak TFLOP/s (default: the peak table's "
                        "for the device and policy; none known: no MFU)")
    p.add_argument("--power-interval-ms", type=positive_float, default=50.0,
                   help="NVML sampling period in ms")
    p.add_argument("--out", type=out_file, help="write the JSON record here (default: stdout)")
    p.add_argument("--run-id", default="", help=argparse.SUPPRESS)
    p.add_argument("--cell-id", default="", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=non_negative_int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(handler="bench.cell.main:main")


def _add_matrix_flags(p: argparse.ArgumentParser) -> None:
    """`run`'s flags that override the matrix's axes and settings."""
    p.add_argument("--models", type=comma_list,
                   help=f"comma-separated model names, of {joined(model_names())}, or "
                        f"modules of your own ({REFERENCES}; docs/your-model.md) (default: "
                        "the preset's or the matrix file's)")
    p.add_argument("--precisions", type=comma_list,
                   help=f"comma-separated policies, of {joined(policy_names())} (default: "
                        "the preset's or the matrix file's)")
    p.add_argument("--batch-sizes", type=comma_ints,
                   help="comma-separated batch sizes, for every model (default: each model's "
                        "in the preset or the matrix file)")
    p.add_argument("--steps", type=positive_int,
                   help=f"timed steps per cell ({by_preset('steps')})")
    p.add_argument("--warmup", type=non_negative_int,
                   help=f"warmup steps per cell ({by_preset('warmup')})")
    p.add_argument("--repeats", type=positive_int,
                   help=f"processes per cell ({by_preset('repeats')})")
    p.add_argument("--calibration", type=non_negative_int, metavar="N",
                   help="extra processes of a calibration cell that measure between-process "
                        f"noise when repeats < 3; 0: none ({by_preset('calibration')})")
    p.add_argument("--world-size", type=world_sizes,
                   help="processes per node, comma-separated; node: every GPU of this node, "
                        "counted when the run starts (1,node) (default: 1, or the preset's or "
                        "the matrix file's)")
    p.add_argument("--nnodes", type=positive_int,
                   help="nodes each multi-process cell spans (default: 1, or the matrix file's)")
    p.add_argument("--strategy", type=comma_list, metavar="STRATEGY[,...]",
                   help="how a multi-process cell shares its model, comma-separated: ddp, "
                        "fsdp2, fsdp2:PARAM/REDUCE (PARAM bf16|fp32, REDUCE fp32|bf16; "
                        "docs/runner.md) (default: ddp, or the matrix file's)")


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    """Where `run`'s cells run: a device, a node's GPUs, several nodes, a scheduler's jobs."""
    p.add_argument("--launcher", help="multi-node: command that starts one torchrun per node "
                   "(default in a SLURM allocation: srun --nodes=N --ntasks-per-node=1)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="multi-node: where the torchruns meet (default this host:29500)")
    p.add_argument("--device",
                   help="cpu | cuda | cuda:N | auto (default: what the preset or matrix says)")
    p.add_argument("--devices", metavar="all|0,1,...", help="cells side by side, one per GPU: "
                   "all or indices (docs/node.md) (default: none, one at a time; or the matrix's)")
    p.add_argument("--device-slots", help=argparse.SUPPRESS)  # test-only: CPU slots cpu0,cpu1
    jobs = p.add_argument_group("cells as jobs of a scheduler, through submitit (docs/cluster.md)")
    jobs.add_argument("--executor", choices=EXECUTORS,
                      help="inline: this machine, one runner; slurm: a Slurm job array; local: "
                           "the same through submitit's local executor (default: inline, or "
                           "the run's on --resume)")
    jobs.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    jobs.add_argument("--job-time", metavar="MIN", type=positive_int,
                      help="minutes per job (default: the cell's timeout + 2)")
    jobs.add_argument("--gpus-per-task", metavar="N", type=non_negative_int,
                      help="GPUs per job task (default: the cell's ranks per node on CUDA, "
                           "0 on a CPU)")
    jobs.add_argument("--cpus-per-task", metavar="N", type=positive_int,
                      help="CPUs per job task (default: Slurm's)")
    jobs.add_argument("--array-parallelism", metavar="N", type=int,
                      help="jobs of one array running at once (default: 8)")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a whole matrix, one child process per cell (resumable)",
        description="Run a matrix of cells (a preset, a TOML file or the flags below), each "
        "in a child process of its own under a timeout, then accuracy parity and the report. "
        "Records go to RUN_DIR/records.jsonl and results.csv; running again into the same "
        "directory finishes only the missing or failed cells.",
        epilog=example("ampbench run --preset cpu --out results/runs/mine",
                       "ampbench run --preset gpu-quick --time-budget 9m"))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, **one_of(preset_names(), "preset"),
                     help="a named matrix; auto, the default, is gpu where CUDA is and cpu "
                          "elsewhere")
    src.add_argument("--matrix", help="a matrix TOML file (default: none; the preset is used)")
    src.add_argument("--resume", metavar="RUN_DIR",
                     help="finish an interrupted run directory (default: none; a new run)")
    p.add_argument("--out", metavar="RUN_DIR", type=out_dir,
                   help="run directory (default results/runs/<run_id>)")
    _add_matrix_flags(p)
    _add_placement_flags(p)
    p.add_argument("--timeout", type=positive_float,
                   help=f"seconds per cell before it is killed ({by_preset('timeout_s', ' s')})")
    p.add_argument("--time-budget", metavar="DURATION", type=duration,
                   help="finish within DURATION (25m, 540s, 1h): start no cell or parity run "
                        "that the time left cannot finish (judged from the cells finished so "
                        "far: the same model and policy's slowest, else their start-up and "
                        "FLOP-scaled step times; the timeout only before any process of its "
                        "kind, eager or compiled, has finished), write the report for what "
                        "finished, print the resume command and exit 3 (default: none; every "
                        "cell runs)")
    p.add_argument("--find-max-batch", action="store_true",
                   help="search the largest batch that fits")
    p.add_argument("--no-parity", action="store_true", help="skip the accuracy-parity stage")
    p.add_argument("--data-dir", metavar="DIR",
                   help="parity on your own data files, never downloaded: CIFAR-10's binary "
                        "version (DIR/cifar-10-batches-bin) for resnet-tiny-cifar10, nanoGPT's "
                        "uint16 train.bin and val.bin for gpt2-tiny-tokens and "
                        "llama-tiny-tokens (docs/parity.md; default: none)")
    p.add_argument("--no-report", action="store_true", help="skip writing report.md and plots")
    _add_prices(p, "results.csv and the report get",
                "kept in meta.json, so a resumed run and `report` use it too; default: none, "
                "or the price a resumed run recorded")
    p.set_defaults(handler="bench.run.command:main")


def _add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity", help="check each reduced precision reaches FP32's accuracy",
        description="Train each model on a learnable synthetic task under every policy, FP32 "
        "over several seeds for its seed-to-seed band, and judge each policy's final eval "
        "loss against it: PASS, FAIL or INCONCLUSIVE. Writes parity.csv and prints the "
        "verdict table; exit 1 when a policy fails.",
        epilog=example("ampbench parity --device cpu --out results/runs/parity"))
    p.add_argument("--models", type=comma_list,
                   help=f"comma-separated model names, of {joined(model_names())}, "
                        f"modules of your own ({REFERENCES}), or "
                        "parity tasks (gpt2-tiny-underflow; real text: gpt2-tiny-shakespeare, "
                        "llama-tiny-shakespeare, gpt2-small-shakespeare; with --data-dir: "
                        "resnet-tiny-cifar10, gpt2-tiny-tokens, llama-tiny-tokens; "
                        "default: the tiny models and the underflow task on CPU, the full-size "
                        "ones, gpt2-small-shakespeare and the underflow task on CUDA, and the "
                        "tasks --data-dir holds)")
    p.add_argument("--precisions", type=comma_list,
                   help=f"comma-separated policies, of {joined(policy_names())} (default: "
                        "all that run natively here; FP8 off CUDA is emulated and only on "
                        "request)")
    p.add_argument("--steps", type=positive_int,
                   help="training steps per run (default: each model's own: 60-120 for the "
                        "tiny models and the underflow task, 600 for the full-size ones)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per policy (default 3)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--out", metavar="RUN_DIR", type=out_dir,
                   help="run directory for parity.csv (default: "
                        "results/runs/parity-<UTC time>)")
    p.add_argument("--time-budget", metavar="DURATION", type=duration,
                   help="finish within DURATION (25m, 540s, 1h): start no run that the time "
                        "left cannot finish (judged from the finished runs of its model, a "
                        "minute for a model not run yet), judge the models "
                        "whose runs all finished, print the resume command and exit 3 "
                        "(default: none; every run trains)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="parity on your own data files, never downloaded: CIFAR-10's binary "
                        "version (DIR/cifar-10-batches-bin) for resnet-tiny-cifar10, nanoGPT's "
                        "uint16 train.bin and val.bin for gpt2-tiny-tokens and "
                        "llama-tiny-tokens (docs/parity.md; default: none)")
    p.add_argument("--strategy", metavar="STRATEGY",
                   help="train every policy on --ranks torchrun processes sharing the model: "
                        "fsdp2, fsdp2:PARAM/REDUCE (PARAM bf16|fp32, REDUCE fp32|bf16) or ddp; "
                        "rows read POLICY@STRATEGY, judged against fp32 in one process "
                        "(docs/parity.md; default: none, one process)")
    p.add_argument("--ranks", type=positive_int, default=2,
                   help="processes under --strategy: on CPU over gloo, on CUDA one GPU each "
                        "(default 2)")
    p.set_defaults(handler="bench.parity:main")


def _add_prices(p: argparse.ArgumentParser, gives: str, where: str) -> None:
    p.add_argument("--price-per-hour", metavar="USD", type=positive_float,
                   help=f"price of one device for one hour: {gives} the cost of 1M samples "
                        f"({where})")
    p.add_argument("--price-per-kwh", metavar="USD", type=positive_float,
                   help=f"price of a kWh: {gives} the energy cost of 1M samples where energy "
                        f"was measured ({where})")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="write report.md and plots for a run directory",
        description="Read a run directory's results.csv (and parity.csv) and write report.md "
        "with its tables and plots/; needs no torch.",
        epilog=example("ampbench report results/runs/mine"))
    p.add_argument("run_dir", nargs="?", help="run directory (default: the latest run)")
    p.add_argument("--out", type=out_dir, help="output directory (default: the run directory)")
    _add_prices(p, "the report gets", "default: the price the run recorded in meta.json")
    p.set_defaults(handler="bench.report:main")

    p = sub.add_parser(
        "publish", help="copy a run into results/<device>/<date>/ and index it",
        description="Copy a finished run (results, parity, report, plots, meta) into "
        "results/<device>/<date>/ for committing, and regenerate the index results/README.md.",
        epilog=example("ampbench publish results/runs/mine"))
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--results", default="results", type=out_dir,
                   help="results directory")
    p.set_defaults(handler="bench.report:publish_main")


def _add_gate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gate", help="compare a run against a baseline; exit 1 on regression",
        description="Match the current run's cells to a baseline's on the same device and "
        "apply each check; a change fails only when it is beyond its threshold and beyond "
        "the measured noise. Exit 0 pass, 1 regression, 2 bad input.",
        epilog=example("ampbench gate --current results/runs/mine --check samples_per_s:-5%"))
    p.add_argument("--baseline", help="baseline CSV or run directory (default: this device's)")
    p.add_argument("--current", help="current run directory or CSV (default: the latest run)")
    from bench.analysis.checks import CHECKABLE, DEFAULT_CHECKS

    defaults = " ".join(DEFAULT_CHECKS).replace("%", "%%")
    p.add_argument("--check", action="append", default=None, metavar="METRIC:CHANGE",
                   help="METRIC:[+|-]THRESHOLD[%%], e.g. samples_per_s:-5%%; repeat for "
                        f"several; METRIC is one of {joined(CHECKABLE)} (default: {defaults})")
    p.add_argument("--allow-device-mismatch", action="store_true",
                   help="gate against a baseline from another device, matching cells "
                        "without the device")
    p.add_argument("--fail-on-throttled", action="store_true",
                   help="fail a regression in a throttled cell too (default: a warning)")
    p.add_argument("--fail-on-noisy", action="store_true",
                   help="exit 1 when a check is too noisy to judge (default: reported, exit 0)")
    p.set_defaults(handler="bench.analysis.gate:main")

    p = sub.add_parser(
        "baseline", help="promote a run to results/baselines/<device>.csv",
        description="Copy a run's results (and parity) to the device's baseline, the one "
        "`gate` compares later runs against by default.",
        epilog=example("ampbench baseline results/runs/mine"))
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--out", type=out_csv,
                   help="baseline CSV path (default results/baselines/<device>.csv)")
    p.set_defaults(handler="bench.analysis.baseline:promote_main")


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "env", help="environment fingerprint and GPU state, with noise warnings",
        description="Print what a number would be measured on: device, driver, CUDA, torch, "
        "Python, CPU, thread settings and git state, NVML's view of each GPU (clocks, power "
        "limit, persistence, other processes), others' use of the cores over a second, and a "
        "warning for each thing that makes numbers noisy (the same warnings `run` prints "
        "before its sweep).",
        epilog=example("ampbench env --json"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler="bench.telemetry.env:main")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the reference models",
        description="List the reference models with their parameters, training FLOPs per "
        "sample, unit and default batch and size.",
        epilog=example("ampbench models"))
    p.set_defaults(handler="models:main")


def _add_peers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "peers", help="our models next to transformers' and torchvision's: equal and as fast?",
        description="Pair each model with its peer (transformers' GPT2LMHeadModel and "
        "BertForMaskedLM with SDPA attention, torchvision's ResNets), copy our weights into "
        "it, and report parameter counts, the largest logit difference and the loss "
        "difference in eval mode, then the same training step under each policy, steps "
        "interleaved ours/peer: median step times, the ratio ours/peer with its IQR, and "
        "CUDA peak memory. Needs the extra: pip install -e .[peers].",
        epilog=example("ampbench peers --device cuda --out-dir results/runs/mine"))
    p.add_argument("--models", type=comma_list,
                   help=f"comma-separated models, of {joined(model_names())} "
                        "(default gpt2-small,bert-base,llama-small,resnet50,resnet18; "
                        "a default one whose peer library is missing is a skipped row, a named "
                        "one exits 2)")
    p.add_argument("--precisions", type=comma_list, default=["fp32", "bf16"],
                   help=f"comma-separated policies, of {joined(policy_names())} "
                        "(default fp32,bf16)")
    p.add_argument("--batch-size", type=positive_int,
                   help="samples per step (default: each model's default batch)")
    p.add_argument("--seq-len", type=positive_int,
                   help="tokens per sequence for the language models (default: the model's)")
    p.add_argument("--image-size", type=positive_int,
                   help="image side in pixels for the ResNets (default: the model's)")
    p.add_argument("--steps", type=positive_int, default=20,
                   help="timed steps of each model (default 20)")
    p.add_argument("--warmup", type=non_negative_int, default=5,
                   help="untimed warmup steps of each model (default 5)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=out_csv,
                     help="also write the table to this CSV file (default: none; printed only)")
    out.add_argument("--out-dir", metavar="RUN_DIR", type=out_dir,
                     help="also write the table to RUN_DIR/peers.csv, where the report finds it "
                          "(default: none)")
    p.set_defaults(handler="bench.peers:main")


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="a GPU for minutes: env, GPU tests, sweep, parity, peers, report",
        description="Spend a short-lived GPU in order of value within --time-budget: the "
        "environment, the GPU correctness tests, every model under fp32, bf16 and fp16, then "
        "with time to spare tf32, compiled bf16, FP8 and larger batches, a short parity, "
        "peers and the report, each step a child process writing into --out as it goes. The "
        "same command again resumes (a second lent call). Exit 0 all done, 3 steps left for "
        "another call, 1 a step failed, 2 bad input.",
        epilog=example("PYTHONPATH=. python3 -m bench validate --out gpu-run --time-budget 9m",
                       "ampbench validate --out gpu-run --time-budget 9m --plan --gpu 'H100 SXM'"))
    p.add_argument("--out", metavar="DIR", required=True, type=out_dir,
                   help="where everything goes: validate.json, VALIDATE.md, env.json, logs/, "
                        "run/ (the run directory)")
    p.add_argument("--time-budget", metavar="DURATION", type=duration, required=True,
                   help="the time this call may take (9m, 540s): steps that do not fit wait "
                        "for the next call")
    p.add_argument("--plan", action="store_true",
                   help="print the steps with their estimated seconds and the total; run "
                        "nothing (any machine)")
    p.add_argument("--gpu", metavar="NAME",
                   help="with --plan: plan for this GPU ('NVIDIA H100 80GB HBM3', 'H100 SXM'); "
                        "default: the GPU found here, else this CPU")
    p.add_argument("--models", type=comma_list,
                   help="only these of the plan's models (default: all of them; GPU: "
                        "resnet50, bert-base, gpt2-small; CPU: resnet-tiny, bert-tiny, "
                        "gpt2-tiny)")
    steps = "env, tests, sweep, tf32, compile, fp8, batches, parity, peers, report"
    p.add_argument("--only", type=comma_list, metavar="STEPS",
                   help=f"only these steps, comma-separated, of {steps} (default: every step)")
    p.add_argument("--skip", type=comma_list, metavar="STEPS",
                   help="leave these steps out, comma-separated (default: none)")
    p.set_defaults(handler="bench.validate:main")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ampbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for add in (_add_run, _add_cell, _add_parity, _add_report, _add_gate, _add_env, _add_models,
                _add_peers, _add_validate):
        add(sub)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command (``run``, ``cell`` ...): what its flags are."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _own_models() -> None:
    """BadInput unless ``import models`` finds ampbench's own package: ``models`` (like
    ``bench``) is a generic name that another distribution may also install."""
    spec = importlib.util.find_spec("models")
    ours = Path(__file__).resolve().parents[1] / "models" / "__init__.py"
    found = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if found != ours:
        raise BadInput(f"'import models' finds {found or 'nothing'}, not ampbench's {ours}: "
                       "another package named 'models' shadows it; run ampbench in a "
                       "virtualenv of its own (nox makes one)")


def main(argv: Sequence[str] | None = None) -> int:
    """`ampbench COMMAND`: parse, run the command's handler; BadInput is one line, exit 2."""
    try:
        _own_models()  # before the parser, which lists the models' names
    except BadInput as exc:
        print(f"ampbench: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return int(_resolve(args.handler)(args) or 0)
    except BadInput as exc:
        # One line, even when the bad value held a newline.
        message = str(exc).replace("\r", "\\r").replace("\n", "\\n")
        print(f"ampbench {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ampbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
