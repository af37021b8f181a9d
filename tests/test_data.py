"""Data layer: built-in shapes, image-mode conversion, corrupt files, sources, transforms, data order."""

import io
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import DataConfig
from ldm.data.images import ImageCaptionDataset, collate, load_records, resize_crop, to_rgb, to_tensor
from ldm.data.sampler import ResumableBatchSampler
from ldm.data.shapes import COLOURS, KINDS, make_scene, render, write_shapes_dataset


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------
def test_shapes_dataset_is_deterministic_and_captioned(tmp_path):
    a = write_shapes_dataset(tmp_path / "a", num=40, size=24, seed=3)
    b = write_shapes_dataset(tmp_path / "b", num=40, size=24, seed=3)
    c = write_shapes_dataset(tmp_path / "c", num=40, size=24, seed=4)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        img = Image.open(a / row["file_name"])
        assert img.size == (24, 24) and img.mode == "RGB"
        assert (a / row["file_name"]).read_bytes() == (b / row["file_name"]).read_bytes()
        for shape in row["shapes"]:
            assert f"{shape['size']} {shape['colour']} {shape['kind']} in the {shape['position']}" in row["text"]
        assert row["text"].endswith(f"on a {row['background']} background")
    assert (a / "metadata.jsonl").read_text() != (c / "metadata.jsonl").read_text()


def test_shapes_cover_colours_kinds_and_layouts():
    scenes = [make_scene(i, 0, 32) for i in range(400)]
    shapes = [s for scene in scenes for s in scene.shapes]
    assert {s.colour for s in shapes} == set(COLOURS) and len(COLOURS) >= 6
    assert {s.kind for s in shapes} == set(KINDS) and len(KINDS) >= 4
    assert {s.size for s in shapes} == {"small", "large"}
    assert len({s.cell for s in shapes}) == 9 and len({sc.background for sc in scenes}) >= 3
    assert {len(sc.shapes) for sc in scenes} == {1, 2}
    for scene in (sc for sc in scenes if len(sc.shapes) == 2):
        a, b = scene.shapes
        assert a.colour != b.colour
        assert abs(a.cx - b.cx) >= (a.side + b.side) / 2 or abs(a.cy - b.cy) >= (a.side + b.side) / 2


@pytest.mark.parametrize("size", [16, 48, 96])
def test_shapes_render_at_any_size_from_16(size):
    scene = make_scene(0, 1, size, two_shape_prob=0.0)
    pixels = np.asarray(render(scene, size))
    assert pixels.shape == (size, size, 3)
    shape = scene.shapes[0]
    assert np.abs(pixels[int(shape.cy), int(shape.cx)] - np.array(COLOURS[shape.colour])).max() < 40


def test_shapes_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size must be >= 16"):
        write_shapes_dataset(tmp_path, num=2, size=12)
    with pytest.raises(ValueError, match="unknown colours"):
        write_shapes_dataset(tmp_path, num=2, colours=("mauve",))


# --------------------------------------------------------------------------------------------
# image modes
# --------------------------------------------------------------------------------------------
def _rgb(image):
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def test_every_mode_converts_to_rgb():
    assert (_rgb(Image.new("L", (2, 2), 77)) == 77).all()
    assert (_rgb(Image.new("1", (2, 2), 1)) == 255).all()
    assert (_rgb(Image.new("RGB", (2, 2), (1, 2, 3))) == [1, 2, 3]).all()
    assert (_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == [255, 0, 0]).all()  # cyan=0 -> red
    # transparency is composited onto white: half-transparent black -> mid gray
    assert np.abs(_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128))).astype(int) - 127).max() <= 1
    assert np.abs(_rgb(Image.new("LA", (2, 2), (0, 128))).astype(int) - 127).max() <= 1
    assert (_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 255))) == [10, 20, 30]).all()


def test_palette_modes_with_and_without_transparency():
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert (_rgb(p) == [200, 10, 10]).all()
    p.info["transparency"] = 1  # index 1 is fully transparent -> white background
    assert (_rgb(p) == 255).all()


def test_16_bit_and_float_images_are_rescaled():
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16") or sixteen.mode == "I"
    assert (_rgb(sixteen) == 255).all()
    half = Image.fromarray(np.full((2, 2), 32768, dtype=np.int32), "I")
    assert np.abs(_rgb(half).astype(int) - 128).max() <= 1
    buf = io.BytesIO()  # a real 16-bit PNG file round trip
    Image.fromarray(np.full((3, 3), 16384, dtype=np.uint16)).save(buf, format="PNG")
    assert np.abs(_rgb(Image.open(buf)).astype(int) - 64).max() <= 1
    assert (_rgb(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F")) == 128).all()


# --------------------------------------------------------------------------------------------
# folders, corrupt files, Hub-style datasets
# --------------------------------------------------------------------------------------------
def _write_folder(root, names_and_images):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for name, image in names_and_images:
            if isinstance(image, bytes):
                (root / name).write_bytes(image)
            else:
                image.save(root / name)
            f.write(json.dumps({"file_name": name, "text": f"caption of {name}"}) + "\n")


def test_corrupt_and_unreadable_files_are_skipped_and_named(tmp_path, caplog):
    good = Image.new("RGB", (20, 10), (255, 0, 0))
    buf = io.BytesIO()
    good.save(buf, format="PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    _write_folder(tmp_path / "d", [("a.png", good), ("b.png", truncated), ("c.png", b"not an image"),
                                   ("d.png", Image.new("L", (10, 20), 9))])
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(DataConfig(path=str(tmp_path / "d"), resolution=8))
    assert len(ds) == 2 and sorted(ds.skipped) == ["b.png", "c.png"]
    assert "skipped 2 corrupt or unreadable image(s) of 4: b.png, c.png" in caplog.text
    items = [ds[(i, 0)] for i in range(2)]
    assert {it["caption"] for it in items} == {"caption of a.png", "caption of d.png"}
    assert all(it["pixel_values"].shape == (3, 8, 8) for it in items)


def test_errors_for_missing_path_and_columns(tmp_path):
    with pytest.raises(ValueError, match="data.path is empty"):
        load_records(DataConfig(path=""))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(DataConfig(path=str(tmp_path / "missing")))
    write_shapes_dataset(tmp_path / "s", num=4, size=16)
    with pytest.raises(ValueError, match="caption column 'caption' not in .*set data.caption_column"):
        ImageCaptionDataset(DataConfig(path=str(tmp_path / "s"), caption_column="caption"))
    with pytest.raises(ValueError, match="image column 'img' not in"):
        load_records(DataConfig(path=str(tmp_path / "s"), image_column="img"))


def test_dataset_name_route_with_custom_columns(tmp_path):
    """A Hub-style dataset (parquet shards, non-default column names) through datasets.load_dataset."""
    import datasets

    images = []
    for colour in ((255, 0, 0), (0, 0, 255)):
        buf = io.BytesIO()
        Image.new("RGB", (12, 12), colour).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    table = datasets.Dataset.from_dict({"img": images, "prompt": ["red", "blue"]},
                                       features=datasets.Features({"img": datasets.Image(),
                                                                   "prompt": datasets.Value("string")}))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    ds = ImageCaptionDataset(DataConfig(path=str(tmp_path / "hub"), image_column="img", caption_column="prompt",
                                        resolution=8))
    first = ds[(0, 0)]
    assert first["caption"] == "red" and torch.allclose(first["pixel_values"][0], torch.ones(8, 8))


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------
def test_resize_crop_center_random_and_flip(tmp_path):
    import random

    image = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3) % 251)
    centre = resize_crop(image, 10, 10, "center", random.Random(0))
    assert centre.size == (10, 10)
    crops = {np.asarray(resize_crop(image, 10, 10, "random", random.Random(s))).tobytes() for s in range(8)}
    assert len(crops) > 1
    assert np.asarray(resize_crop(image, 10, 10, "random", random.Random(5))).tobytes() == \
        np.asarray(resize_crop(image, 10, 10, "random", random.Random(5))).tobytes()
    t = to_tensor(Image.new("RGB", (2, 2), (255, 0, 128)))
    assert t.shape == (3, 2, 2) and t[0].eq(1).all() and t[1].eq(-1).all()

    root = write_shapes_dataset(tmp_path / "s", num=8, size=16)
    ds = ImageCaptionDataset(DataConfig(path=str(root), resolution=16, random_flip=True))
    flips = [torch.equal(ds[(0, s)]["pixel_values"], ds[(0, 0)]["pixel_values"].flip(-1)) for s in range(1, 20)]
    same = [torch.equal(ds[(0, s)]["pixel_values"], ds[(0, 0)]["pixel_values"]) for s in range(1, 20)]
    assert any(flips) and any(same) and all(f or s for f, s in zip(flips, same))
    batch = collate([ds[(i, i)] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["seed"].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------
def _indices(batches):
    return [[i for i, _ in b] for b in batches]


def test_sampler_resumes_exactly_and_splits_across_ranks():
    groups = [list(range(23))]
    full = list(itertools.islice(ResumableBatchSampler(groups, 4, seed=1), 15))  # crosses epochs (5 per epoch)
    resumed = list(itertools.islice(ResumableBatchSampler(groups, 4, seed=1, start=7), 8))
    assert resumed == full[7:]
    r0 = ResumableBatchSampler(groups, 2, seed=1, rank=0, world_size=2)
    r1 = ResumableBatchSampler(groups, 2, seed=1, rank=1, world_size=2)
    assert [a + b for a, b in itertools.islice(zip(r0, r1), 15)] == full
    epoch0 = sum(_indices(full[:5]), [])
    assert len(set(epoch0)) == 20  # no repeats within an epoch
    assert _indices(full[:5]) != _indices(full[5:10])  # a new permutation each epoch
    seeds = [s for b in full for _, s in b]
    assert len(set(seeds)) == len(seeds)  # every visit has its own seed


def test_sampler_buckets_never_mix_and_errors_on_tiny_data():
    groups = [list(range(0, 10)), list(range(10, 16))]
    batches = _indices(itertools.islice(ResumableBatchSampler(groups, 3, seed=0), 10))
    assert all(set(b) <= set(groups[0]) or set(b) <= set(groups[1]) for b in batches)
    assert any(set(b) <= set(groups[1]) for b in batches)
    with pytest.raises(ValueError, match="fills one global batch of 8"):
        ResumableBatchSampler([list(range(5))], 4, seed=0, world_size=2)
