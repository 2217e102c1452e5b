"""File helpers every writer shares: atomic writes, and an exclusive lock on an output path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["FileLock", "atomic_write", "write_text_atomic"]


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a temporary file next to ``path``, which is then renamed over ``path``.

    Readers see the old file or the whole new one, never a part; on any error (also KeyboardInterrupt) the
    temporary file is removed and ``path`` is untouched. The file gets mode 0644 (``mkstemp``'s 0600 is for
    the temporary name only). ``path``'s directory must exist. Returns ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text (flushed to disk before the rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


class FileLock:
    """An exclusive, non-blocking lock on ``<path>.lock`` for as long as the ``with`` block runs.

    Two processes that take it for the same path cannot both hold it, whatever the file system's or HDF5's
    own locking does (``HDF5_USE_FILE_LOCKING=FALSE`` switches the latter off). The second gets a
    ``ValueError`` saying the path is in use. The lock file is removed on release.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd = None

    def __enter__(self) -> "FileLock":
        import fcntl

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(f"{self.path} is in use by another run (it holds {self.lock_path}); wait for it to "
                                 f"finish") from None
            try:  # the holder before us may have removed the file between our open and our lock: retry then
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still holding it, so nobody else locks the removed file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
