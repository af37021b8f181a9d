"""Reading a latent cache (written by ``ldm.data.cache.build_cache``): checked at open, rows read from disk.

``CachedLatentDataset`` keeps only each shard's header and two small arrays (position -> shard, row:
int32 + int64, 12 bytes per example), and reads an example's rows with ``os.pread`` when the DataLoader
asks for it (``ldm.data.shards``): a process's memory does not grow with the cache, and every process on every
machine can read one cache on a shared filesystem. ``in_memory=True`` loads every shard at start
instead (the same tensors, bit for bit; faster for a small cache that fits in RAM).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.images import flip_decision
from ldm.data.shards import REBUILD, DamagedCacheError, Shard, file_sha256, load_shard


def read_manifest(folder: Path) -> dict:
    """The cache's ``manifest.json``; a missing or unreadable one is a ``DamagedCacheError``."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        if not isinstance(manifest.get("shards"), list) or not isinstance(manifest.get("fingerprint"), dict):
            raise ValueError("no shard list or fingerprint")
        return manifest
    except (OSError, ValueError, AttributeError) as err:
        raise DamagedCacheError(f"latent cache {folder} has no readable manifest.json ({err}); {REBUILD}") from None


def check_cache(folder: Path, manifest: dict, full: bool = False) -> list[str]:
    """What is wrong with the cache's files: missing, or another size than the manifest records (``full``:
    also another sha256). Empty when the cache is intact. Sizes cost one ``stat`` per shard."""
    problems = []
    files = [*manifest["shards"], {"name": "empty.safetensors", **manifest.get("empty", {})}]
    if "images" in manifest:  # the image check (caches of version 3 on)
        files.append({"name": "images.safetensors", **manifest["images"]})
    for record in files:
        path = Path(folder) / record["name"]
        if not path.is_file():
            problems.append(f"{record['name']} is missing")
        elif path.stat().st_size != record.get("bytes"):
            problems.append(f"{record['name']} has {path.stat().st_size} bytes, the manifest says {record.get('bytes')}")
        elif full and file_sha256(path) != record.get("sha256"):
            problems.append(f"{record['name']} has another sha256 than the manifest records")
    return problems


class CachedLatentDataset(Dataset):
    """Items keyed like ``ImageCaptionDataset``: ``(position, example_seed)`` -> cached tensors (as stored:
    the cache's dtype; training casts them to its compute dtype)."""

    def __init__(self, folder: str | Path, dataset=None, in_memory: bool = False):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        problems = check_cache(self.folder, manifest)
        if problems:
            raise DamagedCacheError(f"latent cache {self.folder} is damaged: {'; '.join(problems[:5])}; {REBUILD}")
        self.flip = bool(manifest["fingerprint"]["flip"])
        self.shards = [Shard(self.folder / record["name"]) for record in manifest["shards"]]
        self.shard_of, self.row_of = self._locate(int(manifest["examples"]))
        self.loaded = [load_shard(s.path) for s in self.shards] if in_memory else None
        if dataset is not None and len(dataset) != len(self):
            raise ValueError(f"cache {folder} holds {len(self)} examples, the dataset {len(dataset)}; rebuild it")

    def _locate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """position -> (shard, row) from each shard's ``index``; every position exactly once."""
        shard_of, row_of = np.full(n, -1, np.int32), np.zeros(n, np.int64)
        for k, shard in enumerate(self.shards):
            index = shard.column("index").numpy()
            if len(index) and (index.min() < 0 or index.max() >= n or (shard_of[index] >= 0).any()):
                raise DamagedCacheError(f"cache shard {shard.path} holds positions outside 0..{n - 1} or twice; "
                                        f"{REBUILD}")
            shard_of[index], row_of[index] = k, np.arange(len(index))
        if (shard_of < 0).any():
            raise DamagedCacheError(f"latent cache {self.folder} lacks {int((shard_of < 0).sum())} of its {n} "
                                    f"examples; {REBUILD}")
        return shard_of, row_of

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, key) -> dict:
        pos, seed = key
        k, row = int(self.shard_of[pos]), int(self.row_of[pos])
        suffix = "_flip" if self.flip and flip_decision(seed) else ""
        names = ["mean" + suffix, "logvar" + suffix, "text"]
        rows = {n: self.loaded[k][n][row] for n in names} if self.loaded else self.shards[k].rows(names, row)
        return {"mean": rows[names[0]], "logvar": rows[names[1]], "text": rows["text"], "index": pos, "seed": seed}


def collate_cached(items: list[dict]) -> dict:
    batch = {k: torch.stack([it[k] for it in items]) for k in ("mean", "logvar", "text")}
    batch["index"] = torch.tensor([it["index"] for it in items])
    batch["seed"] = torch.tensor([it["seed"] for it in items], dtype=torch.int64)
    return batch
