"""Every held-out split: a seeded split of a user's data written as two imagefolders (the source is only read),
and the held-out positions and picks inside one dataset (stage 0, the evaluations, the validation loss).

    split_heldout("my_images", "OUT/data", heldout=0.15, seed=0)
    -> OUT/data/train/, OUT/data/heldout/   images (copied) + metadata.jsonl (file_name, text, other columns)
       OUT/data/split.json                  what was split: source, sizes, seed, held-out indices

Which examples are held out is a pure function of (number of examples, count, seed): a
permutation from ``numpy.random.default_rng(seed)``; the first ``count`` of it are held out.
Any source ``ldm.data.images.load_records`` reads works (imagefolder, webdataset shards, a dataset
name). Rerunning with the same source and arguments reuses the split; other arguments are an error.

Inside one dataset: ``split_heldout_positions`` (stage 0: the last pairs), ``pick_examples`` and
``heldout_halves`` (seeded picks for the evaluations), ``heldout_data_config`` (the validation loss's data).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_folder
from ldm.config import ConfigError, DataConfig
from ldm.locations import LocationError

logger = logging.getLogger(__name__)
MIN_HELDOUT = 4  # FD and KID compare two halves of at least 2 pairs each


def heldout_count(total: int, heldout: float, max_fraction_count: int | None = None) -> int:
    """``heldout`` < 1 is a fraction of ``total`` (rounded, at most ``max_fraction_count``); >= 1 a count."""
    if heldout <= 0:
        raise ConfigError(f"--heldout must be > 0 (a fraction below 1 or a count), got {heldout}")
    if heldout < 1:
        count = round(heldout * total)
        count = min(count, max_fraction_count) if max_fraction_count else count
    else:
        if heldout != int(heldout):
            raise ConfigError(f"--heldout {heldout}: a count must be a whole number")
        count = int(heldout)
    if count < MIN_HELDOUT or count > total - 1:
        raise ConfigError(f"holding out {count} of {total} examples leaves too few on one side: hold out at least "
                         f"{MIN_HELDOUT} and keep at least 1 for training (set --heldout)")
    return count


def split_heldout(source: str | Path, root: str | Path, heldout: float = 0.15, seed: int = 0,
                  caption_column: str = "text", image_column: str = "image",
                  max_fraction_count: int | None = None) -> tuple[Path, Path]:
    """Write ``root/train`` and ``root/heldout`` (imagefolders with a ``text`` caption column) once."""
    from ldm.data.images import check_captions, load_records

    root = Path(root)
    data = DataConfig(path=str(source), caption_column=caption_column, image_column=image_column)
    records = load_records(data, streaming=False)
    check_captions(records, data)
    count = heldout_count(len(records), heldout, max_fraction_count)
    order = np.random.default_rng(seed).permutation(len(records))
    held, train = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    origin = str(Path(source).resolve()) if Path(source).exists() else str(source)
    plan = {"source": origin, "examples": len(records), "seed": seed, "train": len(train), "heldout": count,
            "heldout_indices": held}
    marker = root / "split.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done != plan:
            raise LocationError(f"{root} holds a split of {done['source']} ({done['examples']} examples, "
                             f"{done['heldout']} held out, seed {done['seed']}); this run asks for {origin} "
                             f"({len(records)} examples, {count} held out, seed {seed}): use another --out")
        return root / "train", root / "heldout"
    with atomic_folder(root) as tmp:
        for name, indices in (("train", train), ("heldout", held)):
            write_subset(records, indices, tmp / name, data)
        (tmp / "split.json").write_text(json.dumps(plan))
    logger.info("split %s: %d for training, %d held out (seed %d) -> %s", origin, len(train), count, seed, root)
    return root / "train", root / "heldout"


def write_subset(records, indices: list[int], folder: Path, data: DataConfig) -> None:
    """Copy the images of ``indices`` into ``folder`` with a metadata.jsonl (caption column -> ``text``)."""
    folder.mkdir(parents=True)
    width = max(5, len(str(len(records))))
    with open(folder / "metadata.jsonl", "w") as meta:
        for index in tqdm(indices, desc=f"writing {folder.name}", leave=False):
            row = records[index]
            name = f"{index:0{width}d}{copy_image(row[data.image_column], folder / f'{index:0{width}d}')}"
            extra = {k: v for k, v in row.items() if k not in (data.image_column, data.caption_column, "file_name",
                                                                 "text") and _plain(v)}
            meta.write(json.dumps({"file_name": name, "text": str(row[data.caption_column]), **extra}) + "\n")


def copy_image(value, stem: Path) -> str:
    """Write one undecoded image (a path, bytes, or a dict with either) to ``stem`` + its suffix; return the suffix."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, Path)) else None
    raw = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    if raw is None and path and Path(path).is_file():
        suffix = Path(path).suffix.lower() or ".png"
        shutil.copyfile(path, stem.with_suffix(suffix))
        return suffix
    if raw is not None:
        try:
            kind = (Image.open(io.BytesIO(raw)).format or "png").lower()
        except Exception:  # an unreadable image is copied as it is; the stages skip and name it
            kind = "png"
        suffix = {"jpeg": ".jpg"}.get(kind, f".{kind}")
        stem.with_suffix(suffix).write_bytes(raw)
        return suffix
    if isinstance(value, Image.Image):
        value.save(stem.with_suffix(".png"))
        return ".png"
    raise ValueError(f"cannot copy an image from {type(value).__name__} {str(value)[:80]!r}")


def _plain(value) -> bool:
    """JSON scalars (and lists of them) are kept as metadata columns; anything else is dropped."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


# --------------------------------------------------------------------------------------------
# Held-out positions and picks inside one dataset (stage 0, evaluation, the validation loss)
# --------------------------------------------------------------------------------------------
def split_heldout_positions(total: int, count: int) -> tuple[list[int], list[int]]:
    """(train positions, held-out positions): the last ``count`` of ``total`` pairs are never trained on."""
    if count >= total:
        raise ValueError(f"eval_samples={count} leaves no training pairs out of {total}; lower eval_samples")
    return list(range(total - count)), list(range(total - count, total))


def seeded_order(total: int, seed: int) -> list[int]:
    """A permutation of 0..total−1 from ``torch.randperm`` with a generator seeded ``seed``."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()


def pick_examples(total: int, num: int, seed: int) -> list[int]:
    """``num`` distinct positions out of ``total``, a seeded random choice (all of them if fewer)."""
    from ldm.data.images import DataError

    if total < 2:
        raise DataError(f"retrieval needs at least 2 image-caption pairs, the data has {total}")
    if num > total:
        logger.warning("asked for %d pairs, the data has %d: using all of them", num, total)
    return sorted(seeded_order(total, seed)[:num])


def heldout_halves(dataset, num: int, seed: int) -> tuple[dict, dict]:
    """Two disjoint batches A, B of ``num // 2`` held-out pairs each, chosen by a seeded shuffle."""
    from ldm.data.images import collate

    order = seeded_order(len(dataset), seed)
    half = min(num, len(dataset)) // 2
    return collate([dataset[i] for i in order[:half]]), collate([dataset[i] for i in order[half:2 * half]])


def heldout_data_config(data: DataConfig, path: str, num: int) -> DataConfig:
    """The training data's columns, split and resolution on the held-out ``path``: its first ``num`` examples,
    centre-cropped square, unflipped, not streamed."""
    return dataclasses.replace(data, path=path, max_samples=num, buckets=(), crop="center", random_flip=False,
                               streaming=False, num_workers=0)
