"""What the megatron_moma commands share on the command line: one-line errors and value types.

Every invalid flag or flag combination of `pretrain-moma`, `moma-upcycle`, `moma-convert` and
`moma-preprocess` ends the same way: one line `PROG: error: MESSAGE` on standard error naming
the flag(s) as typed and what is expected, exit code 2 (argparse's), before anything is built
or written. `CommandLineParser` turns argparse's own errors (unknown flag,
missing value, bad choice, a value the flag's type rejects) into `ArgumentError`, which the
commands' `main` report with `report_argument_error`; the checks of flag combinations raise it
too. The value types below are the flags' `type=`: argparse then names the flag in the message.
"""

import argparse
import math
import os
import sys
from typing import Callable, Optional

EXIT_BAD_ARGUMENTS = 2


class ArgumentError(ValueError):
    """An invalid flag or flag combination; the message names the flags as typed."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse without the usage dump: an error raises ArgumentError with argparse's message
    (`argument --micro-batch-size: expected an integer >= 1, got '0'`). `--help` is unchanged."""

    def error(self, message: str):
        raise ArgumentError(message)


def report_argument_error(prog: str, error: ArgumentError) -> int:
    """Print `prog: error: ...` as one line (on rank 0 only under torch.distributed); returns 2."""
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    return EXIT_BAD_ARGUMENTS


def _bound_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    if low is None:
        return f"< {high}" if high_open else f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def integer(minimum: Optional[int] = None, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum] (either bound optional)."""
    expected = "an integer" + ("" if minimum is None and maximum is None
                               else " " + _bound_text(minimum, maximum, False, False))

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: Optional[float] = None, maximum: Optional[float] = None, *,
           above: bool = False, below: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= minimum (> with `above`) and <= maximum (< with
    `below`), either bound optional."""
    expected = "a finite number" + ("" if minimum is None and maximum is None
                                    else " " + _bound_text(minimum, maximum, above, below))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        too_low = minimum is not None and (value <= minimum if above else value < minimum)
        too_high = maximum is not None and (value >= maximum if below else value > maximum)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, above=True)
NON_NEGATIVE = number(0)
PROBABILITY = number(0, 1)


def writable_directory_problem(path: str) -> Optional[str]:
    """Why `path` cannot be (or become) a folder this process writes into, or None if it can:
    an existing path must be a writable folder; a missing one, a folder that can be created
    under its nearest existing parent."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "is a folder this user cannot write to"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: this user cannot write to {parent}"
    return None
