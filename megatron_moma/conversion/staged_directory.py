"""All-or-nothing output folders: write into `OUT.tmp-XXXX` beside `OUT`, rename at the end.

A conversion that fails (bad input, a crash, Ctrl-C) leaves nothing behind, and an existing
`OUT` is only replaced, with `overwrite`, after the new folder is complete.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

from megatron_moma.command_line import ArgumentError, writable_directory_problem


def check_output_directory(out: str, overwrite: bool) -> None:
    """Refuse (ArgumentError, naming --out) an `out` that cannot be a folder this process
    writes, or a non-empty folder without `overwrite`."""
    problem = writable_directory_problem(out)
    if problem is not None:
        raise ArgumentError(f"--out {out} {problem}")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ArgumentError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _first_missing_ancestor(path: str) -> Optional[str]:
    """The outermost folder of `path` that does not exist yet, or None."""
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


@contextmanager
def staged_directory(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty staging folder; on a clean exit it becomes `out` (replacing the old
    one), on an exception it is deleted along with any parent folders created for it."""
    check_output_directory(out, overwrite)
    out = os.path.abspath(out)
    created = _first_missing_ancestor(os.path.dirname(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    previous = None
    if os.path.exists(out):
        previous = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(previous, "old"))
    os.rename(staging, out)
    if previous is not None:
        shutil.rmtree(previous)
