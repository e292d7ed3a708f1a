"""Folders a tool writes whole (an export, a conversion, an upcycled checkpoint): never over a user's files, and
never half-written.

The folder is built under a hidden sibling name and renamed into place only when every file is in it, so a
failure (a bad tensor, a full disk, Ctrl-C) leaves no folder behind and the same command can simply be run
again. A folder that exists and holds anything is refused before any work is done: its files could be
mistaken for this run's output, or be the user's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class OutputExists(FileExistsError):
    """The output folder already holds files: one line naming it."""


def check_output_folder(out: str | Path) -> Path:
    """`out` as a Path, or OutputExists when it is a file or a non-empty folder (checked before any work)."""
    out = Path(out)
    if out.is_file():
        raise OutputExists(f"{out}: is a file (expected a new or empty folder to write)")
    if out.is_dir() and any(out.iterdir()):
        raise OutputExists(f"{out}: not empty (expected a new or empty folder; its files could be mistaken for "
                           "this output, or be your own: choose another path or delete it)")
    return out


@contextlib.contextmanager
def new_output_folder(out: str | Path) -> Iterator[Path]:
    """Yields a hidden staging folder beside `out`; on success it becomes `out`, on any error it is removed."""
    out = check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier crash of this same pid number
    staging.mkdir()
    try:
        yield staging
        check_output_folder(out)  # still free: nothing appeared there while we wrote
        if out.is_dir():
            out.rmdir()  # an empty folder the user made for the output
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
