"""EXIF orientation: every loader shows a photo upright, as image viewers (and ``datasets``' decoder) do.

The reference is ``PIL.ImageOps.exif_transpose`` of the same file; the pixels compared are those the
training and evaluation loaders produce (``ImageCaptionDataset``: imagefolder, DreamBooth instance and
class images, evaluation; ``StreamingImageCaptions``: streaming and webdataset).
"""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.config import DataConfig
from ldm.data import images as images_module
from ldm.data.images import ImageCaptionDataset, decode_image, make_example
from ldm.data.streaming import StreamingImageCaptions

REPO = Path(__file__).resolve().parents[1]
ORIENTATION = 0x0112


def _photos(folder: Path) -> Path:
    """Eight JPEGs of one 16x8 (W x H) noise picture, saved with EXIF orientation 1..8, and their captions."""
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    with open(folder / "metadata.jsonl", "w") as meta:
        for k in range(1, 9):
            exif = Image.Exif()
            exif[ORIENTATION] = k
            Image.fromarray(pixels).save(folder / f"o{k}.jpg", "JPEG", quality=95, exif=exif)
            meta.write(json.dumps({"file_name": f"o{k}.jpg", "text": f"orientation {k}"}) + "\n")
    return folder


def _expected(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The reference: exif_transpose of the file, then the loaders' own resize, crop and scaling."""
    upright = ImageOps.exif_transpose(Image.open(path))
    return make_example(upright, "", 0, 0, size, "center", flip=False)["pixel_values"]


def test_every_exif_orientation_is_read_upright_by_the_dataset(tmp_path):
    folder = _photos(tmp_path / "photos")
    for k in range(1, 9):  # the files really carry the tag, and it really turns them
        assert Image.open(folder / f"o{k}.jpg").getexif()[ORIENTATION] == k
        upright = ImageOps.exif_transpose(Image.open(folder / f"o{k}.jpg"))
        assert upright.size == ((16, 8) if k <= 4 else (8, 16))
        assert np.array_equal(np.asarray(decode_image(str(folder / f"o{k}.jpg"))), np.asarray(upright))
    ds = ImageCaptionDataset(DataConfig(path=str(folder), resolution=8))
    assert len(ds) == 8
    seen = {}
    for pos in range(8):
        item = ds[(pos, 0)]
        k = int(item["caption"].split()[-1])
        w, h = ds.sizes[pos]
        assert (w, h) == ((16, 8) if k <= 4 else (8, 16))  # buckets see the upright aspect ratio
        assert torch.equal(item["pixel_values"], _expected(folder / f"o{k}.jpg", (8, 8)))
        seen[k] = item["pixel_values"]
    assert len({t.numpy().tobytes() for t in seen.values()}) == 8  # the eight orientations all differ
    sideways = make_example(Image.open(folder / "o6.jpg"), "", 0, 0, (8, 8), "center", False)["pixel_values"]
    assert not torch.equal(seen[6], sideways)  # without the transpose a phone's portrait photo is rotated

    portrait = ImageCaptionDataset(DataConfig(path=str(folder), resolution=8, buckets=((16, 8), (8, 16))))
    for pos in range(8):  # (H, W) buckets: orientations 5-8 are portrait once upright
        k = int(portrait[(pos, 0)]["caption"].split()[-1])
        assert portrait.target_size(pos) == ((8, 16) if k <= 4 else (16, 8))
        assert torch.equal(portrait[(pos, 0)]["pixel_values"], _expected(folder / f"o{k}.jpg",
                                                                         portrait.target_size(pos)))


def test_the_streaming_loader_reads_every_orientation_upright(tmp_path):
    folder = _photos(tmp_path / "photos")
    stream = StreamingImageCaptions(DataConfig(path=str(folder), resolution=8, streaming=True), seed=0)
    items = list(itertools.islice(iter(stream), 8))
    assert sorted(it["caption"] for it in items) == [f"orientation {k}" for k in range(1, 9)]
    for item in items:
        k = int(item["caption"].split()[-1])
        expected = make_example(ImageOps.exif_transpose(Image.open(folder / f"o{k}.jpg")), "", 0, item["seed"],
                                (8, 8), "center", flip=False)["pixel_values"]
        assert torch.equal(item["pixel_values"], expected)


def test_images_are_opened_in_one_place_only():
    """Every loader reads pixels through ``decode_image`` (which turns them upright): no other ``Image.open``
    in the package, except where only the file's format is read (its bytes are copied as they are)."""
    calls = {p.relative_to(REPO).as_posix(): len(re.findall(r"Image\.open\(", p.read_text()))
             for folder in ("ldm", "train", "pipelines") for p in sorted((REPO / folder).rglob("*.py"))}
    assert {p: n for p, n in calls.items() if n} == {"ldm/data/images.py": 4, "ldm/data/split.py": 1}
    assert "format" in (REPO / "ldm/data/split.py").read_text().split("Image.open(")[1].split("\n")[0]


def test_an_unreadable_exif_block_is_ignored_as_viewers_ignore_it(tmp_path, monkeypatch):
    Image.new("RGB", (6, 4), (10, 200, 30)).save(tmp_path / "a.jpg", "JPEG")

    def broken(image, in_place=False):
        raise SyntaxError("not a TIFF file")  # what PIL raises for a mangled EXIF block

    monkeypatch.setattr(images_module.ImageOps, "exif_transpose", broken)
    assert decode_image(str(tmp_path / "a.jpg")).size == (6, 4)
