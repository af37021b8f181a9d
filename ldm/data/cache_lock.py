"""The latent cache's build lock: one job at a time builds a cache folder, and no lock file is left behind.

``lock_build`` takes an exclusive ``flock`` on ``.<cache>.lock`` beside the cache; ``unlock_build`` deletes
the file, then lets go. Deleting a lock file is safe only with the check ``lock_build`` makes: a job that
opened the file just before it was deleted may get the lock on the deleted file, so after locking it checks
that the path still names the file it locked, and otherwise opens the path again.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ldm.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None


class CacheInUseError(UserError, RuntimeError):
    """Another job is building the same cache folder."""


def lock_build(folder: Path) -> int | None:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``folder`` (its file descriptor; closing it releases
    the lock, and so does the kernel when the process ends however it ends). Another job holding it: refused.

    ``unlock_build`` deletes the file before it lets go, so a job that opened the file just before may then
    hold a lock on a deleted file: it checks that the path is still the file it locked, else opens it again.
    """
    if fcntl is None:
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CacheInUseError(f"latent cache {folder} is being built by another job ({holder}); wait for it to "
                                  f"finish and start this one again (it will find the cache current), or set "
                                  f"another cache.dir") from None
        if _is_file_at(fd, path):
            break
        os.close(fd)  # released and deleted by its holder between our open and our lock: open the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd


def unlock_build(folder: Path, fd: int | None) -> None:
    """Delete the lock file, then release the lock (``lock_build``): nothing is left beside the cache."""
    if fd is None:
        return
    try:
        if _is_file_at(fd, lock_path(folder)):
            os.unlink(lock_path(folder))
    finally:
        os.close(fd)


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _is_file_at(fd: int, path: Path) -> bool:
    """The open file ``fd`` is the file at ``path`` now (not deleted, not replaced)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
