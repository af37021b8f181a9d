"""Image-caption datasets shared by every stage.

Sources (``data.path``): a local imagefolder with ``metadata.jsonl`` (``file_name`` + caption
column), a local folder of webdataset ``.tar`` shards, or a dataset name for
``datasets.load_dataset``. Images are decoded here, not by ``datasets``, so that a corrupt file
is skipped and reported by name instead of crashing step 1000.

Every example is converted to RGB (L, LA, P, RGBA, CMYK, 16-bit, float), resized so its shorter
side matches the target, centre- or randomly cropped, optionally flipped, and scaled to [-1, 1].
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.config import DataConfig

logger = logging.getLogger(__name__)
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------
def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto ``background``."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and values.max() <= 1.0 else (255.0 if values.max() <= 255 else 65535.0)
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "RGBa", "La"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def decode_image(value) -> Image.Image:
    """Open a ``datasets`` image value (dict with bytes/path, a path, or a PIL image) fully."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, (str, Path)):
        image = Image.open(value)
    elif isinstance(value, bytes):
        image = Image.open(io.BytesIO(value))
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    image.load()
    return image


def image_name(value, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return Path(path).name if path else f"#{index}"


def resize_crop(image: Image.Image, height: int, width: int, crop: str, rng: random.Random) -> Image.Image:
    """Scale so the image covers (height, width), then crop the centre or a random window."""
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    if crop == "random":
        left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
    else:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def flip_decision(seed: int) -> bool:
    """Whether the example visit with this seed is mirrored (its own stream, apart from the crop's)."""
    return random.Random(seed ^ 0xF11F).random() < 0.5


def nearest_bucket(width: int, height: int, buckets: tuple[tuple[int, int], ...]) -> int:
    """Index of the (height, width) bucket whose aspect ratio is closest in log space."""
    ratio = np.log(width / height)
    return int(np.argmin([abs(np.log(w / h) - ratio) for h, w in buckets]))


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
def load_records(data: DataConfig, streaming: bool | None = None):
    """The raw ``datasets`` table (images left undecoded) for ``data.path``."""
    if not data.path:
        raise ValueError("data.path is empty: set it to an imagefolder, a folder of .tar shards, or a dataset "
                         "name (e.g. `ldm data shapes --out data/shapes` then --set data.path=data/shapes)")
    streaming = data.streaming if streaming is None else streaming
    path = Path(data.path)
    if path.is_dir() and any(path.glob("*.tar")):
        records = datasets.load_dataset("webdataset", data_dir=str(path), split=data.split, streaming=streaming)
    elif path.is_dir() and _looks_like_imagefolder(path):
        records = datasets.load_dataset("imagefolder", data_dir=str(path), split=data.split, streaming=streaming)
    elif not path.exists() and (path.suffix or str(data.path).startswith((".", "/", "~"))):
        raise FileNotFoundError(f"data.path {data.path} does not exist")
    else:  # a Hub dataset name, or a local copy of one (parquet/arrow/json shards)
        records = datasets.load_dataset(data.path, split=data.split, streaming=streaming)
    columns = records.column_names or list(records.features or {})
    if data.image_column not in columns:
        raise ValueError(f"image column {data.image_column!r} not in {data.path}; its columns are {columns} "
                         f"(set data.image_column)")
    if isinstance(records.features.get(data.image_column), datasets.Image):
        records = records.cast_column(data.image_column, datasets.Image(decode=False))
    return records


def _looks_like_imagefolder(path: Path) -> bool:
    image_suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    return (path / "metadata.jsonl").exists() or (path / "metadata.csv").exists() or any(
        p.suffix.lower() in image_suffixes for p in path.rglob("*"))


def check_captions(records, data: DataConfig) -> None:
    columns = records.column_names or list(records.features or {})
    if data.caption_column not in columns:
        raise ValueError(f"caption column {data.caption_column!r} not in {data.path}; its columns are {columns} "
                         f"(set data.caption_column, or add a metadata.jsonl with file_name and "
                         f"{data.caption_column})")


def validate_images(records, image_column: str) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    """Decode every image once: (good indices, their (width, height), names of the bad ones)."""
    good, sizes, bad = [], [], []
    column = records.select_columns([image_column])
    for i, row in enumerate(tqdm(column, desc="checking images", leave=False)):
        try:
            image = decode_image(row[image_column])
            good.append(i)
            sizes.append(image.size)
        except DECODE_ERRORS:
            bad.append(image_name(row[image_column], i))
    if bad:
        shown = ", ".join(bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        logger.warning("skipped %d corrupt or unreadable image(s) of %d: %s", len(bad), len(good) + len(bad), shown)
    if not good:
        raise ValueError(f"no readable images in {len(bad)} examples")
    return good, sizes, bad


class ImageCaptionDataset(Dataset):
    """Map-style dataset over validated examples; items are keyed by ``(position, example_seed)``.

    Each item: ``pixel_values`` (3, H, W) in [-1, 1], ``caption`` str, ``index`` (position among
    the valid examples), ``seed`` (the example's seed, for every random draw made with it).
    """

    def __init__(self, data: DataConfig, need_captions: bool = True, records=None):
        self.data = data
        self.records = records if records is not None else load_records(data, streaming=False)
        if need_captions:
            check_captions(self.records, data)
        if data.max_samples is not None:
            self.records = self.records.select(range(min(data.max_samples, len(self.records))))
        self.valid, self.sizes, self.skipped = validate_images(self.records, data.image_column)
        self.need_captions = need_captions

    def __len__(self) -> int:
        return len(self.valid)

    def groups(self) -> list[list[int]]:
        """Positions grouped by aspect bucket (a single group when no buckets are configured)."""
        if not self.data.buckets:
            return [list(range(len(self)))]
        groups: list[list[int]] = [[] for _ in self.data.buckets]
        for pos, (w, h) in enumerate(self.sizes):
            groups[nearest_bucket(w, h, self.data.buckets)].append(pos)
        return [g for g in groups if g]

    def target_size(self, pos: int) -> tuple[int, int]:
        if not self.data.buckets:
            return self.data.resolution, self.data.resolution
        w, h = self.sizes[pos]
        return self.data.buckets[nearest_bucket(w, h, self.data.buckets)]

    def __getitem__(self, key) -> dict:
        pos, seed = key if isinstance(key, tuple) else (key, 0)
        return self.load(pos, seed, flip=self.data.random_flip and flip_decision(seed))

    def load(self, pos: int, seed: int, flip: bool) -> dict:
        """Example ``pos``, cropped with the example's ``seed`` and mirrored when ``flip``."""
        row = self.records[self.valid[pos]]
        caption = row[self.data.caption_column] if self.need_captions else ""
        return make_example(decode_image(row[self.data.image_column]), caption, pos, seed, self.target_size(pos),
                            self.data.crop, flip)

    def name(self, pos: int) -> str:
        return image_name(self.records[self.valid[pos]][self.data.image_column], self.valid[pos])


def make_example(image: Image.Image, caption, index: int, seed: int, size: tuple[int, int], crop: str,
                 flip: bool) -> dict:
    """One training example: RGB, resized and cropped to ``size`` (H, W) with the example's seed, maybe mirrored."""
    image = resize_crop(to_rgb(image), *size, crop, random.Random(seed))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return {"pixel_values": to_tensor(image), "caption": str(caption), "index": index, "seed": seed}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
        "seed": torch.tensor([it["seed"] for it in items], dtype=torch.int64),
    }
