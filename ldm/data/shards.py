"""safetensors shard files written atomically and read one row at a time, with nothing mapped or kept.

A safetensors file is ``u64 n`` (little endian), an ``n``-byte JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}}``, then the tensors' bytes (offsets count from byte ``8 + n``). For a tensor
of shape ``(N, *s)`` row ``i`` is the ``[begin + i·r, begin + (i+1)·r)`` slice with ``r = (end − begin) / N``:
one ``os.pread`` reads it. The process keeps the header only, so its memory does not grow with the files
(a memory map would count every page it touched in the process's RSS), a file opened per read is safe in
forked DataLoader workers, and thousands of shards never exhaust the file-descriptor limit. Each read
checks (one ``fstat``) that the file is still the one whose header was read: a cache that another job
replaced while this one reads it is an error, never a silent mix of two caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ldm.errors import UserError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100_000_000  # safetensors' own limit


class DamagedCacheError(UserError, RuntimeError):
    """A cache file is missing, truncated or altered; the message names it and says how to rebuild."""


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path`` (``.<name>.tmp-<pid>``), fsync it, rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write ``tensors`` to ``path`` atomically (``write_atomic``); return its record ``{bytes, sha256}``
    for the manifest."""
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON (sorted keys) at ``path``, atomically (``write_atomic``)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, sort_keys=True)))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Shard:
    """The header of one safetensors file; rows come from disk at every ``row`` call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > _MAX_HEADER:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
                self.identity = _identity(os.fstat(f.fileno()))
            self.tensors = {k: _entry(v) for k, v in header.items() if k != "__metadata__"}
        except (OSError, ValueError, struct.error) as err:  # JSONDecodeError is a ValueError
            raise DamagedCacheError(f"cache shard {self.path} cannot be read ({err}); {REBUILD}") from None
        except (KeyError, TypeError, AttributeError) as err:  # an unknown dtype, a missing or odd field
            raise DamagedCacheError(f"cache shard {self.path} has an unreadable header ({type(err).__name__}: "
                                    f"{err}); {REBUILD}") from None
        self.base, size = 8 + n, self.identity[2]
        if max((end for *_, end in self.tensors.values()), default=0) + self.base > size:
            raise DamagedCacheError(f"cache shard {self.path} is truncated ({size} bytes); {REBUILD}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values()))[1][0] if self.tensors else 0

    def keys(self) -> list[str]:
        return list(self.tensors)

    def row(self, key: str, i: int, fd: int) -> torch.Tensor:
        """Row ``i`` of tensor ``key`` read through the open file ``fd`` straight into a new tensor of shape
        ``shape[1:]`` (``preadv`` into its memory: no intermediate copy)."""
        dtype, shape, begin, end = self.tensors[key]
        width = (end - begin) // shape[0]
        out = torch.empty(shape[1:], dtype=dtype)
        if os.preadv(fd, [out.view(-1).view(torch.uint8).numpy()], self.base + begin + i * width) != width:
            raise DamagedCacheError(f"cache shard {self.path} is truncated (row {i} of {key}); {REBUILD}")
        return out

    def rows(self, keys: list[str], i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` of every tensor in ``keys`` (one open, one read per tensor)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self._check_same(fd)
            return {k: self.row(k, i, fd) for k in keys}
        finally:
            os.close(fd)

    def _check_same(self, fd: int) -> None:
        """Refuse a file that is not the one whose header was read (replaced or rewritten since)."""
        if _identity(os.fstat(fd)) != self.identity:
            raise DamagedCacheError(f"cache shard {self.path} was replaced while in use (another job rebuilt the "
                                    f"cache?); restart the run, which then uses the cache now in that folder")

    def column(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (for small ones, such as the example index)."""
        dtype, shape, begin, end = self.tensors[key]
        with open(self.path, "rb") as f:
            self._check_same(f.fileno())
            data = os.pread(f.fileno(), end - begin, self.base + begin)
        if len(data) != end - begin:
            raise DamagedCacheError(f"cache shard {self.path} is truncated ({key}); {REBUILD}")
        return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def _entry(info: dict) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry; KeyError/TypeError/ValueError when it is not one."""
    begin, end = info["data_offsets"]
    shape = tuple(int(s) for s in info["shape"])
    if not shape or shape[0] <= 0:
        raise ValueError(f"a tensor of shape {shape} has no rows")
    return DTYPES[info["dtype"]], shape, int(begin), int(end)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced (another inode) or rewritten in place (size, mtime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a shard in memory (the ``cache.in_memory`` path)."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise DamagedCacheError(f"cache shard {path} cannot be read ({err}); {REBUILD}") from None


REBUILD = "delete the cache folder, or run `ldm cache build` again with the same config, to rebuild it"
