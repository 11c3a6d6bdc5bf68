"""One writer per file: an exclusive OS lock (``flock``) on a lock file beside it.

The lock is on a file of its own, ``.<name>.lock`` next to the guarded file, because
``RunLogger`` replaces its run file (``os.replace``) whenever it adds a metric. Releasing deletes
the lock file while it is still held; a writer that locked a file deleted meanwhile (its inode no
longer at the path) retries on the new one, so two writers never both hold the lock. The OS drops
the lock when its holder dies, so a killed writer (which leaves the lock file behind) never blocks
the next one. Without ``flock`` (Windows) nothing is locked.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> lock = WriterLock(path, "example")
    >>> lock.path.name
    '.run.h5.lock'
    >>> lock.release(); lock.path.exists()
    False
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class WriterLock:
    """Hold the lock of ``guarded`` from construction until :meth:`release`.

    Raises ``ValueError`` (naming ``call``, the file and what to do) if another writer holds it.
    """

    def __init__(self, guarded: Path, call: str) -> None:
        self.path = guarded.with_name(f".{guarded.name}.lock")
        self._fd: int | None = None
        if fcntl is None:
            return
        guarded.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(f"{call}: {guarded} is open in another RunLogger (it holds the "
                                 f"lock {self.path.name}); two writers would corrupt the run. "
                                 "Close the other logger (or wait for its process to end), or log "
                                 "to another path") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)  # the holder released and deleted it under us: lock the new one

    def release(self) -> None:
        """Delete the lock file and release the lock (idempotent)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: see the module docstring
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
