"""The latent cache's build lock: one job at a time builds a cache folder, and no lock file is left behind.

``lock_build`` takes an exclusive ``flock`` on ``.<cache>.lock`` beside the cache; ``unlock_build`` deletes
the file, then lets go (``ldm.locks``, which also makes the deleted-file check that makes deleting safe).
"""

from __future__ import annotations

from pathlib import Path

from ldm import locks
from ldm.errors import UserError


class CacheInUseError(UserError, RuntimeError):
    """Another job is building the same cache folder."""


def lock_build(folder: Path) -> int | None:
    """An exclusive lock on ``.<name>.lock`` beside ``folder`` (its file descriptor; closing it releases the
    lock, and so does the kernel when the process ends however it ends). Another job holding it: refused."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        return locks.hold(lock_path(folder), deletable=True)
    except locks.LockHeld as held:
        raise CacheInUseError(f"latent cache {folder} is being built by another job ({held.holder}); wait for it "
                              f"to finish and start this one again (it will find the cache current), or set "
                              f"another cache.dir") from None


def unlock_build(folder: Path, fd: int | None) -> None:
    """Delete the lock file, then release the lock (``lock_build``): nothing is left beside the cache."""
    locks.release(lock_path(folder), fd, delete=True)


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"
