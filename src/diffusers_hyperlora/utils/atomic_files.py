"""Atomic file writes: every file the library writes goes to a temporary name in its destination folder first.

A write that fails midway (a full disk, a killed process, an exception in the writer) leaves the old file, or the
old set of files, exactly as it was. Parent folders are created. OS failures surface as `OSError` subclasses that
name the real destination, not the temporary file.

Example:
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as name:
    ...     folder = pathlib.Path(name)
    ...     with atomic_path(folder / "sub" / "note.txt") as tmp:
    ...         _ = tmp.write_text("hello")
    ...     (folder / "sub" / "note.txt").read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..errors import HyperLoRAWriteError

__all__ = ["atomic_folder", "atomic_path", "atomic_write_files"]


def _temporary_name(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.{os.getpid()}.tmp")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _write_error(destination: Path, error: BaseException) -> HyperLoRAWriteError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    fix = "check that the folder is writable and the disk has space, then try again"
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        fix = "a file stands where a folder is needed on that path: choose another destination or move the file"
    return HyperLoRAWriteError(
        getattr(error, "errno", None) or 5,
        f"Could not write {str(destination)!r}: {reason}. Nothing was changed there; {fix}",
        str(destination),
    )


def _make_parent(destination: Path) -> None:
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_error(destination, error) from error


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `destination`; on success rename it over `destination`, else delete it."""
    destination = Path(destination)
    _make_parent(destination)
    temporary = _temporary_name(destination)
    try:
        yield temporary
        os.replace(temporary, destination)
    except BaseException as error:
        _remove_quietly(temporary)
        if isinstance(error, HyperLoRAWriteError) or not _is_write_failure(error):
            raise
        raise _write_error(destination, error) from error


@contextlib.contextmanager
def atomic_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to `destination`; on success it takes `destination`'s place (an old
    folder there is moved aside first and removed once the new one is in place), else it is deleted and
    `destination` is left as it was. Errors pass through unchanged: the caller words them."""
    destination = Path(destination)
    _make_parent(destination)
    temporary = _temporary_name(destination)
    replaced = destination.with_name(f".{destination.name}.{os.getpid()}.replaced")
    shutil.rmtree(temporary, ignore_errors=True)  # a leftover of a killed process with the same pid
    temporary.mkdir()
    try:
        yield temporary
        if destination.exists():  # a folder cannot be renamed over a folder
            os.replace(destination, replaced)
        os.replace(temporary, destination)
    except BaseException:
        if replaced.exists() and not destination.exists():
            os.replace(replaced, destination)
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)


def atomic_write_files(folder: str | os.PathLike, writers: Mapping[str, Callable[[Path], object]]) -> Path:
    """Write several files of one folder as a set: all are written to temporary names, then all renamed.

    Args:
        folder: the destination folder (created when missing).
        writers: file name -> a function that writes the file to the path it is given.

    If any writer fails, no file in `folder` has changed.
    """
    folder = Path(folder)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in writers.items():
            destination = folder / name
            _make_parent(destination)
            temporary = _temporary_name(destination)
            staged.append((temporary, destination))
            _write_or_raise(write, temporary, destination)
        for temporary, destination in staged:
            os.replace(temporary, destination)
    finally:
        for temporary, _ in staged:
            if temporary.exists():
                _remove_quietly(temporary)
    return folder


def _write_or_raise(write: Callable[[Path], object], temporary: Path, destination: Path) -> None:
    try:
        write(temporary)
    except BaseException as error:
        if isinstance(error, HyperLoRAWriteError) or not _is_write_failure(error):
            raise
        raise _write_error(destination, error) from error


def _is_write_failure(error: BaseException) -> bool:
    """OS errors, and safetensors' own error type (raised for a failed write, e.g. a full disk)."""
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"
