"""Reading a file a user pointed us at without hanging, exhausting memory or printing a traceback.

`Path.read_bytes()` on a FIFO blocks until a writer appears, on /dev/zero it never ends, and on a symlink
loop it raises an OSError that surfaces as a traceback. Here the file is opened non-blocking, checked to
be a regular file by its open descriptor (no window between check and read), and read up to a limit; every
way it can be unusable is a BadInput that names the file and the reason.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import BadInput

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def describe_os_error(e: OSError) -> str:
    """Why a path could not be opened or examined, in words."""
    if e.errno == errno.ELOOP:
        return "is a symlink loop"
    if e.errno == errno.ENOENT:
        return "does not exist (or is a symlink to nothing)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read (permission denied)"
    return f"cannot be read ({e.strerror or type(e).__name__})"


def kind_of(mode: int) -> str | None:
    """None for a regular file, else what the file is instead ("a FIFO (named pipe)", ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, what: str) -> int:
    """A read-only descriptor of `path`, which must be a regular file (symlinks followed); the caller closes it."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadInput(f"{what} {str(path)!r} {describe_os_error(e)}") from None
    try:
        kind = kind_of(os.fstat(fd).st_mode)
        if kind:
            raise BadInput(f"{what} {str(path)!r} is {kind}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file; BadInput if it is anything else, unreadable, or larger than max_bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise BadInput(f"{what} {str(path)!r} is {size} bytes, over the limit of {max_bytes} bytes")
        chunks, total = [], 0
        # Read to EOF, never more than max_bytes + 1: a file that grows while we read is refused, not swallowed.
        while True:
            want = 1 << 20 if max_bytes is None else min(1 << 20, max_bytes + 1 - total)
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise BadInput(f"{what} {str(path)!r} is over the limit of {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise BadInput(f"{what} {str(path)!r} {describe_os_error(e)}") from None
    finally:
        os.close(fd)

