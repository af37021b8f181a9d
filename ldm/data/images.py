"""Image-caption datasets shared by every stage.

Sources (``data.path``): a local imagefolder with ``metadata.jsonl`` (``file_name`` + caption
column), a local folder of webdataset ``.tar`` shards, or a dataset name for
``datasets.load_dataset``. Images are decoded here, not by ``datasets``, so that a corrupt file
is skipped and reported by name instead of crashing step 1000.

Every image is opened by one function, ``decode_image``, which turns it upright as image viewers do
(its EXIF orientation applied: ``PIL.ImageOps.exif_transpose``, as ``datasets``' own decoder does), so
a phone's portrait photo (orientation 6) is never trained on sideways. Every example is then converted
to RGB (L, LA, P, RGBA, CMYK, 16-bit, float), resized so its shorter side matches the target, centre-
or randomly cropped, optionally flipped, and scaled to [-1, 1].

Every image is decoded once before training (``validate_images``), split across processes the way
the latent cache splits its shards; a matching prebuilt cache records that check and skips it.
"""

from __future__ import annotations

import io
import json
import logging
import random
import struct
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.config import DataConfig
from ldm.data.listing import single_split_files
from ldm.distributed import SingleProcess, gather_from_everyone
from ldm.errors import UserError
from ldm.locations import local_or_hub, not_found_here_or_on_hub

logger = logging.getLogger(__name__)
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CHECK_RUN = 1024  # records per unit of the split image check (the latent cache passes its cache.shard_size)


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
    """Open a ``datasets`` image value (dict with bytes/path, a path, bytes, or a PIL image) fully and upright.

    The one place an image is opened: every loader (imagefolder, Hub, streaming/webdataset, DreamBooth,
    evaluation) comes here, so every one applies the EXIF orientation (``upright``).
    """
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
    return upright(image)


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation (1-8) applied and the tag removed
    (``PIL.ImageOps.exif_transpose``). An unreadable EXIF block is ignored, as viewers ignore it."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (ValueError, TypeError, KeyError, IndexError, SyntaxError, struct.error):
        pass
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
class DataError(UserError, ValueError):
    """A dataset file or value is wrong; the message names the file (and line or example) and the fix."""


def load_records(data: DataConfig, streaming: bool | None = None):
    """The raw ``datasets`` table (images left undecoded) for ``data.path``.

    A local imagefolder's ``metadata.jsonl`` is checked line by line first (``check_metadata``), so a
    broken line is reported with its file and line number instead of a pyarrow error.
    """
    if not data.path:
        raise DataError("data.path is empty: set it to an imagefolder, a folder of .tar shards, or a dataset "
                        "name (e.g. `ldm data shapes --out data/shapes` then --set data.path=data/shapes)")
    streaming = data.streaming if streaming is None else streaming
    location = local_or_hub(data.path, "data.path")
    if isinstance(location, Path):
        records = _load_local(location, data, streaming)
    else:
        try:  # a Hub dataset name
            records = datasets.load_dataset(location, split=data.split, streaming=streaming)
        except (OSError, ConnectionError) as err:  # not found, offline, HTTP errors
            raise not_found_here_or_on_hub(location, "data.path", err) from err
    columns = records.column_names or list(records.features or {})
    if data.image_column not in columns:
        raise DataError(f"image column {data.image_column!r} not in {data.path}; its columns are {columns} "
                        f"(set data.image_column)")
    if isinstance(records.features.get(data.image_column), datasets.Image):
        records = records.cast_column(data.image_column, datasets.Image(decode=False))
    return records


def _load_local(path: Path, data: DataConfig, streaming: bool):
    """A local folder: webdataset shards, an imagefolder, or a saved copy of a Hub dataset."""
    if not path.is_dir():
        raise DataError(f"data.path {path} is a file; point data.path at the folder that holds the images and "
                        f"metadata.jsonl (or the .tar shards)")
    if any(path.glob("*.tar")):
        builder = "webdataset"
    elif _looks_like_imagefolder(path):
        check_metadata(path, data.caption_column)
        builder = "imagefolder"
    else:
        builder = None  # parquet/arrow/json files: datasets picks the builder
    files = single_split_files(path) if builder == "imagefolder" else None  # one walk instead of 66
    try:
        if builder is None:
            return datasets.load_dataset(str(path), split=data.split, streaming=streaming)
        if files is not None:
            return datasets.load_dataset(builder, data_files={"train": files}, split=data.split, streaming=streaming)
        return datasets.load_dataset(builder, data_dir=str(path), split=data.split, streaming=streaming)
    except Exception as err:  # pyarrow, datasets' generation and empty-folder errors: name the folder
        kind = {"webdataset": "webdataset shards", "imagefolder": "an imagefolder"}.get(builder, "a dataset folder")
        raise DataError(f"data.path {path}: cannot read it as {kind} ({_first_line(err)}); expected images with "
                        f"metadata.jsonl (file_name + {data.caption_column}), .tar shards, or parquet/arrow "
                        f"files") from err


def _looks_like_imagefolder(path: Path) -> bool:
    return (path / "metadata.jsonl").exists() or (path / "metadata.csv").exists() or any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))


def check_metadata(folder: Path, caption_column: str) -> None:
    """Every line of ``folder/metadata.jsonl`` is a JSON object with a ``file_name``; images it does not
    list are named in a warning (datasets would drop them silently). Captions are checked later, by
    ``check_captions``, only for the stages that use them."""
    path = folder / "metadata.jsonl"
    if not path.exists():
        return
    listed = set()
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path} line {number} is not valid JSON ({err.args[0]}); each line must be one "
                                f'object like {{"file_name": "0001.png", "{caption_column}": "a caption"}}') from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise DataError(f'{path} line {number} needs a "file_name" string (the image path relative to '
                                f"{folder}), got {line.strip()[:100]}")
            if row.get(caption_column) is not None and not isinstance(row[caption_column], str):
                raise DataError(f"{path} line {number}: {caption_column!r} must be a string, got "
                                f"{row[caption_column]!r}")
            listed.add(Path(row["file_name"]).as_posix())
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.relative_to(folder).as_posix() not in listed)
    if unlisted:
        logger.warning("%d image(s) in %s have no line in metadata.jsonl and are not used: %s", len(unlisted), folder,
                       ", ".join(unlisted[:10]) + (" ..." if len(unlisted) > 10 else ""))


def check_captions(records, data: DataConfig) -> None:
    """The caption column exists; in a map-style dataset every caption is a string (checked once, up front)."""
    columns = records.column_names or list(records.features or {})
    if data.caption_column not in columns:
        raise DataError(f"caption column {data.caption_column!r} not in {data.path}; its columns are {columns} "
                        f"(set data.caption_column, or add a metadata.jsonl with file_name and "
                        f"{data.caption_column})")
    if isinstance(records, datasets.Dataset):
        for index, caption in enumerate(records[data.caption_column]):
            if not isinstance(caption, str):
                caption_of({data.caption_column: caption}, data, lambda: example_name(records, data, index))


def caption_of(row: dict, data: DataConfig, name) -> str:
    """The caption of ``row``; a missing, null or non-text caption is an error naming the example.

    An empty string is a valid caption (the example then trains the unconditional model)."""
    caption = row.get(data.caption_column)
    if not isinstance(caption, str):
        raise DataError(f"caption {data.caption_column!r} of {name()} in {data.path} is {caption!r}; every example "
                        f'needs a text caption (use "" for an image without one)')
    return caption


def example_name(records, data: DataConfig, index: int) -> str:
    return f"example #{index} ({image_name(records[index][data.image_column], index)})"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def validate_images(records, image_column: str, dist=None,
                    run: int = CHECK_RUN) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    """Decode every image once: (good indices, their upright (width, height), names of the bad ones).

    Split across the processes of ``dist`` (an ``Accelerator``/``PartialState``; None = this process does
    all) as the latent cache splits its shards: the records in runs of ``run``, process r of W decodes runs
    r, r + W, r + 2W, … Every process gets the whole result; an error on any process is raised on all.
    """
    dist = dist or SingleProcess()
    column = records.select_columns([image_column])
    starts = range(0, len(records), run)[dist.process_index::dist.num_processes]
    mine = sum(min(run, len(records) - s) for s in starts)

    def check_mine() -> list[tuple[int, list[int], list[tuple[int, int]], list[str]]]:
        with tqdm(total=mine, desc="checking images", leave=False, disable=not dist.is_main_process) as bar:
            return [_check_run(column, image_column, range(s, min(s + run, len(records))), bar) for s in starts]

    runs = sorted(run for runs in gather_from_everyone(dist, check_mine) for run in runs)  # in record order
    good = [i for _, run_good, _, _ in runs for i in run_good]
    sizes = [size for _, _, run_sizes, _ in runs for size in run_sizes]
    bad = [name for *_, run_bad in runs for name in run_bad]
    if bad and dist.is_main_process:
        shown = ", ".join(bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        logger.warning("skipped %d corrupt or unreadable image(s) of %d: %s", len(bad), len(good) + len(bad), shown)
    if not good:
        raise DataError(f"no readable images in the {len(bad)} examples of column {image_column!r}"
                        + (f" (e.g. {', '.join(bad[:3])})" if bad else ""))
    return good, sizes, bad


def _check_run(column, image_column: str, indices: range, bar) -> tuple[int, list, list, list]:
    """(first index, good indices, their sizes, bad names) of the records ``indices`` (a contiguous run)."""
    good, sizes, bad = [], [], []
    for i, row in zip(indices, column.select(indices)):
        try:
            sizes.append(decode_image(row[image_column]).size)
            good.append(i)
        except DECODE_ERRORS:
            bad.append(image_name(row[image_column], i))
        bar.update()
    return indices.start, good, sizes, bad


class ImageCaptionDataset(Dataset):
    """Map-style dataset over validated examples; items are keyed by ``(position, example_seed)``.

    Each item: ``pixel_values`` (3, H, W) in [-1, 1], ``caption`` str, ``index`` (position among
    the valid examples), ``seed`` (the example's seed, for every random draw made with it).
    """

    def __init__(self, data: DataConfig, need_captions: bool = True, records=None, check: bool = True):
        self.data = data
        self.records = records if records is not None else load_records(data, streaming=False)
        if data.max_samples is not None:
            self.records = self.records.select(range(min(data.max_samples, len(self.records))))
        if need_captions:
            check_captions(self.records, data)
        self.need_captions = need_captions
        self.valid: list[int] | None = None  # set by ``check`` or ``adopt``
        self.sizes: list[tuple[int, int]] = []
        self.skipped: list[str] = []
        if check:
            self.check()

    def check(self, dist=None, run: int = CHECK_RUN) -> None:
        """Decode every image once (``validate_images``, split across the processes of ``dist``)."""
        self.adopt(*validate_images(self.records, self.data.image_column, dist, run))

    def adopt(self, valid: list[int], sizes: list[tuple[int, int]], skipped: list[str]) -> None:
        """Take the result of an image check made before (e.g. recorded in a matching latent cache)."""
        if len(valid) != len(sizes) or (valid and not 0 <= min(valid) <= max(valid) < len(self.records)):
            raise ValueError(f"an image check of {len(valid)} examples with {len(sizes)} sizes does not fit the "
                             f"{len(self.records)} records of {self.data.path}")
        self.valid, self.sizes, self.skipped = list(valid), [tuple(s) for s in sizes], list(skipped)

    @property
    def checked(self) -> bool:
        return self.valid is not None

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


def make_example(image: Image.Image, caption: str, index: int, seed: int, size: tuple[int, int], crop: str,
                 flip: bool) -> dict:
    """One training example: RGB, resized and cropped to ``size`` (H, W) with the example's seed, maybe mirrored."""
    image = resize_crop(to_rgb(image), *size, crop, random.Random(seed))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return {"pixel_values": to_tensor(image), "caption": caption, "index": index, "seed": seed}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
        "seed": torch.tensor([it["seed"] for it in items], dtype=torch.int64),
    }
