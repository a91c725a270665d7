"""What every ampbench command's --help says beyond its flags' own words: each flag's
accepted values (the presets', policies' and models' registries, read here) and its default,
an example per command, and a flag error that names the command (``ampbench run: error:``).
bench/cli.py builds the commands with these. torch-free.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn


class Formatter(argparse.HelpFormatter):
    """Help that states every flag's default and accepted values: "(default: X)" where the help
    text does not already say it, "(one of: a, b)" where the flag has choices; the example
    (the epilog) keeps its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLE):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text == argparse.SUPPRESS or not action.option_strings:
            return text
        if action.choices is not None and not all(str(c) in text for c in action.choices):
            text += " (one of: " + ", ".join(map(str, action.choices)) + ")"
        default = action.default
        if (default is not None and default is not argparse.SUPPRESS
                and not isinstance(default, bool) and "default" not in text):
            shown = ",".join(map(str, default)) if isinstance(default, list | tuple) \
                else str(default)
            text += f" (default: {shown.replace('%', '%%')})"
        return text


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump), exit code 2, naming
    the command whose flags were wrong."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        # argparse leaves a command's unknown flags to the top parser, whose error would say
        # "ampbench: error"; the command's own parser says "ampbench run: error".
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = next((a.choices for a in self._actions
                             if isinstance(a, argparse._SubParsersAction)), {})
            owner = commands.get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


EXAMPLE = "example:"


def example(*lines: str) -> str:
    """A command's epilog: its example command lines."""
    return EXAMPLE + "\n" + "\n".join(f"  {line}" for line in lines)


def one_of(names: Sequence[str], what: str) -> dict[str, Any]:
    """add_argument's keywords for a flag that takes one of ``names``: --help lists them, and
    another value is "unknown WHAT 'x'; valid: ..." as everywhere in ampbench."""
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} '{text}'; valid: {', '.join(names)}")
        return text

    return {"type": parse, "choices": tuple(names), "metavar": what.upper()}


REFERENCES = "PATH.py:SIZE, package.module:SIZE, hf:DIR"  # a model of your own (models/external.py)


def model_or_reference() -> dict[str, Any]:
    """add_argument's keywords for a flag that takes one model: a registry name, or a
    reference to a module of the user's (checked when it is read, torch-free)."""
    names = model_names()

    def parse(text: str) -> str:
        from models import external

        if text not in names and not external.is_reference(text):
            raise argparse.ArgumentTypeError(
                f"unknown model '{text}'; valid: {', '.join(names)}, or {REFERENCES}")
        return text

    return {"type": parse, "metavar": "MODEL"}


def joined(registry: Sequence[str]) -> str:
    """A registry's names as help text lists them."""
    return ", ".join(registry)


def model_names() -> tuple[str, ...]:
    import models  # torch-free: the registry; main() checks it is ampbench's own first

    return models.NAMES


def policy_names() -> tuple[str, ...]:
    from bench import precision  # torch-free: the names and what each policy does

    return precision.NAMES


def preset_names() -> tuple[str, ...]:
    from bench.config.presets import PRESETS

    return tuple(PRESETS)


def by_preset(field: str, unit: str = "") -> str:
    """"default: ..." naming what each preset sets ``field`` of its Matrix to."""
    from bench.config.presets import PRESETS

    values = ", ".join(f"{name} {getattr(make(), field):g}{unit}"
                       for name, make in PRESETS.items() if name != "auto")
    return f"default: the preset's or the matrix file's; presets: {values}"
