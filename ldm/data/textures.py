"""Real photographs, none made here: crops of the pictures that ship inside scikit-image (`ldm data textures`).

Eight classes with their own colours and textures (three grayscale: brick, grass, gravel; five in colour),
a second real dataset beside the digits, with layouts and palettes unlike the shapes. Each image is a
random square crop of one photograph, its side drawn uniformly from [MIN_CROP, MAX_CROP] of the usable
region's shorter side, mirrored left-right with probability 1/2, and area-resized to ``size`` pixels.
The caption names the class ("a photo of gravel"); a ``label`` column holds its index. The crops are a
pure function of (size, per_class, seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ldm.config import ConfigError
from ldm.data.images import decode_image

# caption -> (file in skimage/data, usable region (left, top, right, bottom) as fractions of the picture)
TEXTURES = {
    "a photo of a brick wall": ("brick.png", (0, 0, 1, 1)),
    "a photo of grass": ("grass.png", (0, 0, 1, 1)),
    "a photo of gravel": ("gravel.png", (0, 0, 1, 1)),
    "a photo of a cup of coffee": ("coffee.png", (0, 0, 1, 1)),
    "a photo of a cat": ("chelsea.png", (0, 0, 1, 1)),
    "a photo of deep space": ("hubble_deep_field.jpg", (0, 0, 1, 1)),
    "a photo of a retina": ("retina.jpg", (0.2, 0.2, 0.8, 0.8)),  # inside the fundus circle: no black border
    "a micrograph of stained tissue": ("ihc.png", (0, 0, 1, 1)),
}
MIN_CROP, MAX_CROP = 0.15, 0.4
INSTALL_HINT = "the textures are the photographs bundled in scikit-image: pip install scikit-image"


def photographs() -> dict[str, Image.Image]:
    """caption -> the usable region of its photograph (RGB), read from scikit-image's own data folder."""
    try:
        import skimage
    except ImportError as error:
        raise ConfigError(f"`ldm data textures` needs scikit-image: {INSTALL_HINT}") from error
    folder = Path(skimage.__file__).parent / "data"
    regions = {}
    for text, (name, (left, top, right, bottom)) in TEXTURES.items():
        if not (folder / name).is_file():
            raise ConfigError(f"{folder / name} is missing: this scikit-image does not bundle it ({INSTALL_HINT})")
        picture = decode_image(folder / name).convert("RGB")
        w, h = picture.size
        regions[text] = picture.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
    return regions


def random_crop(picture: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """One square crop of side ~ U[MIN_CROP, MAX_CROP] · min(w, h), mirrored with p = 1/2, resized to ``size``."""
    w, h = picture.size
    side = max(size, round(rng.uniform(MIN_CROP, MAX_CROP) * min(w, h)))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = picture.crop((left, top, left + side, top + side)).resize((size, size), Image.BOX)
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def write_textures_dataset(out: str | Path, size: int = 32, num: int = 1600, seed: int = 0) -> Path:
    """Write ``num`` crops as PNGs + ``metadata.jsonl`` (file_name, text, label); image i is of class i mod 8."""
    if size < 8:
        raise ConfigError(f"size must be >= 8 pixels, got {size}")
    if num < len(TEXTURES):
        raise ConfigError(f"num must be >= {len(TEXTURES)} (one image per class), got {num}")
    regions = photographs()
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w") as meta:
        for i in range(num):
            label = i % len(TEXTURES)
            text = list(TEXTURES)[label]
            name = f"{i:05d}.png"
            random_crop(regions[text], size, rng).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": text, "label": label}) + "\n")
    return out
