"""The ampbench command line: ``python -m bench COMMAND`` (or ``ampbench COMMAND``).

Thin by design: each command parses its flags here and hands them to the stage that owns it.
Bad input raises ``BadInput`` anywhere below; it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from bench import BadInput


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:  # NaN included
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _csv_ints(text: str) -> list[int]:
    return [_positive_int(item) for item in _csv(text)]


def _add_cell(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cell", help="train one cell (model x precision x batch), write its record")
    p.add_argument("--model", required=True, help="model name (see `ampbench models`)")
    p.add_argument("--precision", required=True, help="fp32 | tf32 | fp16 | bf16 | fp16-noscale")
    p.add_argument("--batch-size", type=_positive_int, required=True,
                   help="samples per micro-batch")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per sequence (language models)")
    p.add_argument("--image-size", type=_positive_int, help="image side in pixels (vision models)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--warmup", type=_non_negative_int, default=5, help="untimed warmup steps")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed steps")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=_positive_float,
                   help="override the device's dense peak TFLOP/s")
    p.add_argument("--power-interval-ms", type=_positive_float, default=50.0,
                   help="NVML sampling period")
    p.add_argument("--out", help="write the JSON record here (default: stdout)")
    p.add_argument("--run-id", default="", help=argparse.SUPPRESS)
    p.add_argument("--cell-id", default="", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=_non_negative_int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(handler="bench.cell:main")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a whole matrix, one child process per cell (resumable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="gpu | cpu | quick | auto (default)")
    src.add_argument("--matrix", help="a matrix TOML file")
    src.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run directory")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default results/runs/<run_id>)")
    p.add_argument("--models", type=_csv, help="comma-separated model names")
    p.add_argument("--precisions", type=_csv, help="comma-separated policies")
    p.add_argument("--batch-sizes", type=_csv_ints, help="comma-separated batch sizes")
    p.add_argument("--steps", type=_positive_int, help="timed steps per cell")
    p.add_argument("--warmup", type=_non_negative_int, help="warmup steps per cell")
    p.add_argument("--repeats", type=_positive_int, help="repeats per cell")
    p.add_argument("--world-size", type=_csv_ints, help="processes per node (comma-separated)")
    p.add_argument("--nnodes", type=_positive_int, help="nodes each multi-process cell spans")
    p.add_argument("--launcher", help="multi-node: command that starts one torchrun per node "
                   "(default in a SLURM allocation: srun --nodes=N --ntasks-per-node=1)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="multi-node: where the torchruns meet (default this host:29500)")
    p.add_argument("--device", help="cpu | cuda (default: what the preset says)")
    p.add_argument("--timeout", type=_positive_float, help="seconds per cell before it is killed")
    p.add_argument("--find-max-batch", action="store_true",
                   help="search the largest batch that fits")
    p.add_argument("--no-parity", action="store_true", help="skip the accuracy-parity stage")
    p.add_argument("--no-report", action="store_true", help="skip writing report.md and plots")
    p.set_defaults(handler="bench.runner:main")


def _add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="check each reduced precision reaches FP32's accuracy")
    p.add_argument("--models", type=_csv, help="comma-separated model names")
    p.add_argument("--precisions", type=_csv, help="comma-separated policies")
    p.add_argument("--steps", type=_positive_int, help="training steps per run")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per policy (default 3)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory for parity.csv")
    p.set_defaults(handler="bench.parity:main")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.md and plots for a run directory")
    p.add_argument("run_dir", nargs="?", help="run directory (default: the latest run)")
    p.add_argument("--out", help="output directory (default: the run directory)")
    p.set_defaults(handler="bench.report:main")

    p = sub.add_parser("publish", help="copy a run into results/<device>/<date>/ and index it")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.set_defaults(handler="bench.report:publish_main")


def _add_gate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gate", help="compare a run against a baseline; exit 1 on regression")
    p.add_argument("--baseline", help="baseline CSV or run directory (default: this device's)")
    p.add_argument("--current", help="current run directory or CSV (default: the latest run)")
    p.add_argument("--check", action="append", default=None, help="e.g. samples_per_s:-5%%")
    p.add_argument("--allow-device-mismatch", action="store_true")
    p.add_argument("--fail-on-throttled", action="store_true")
    p.set_defaults(handler="bench.gate:main")

    p = sub.add_parser("baseline", help="promote a run to results/baselines/<device>.csv")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--out", help="baseline CSV path (default results/baselines/<device>.csv)")
    p.set_defaults(handler="bench.gate:promote_main")


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="environment fingerprint and GPU state, with noise warnings")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler="bench.env:main")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the reference models")
    p.set_defaults(handler="models:main")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ampbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for add in (_add_run, _add_cell, _add_parity, _add_report, _add_gate, _add_env, _add_models):
        add(sub)
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_resolve(args.handler)(args) or 0)
    except BadInput as exc:
        print(f"ampbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ampbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
