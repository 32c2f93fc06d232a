"""Reading a user's input file with bounds: a regular file only, at most a given size.

`Path.read_bytes` on /dev/zero or a named pipe never returns (or fills memory), and its size
from stat says nothing for those. Every file a command reads whole goes through here; writes
go through `hybrid_gguf.atomic`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Union

from hybrid_gguf.errors import HybridError
from hybrid_gguf.sizes import format_size

PathLike = Union[str, os.PathLike]


class FileTooLarge(HybridError):
    """A regular file over the reader's bound (callers may treat it as corrupt)."""


def _size_error(what: str, path, limit: int, size: int = 0, hint: str = "") -> FileTooLarge:
    have = f" ({format_size(size)})" if size else ""
    return FileTooLarge(f"{what} {path} is larger than {format_size(limit)}{have}{hint}")


def open_regular(path: PathLike, what: str) -> int:
    """A read-only descriptor of a regular file, or a one-line HybridError naming `what`."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise HybridError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise HybridError(f"{what} {path} is not a regular file (it is a directory)") from None
    except OSError as exc:
        raise HybridError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
        raise HybridError(f"{what} {path} is not a regular file (it is {kind})")
    os.set_blocking(fd, True)
    return fd


def read_bounded(path: PathLike, what: str, limit: int, hint: str = "") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; `hint` ends the too-large error."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _size_error(what, path, limit, size, hint)
        try:
            data = fh.read(limit + 1)  # the file may grow after the stat
        except OSError as exc:
            raise HybridError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise _size_error(what, path, limit, hint=hint)
    return data


def read_bounded_text(path: PathLike, what: str, limit: int, hint: str = "") -> str:
    """`read_bounded`, decoded as UTF-8 (an error names the first bad byte's offset)."""
    data = read_bounded(path, what, limit, hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HybridError(f"{what} {path} is not UTF-8 text (byte offset {exc.start})") from None


def check_regular(path: PathLike, what: str, limit: int) -> Path:
    """A regular file of at most `limit` bytes, for readers that take a path (numpy, gguf)."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > limit:
        raise _size_error(what, path, limit, size)
    return Path(path)
