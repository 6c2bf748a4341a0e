"""Checkpoint files that are whole or absent: each is written next to its place, flushed to disk, then renamed
into it, so that a crash or a full disk mid-write leaves the previous file (or none), never a truncated one."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class CheckpointError(OSError):
    """A checkpoint could not be written (a full disk, a file size limit) or read back whole; it names the file."""


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(temporary)` on a temporary file in `path`'s folder, flushes it, and renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except Exception as error:  # noqa: BLE001 - writers wrap OSError (safetensors' SafetensorError): same outcome
        raise CheckpointError(f"could not write {path}: {error}; the previous version, if any, is intact.") from error
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_checked(path: Path, read: Callable[[Path], object]):
    """`read(path)`, or a `CheckpointError` naming the file when it is missing or cannot be read whole."""
    if not path.is_file():
        raise CheckpointError(f"the checkpoint file {path} is missing.")
    try:
        return read(path)
    except Exception as error:  # noqa: BLE001 - any reader's failure means the same: this file is not whole
        reason = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"the checkpoint file {path} cannot be read ({reason}).") from error
