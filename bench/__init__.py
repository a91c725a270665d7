"""ampbench: what mixed precision buys when training real models, measured on your hardware.

Run ``python -m bench --help`` (or the ``ampbench`` console script) for the commands.
This package imports no torch at top level: analysis stages run without it.
"""

__version__ = "0.1.0"


class BadInput(Exception):
    """A user error (bad name, bad value, missing file): one line on stderr, exit code 2."""
