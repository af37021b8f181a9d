"""Exclusive advisory locks (``flock``) that name their holder: one job at a time writes a folder.

    fd = hold(path)                    # an exclusive flock on ``path`` (created), or LockHeld naming the holder
    release(path, fd, delete=True)     # delete the file (if it is still ours), then let go

The lock file holds one line, ``pid <pid> on <host>``, which the refused job reads back for its message. The
kernel releases a lock when its process ends, however it ends. Used by ``ldm.checkpoint.lock_output_dir``
(``<output_dir>/.lock``, kept) and ``ldm.data.cache_lock`` (``.<cache>.lock``, deleted when the build ends).

Deleting a lock file is safe only with the check ``hold(..., deletable=True)`` makes: a job that opened the
file just before it was deleted may get the lock on the deleted file, so after locking it checks that the
path still names the file it locked, and otherwise opens the path again.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is what it wrote (``pid N on HOST``)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold(path: Path, deletable: bool = False) -> int | None:
    """An exclusive ``flock`` on ``path`` (its file descriptor, this process's holder line written), or None
    where there is no ``flock`` (not POSIX). Raises ``LockHeld`` when another process holds it.

    ``deletable``: the holder deletes the file when it lets go (``release(..., delete=True)``), so a lock
    taken on a file deleted meanwhile is dropped and the path opened again.
    """
    if fcntl is None:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(holder) from None
        if not deletable or is_file_at(fd, path):
            break
        os.close(fd)  # released and deleted by its holder between our open and our lock: open the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd


def release(path: Path, fd: int | None, delete: bool = False) -> None:
    """Let go of ``hold``'s lock; ``delete``: first delete the file, if the path still names it."""
    if fd is None:
        return
    try:
        if delete and is_file_at(fd, path):
            os.unlink(path)
    finally:
        os.close(fd)


def is_file_at(fd: int, path: Path) -> bool:
    """The open file ``fd`` is the file at ``path`` now (not deleted, not replaced)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
