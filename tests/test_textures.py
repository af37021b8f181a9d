"""`ldm data textures` (crops of real photographs) and the class judge any data with class captions gets."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from ldm.cli import main as cli  # noqa: E402
from ldm.data.textures import TEXTURES, write_textures_dataset  # noqa: E402
from ldm.evaluation.classes import caption_classes, image_features, judge_classes  # noqa: E402
from ldm.evaluation.pipeline import data_kind  # noqa: E402

CLASSES = list(TEXTURES)


def test_ldm_data_textures_writes_crops_of_every_class(tmp_path, capsys):
    cli(["data", "textures", "--out", str(tmp_path / "t"), "--num", "20", "--size", "24"])
    assert "wrote 20 photograph crops of 24x24" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "t" / "metadata.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [i % 8 for i in range(20)]
    assert [r["text"] for r in rows] == [CLASSES[i % 8] for i in range(20)]
    image = Image.open(tmp_path / "t" / rows[0]["file_name"])
    assert image.mode == "RGB" and image.size == (24, 24)
    gray, colour = (np.asarray(Image.open(tmp_path / "t" / rows[i]["file_name"]), dtype=int) for i in (1, 6))
    assert (gray[..., 0] == gray[..., 2]).all() and not (colour[..., 0] == colour[..., 2]).all()  # grass; retina


def test_the_crops_are_a_pure_function_of_the_seed(tmp_path):
    a, b, c = (write_textures_dataset(tmp_path / name, size=16, num=8, seed=seed)
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    pixels = {name: [np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(8)]
              for name, folder in (("a", a), ("b", b), ("c", c))}
    assert all((x == y).all() for x, y in zip(pixels["a"], pixels["b"]))
    assert not all((x == y).all() for x, y in zip(pixels["a"], pixels["c"]))


def test_captions_that_name_a_few_classes_are_recognised():
    assert caption_classes(["a cat", "a dog"] * 4) == ["a cat", "a dog"]
    assert caption_classes(["a cat", "a dog"] * 3) is None  # 3 pairs per class: too few to fit and check
    assert caption_classes([f"caption {i}" for i in range(200)]) is None  # free text
    assert caption_classes(["a cat"] * 10) is None  # one class: nothing to tell apart
    assert data_kind(CLASSES * 4) == "classes"
    assert data_kind(["a handwritten digit one", "a handwritten digit two"] * 4) == "digits"


def _coloured(colour: str, n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.new("RGB", (16, 16), colour), dtype=float)
    return [Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)) for _ in range(n)]


def test_the_class_judge_checks_itself_then_reads_generated_images():
    names = ["a red square", "a blue square", "a green square"]
    fit = ([i for c, name in zip(("red", "blue", "green"), names) for i in _coloured(c, 6, 0)],
           [name for name in names for _ in range(6)])
    check = ([i for c in ("red", "blue", "green") for i in _coloured(c, 4, 1)], [n for n in names for _ in range(4)])
    right = judge_classes(check[0], check[1], fit, check)
    assert right["real_accuracy"] == 1.0 and right["real_images"] == 12 and right["accuracy"] == 1.0
    swapped = judge_classes(check[0], check[1][4:] + check[1][:4], fit, check)
    assert swapped["accuracy"] == 0.0 and swapped["per_class_accuracy"] == dict.fromkeys(sorted(names), 0.0)
    assert image_features(check[0]).shape == (12, 209)


def test_the_class_judge_withholds_its_reading_on_data_it_cannot_tell_apart():
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(40)]
    captions = [["a", "b", "c", "d"][i % 4] for i in range(40)]  # the caption has nothing to do with the image
    reading = judge_classes(noise[:20], captions[:20], (noise[:20], captions[:20]), (noise[20:], captions[20:]))
    assert reading["accuracy"] is None and "cannot read this data" in reading["withheld"]
    assert reading["real_accuracy"] < 0.9
