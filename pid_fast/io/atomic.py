"""The one atomic file writer: a file is either the old complete one or the new complete one.

Writes go to a temporary file in the same folder, are fsync'ed and renamed over the final name
(atomic on POSIX), then the folder is fsync'ed. A kill at any moment leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Callable


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes) -> None:
    """Write ``path`` atomically: ``write`` is the bytes, or a function writing to a binary file.
    The file gets ordinary data-file permissions (0666 less the umask)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if isinstance(write, (bytes, bytearray)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
