"""safetensors shard files written atomically and read one row at a time, with nothing mapped or kept.

A safetensors file is ``u64 n`` (little endian), an ``n``-byte JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}}``, then the tensors' bytes (offsets count from byte ``8 + n``). For a tensor
of shape ``(N, *s)`` row ``i`` is the ``[begin + i·r, begin + (i+1)·r)`` slice with ``r = (end − begin) / N``:
one ``os.pread`` reads it. The process keeps the header only, so its memory does not grow with the files
(a memory map would count every page it touched in the process's RSS), a file opened per read is safe in
forked DataLoader workers, and thousands of shards never exhaust the file-descriptor limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.errors import UserError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100_000_000  # safetensors' own limit


class DamagedCacheError(UserError, RuntimeError):
    """A cache file is missing, truncated or altered; the message names it and says how to rebuild."""


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write ``tensors`` to ``path`` atomically (a temporary name, fsync, rename); return its record
    ``{bytes, sha256}`` for the manifest."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


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
            size = self.path.stat().st_size
        except (OSError, ValueError, struct.error) as err:  # JSONDecodeError is a ValueError
            raise DamagedCacheError(f"cache shard {self.path} cannot be read ({err}); {REBUILD}") from None
        self.base = 8 + n
        self.tensors = {k: (DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"])
                        for k, v in header.items() if k != "__metadata__"}
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
            return {k: self.row(k, i, fd) for k in keys}
        finally:
            os.close(fd)

    def column(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (for small ones, such as the example index)."""
        dtype, shape, begin, end = self.tensors[key]
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), end - begin, self.base + begin)
        if len(data) != end - begin:
            raise DamagedCacheError(f"cache shard {self.path} is truncated ({key}); {REBUILD}")
        return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a shard in memory (the ``cache.in_memory`` path)."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise DamagedCacheError(f"cache shard {path} cannot be read ({err}); {REBUILD}") from None


REBUILD = "delete the cache folder, or run `ldm cache build` again with the same config, to rebuild it"
