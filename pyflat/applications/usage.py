"""The error a user can fix, and the checks the applications share before their work.

:class:`UsageError` is a problem with what the user asked for (a bad option, a missing
file, an entry point that raises); the command line reports it as one line on stderr with
exit status 2. Its messages name the command-line options (``--out``, ``--entry``), which
are also the applications' parameter names. The checks here prove a result can be written
and a device can hold tensors before minutes of work are spent, and cut an error to the
line that says what it is.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

__all__ = ["UsageError", "first_line", "usable_device", "writable_file", "writable_folder"]


class UsageError(Exception):
    """A problem with what the user asked for, reported in one line."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The error's type and first line, cut to its first sentence when that line is long."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = lines[0]
    if len(line) > limit:
        end = line.find(". ", 0, limit)
        line = line[:end + 1] if end > 0 else line[:limit - 3] + "..."
    return f"{type(err).__name__}: {line}"


def writable_folder(path: Path, option: str) -> None:
    """Creates ``path`` (and its parents) unless it exists, and proves a file can be
    written in it, so that a run does not fail at its end for want of a place to write.
    ``option`` names the option the path came from, in the message of the UsageError."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option}: {path} is a file; give a folder for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{option}: cannot write in the folder {path}: "
                         f"{err.strerror or err}") from None


def writable_file(path: Path, option: str) -> None:
    """Proves ``path`` can be written (the file is opened for appending, which leaves an
    existing file as it was, and a new one is removed again), before the work starts."""
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"{option}: cannot write {path}: {folder} {what}")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise UsageError(f"{option}: cannot write {path}: {err.strerror or err}") from None
    if not existed:
        path.unlink(missing_ok=True)


def usable_device(name: str) -> torch.device:
    """``--device`` as a torch.device where tensors can live and hold values."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda or cuda:<index>, got {name!r}") from None
    if device.type == "meta":
        raise UsageError("--device meta holds shapes but no values, so there is nothing to "
                         "measure: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to torch")
    try:
        torch.empty(1, device=device)
    except Exception as err:
        raise UsageError(f"--device {name} is not usable here: {first_line(err)}") from None
    return device
