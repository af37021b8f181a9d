"""A small real dataset that ships inside a pip package: scikit-learn's handwritten digits.

``sklearn.datasets.load_digits`` holds 1,797 8x8 grayscale scans of handwritten digits (UCI
"Optical Recognition of Handwritten Digits", 43 writers; 0 = paper, 16 = ink) bundled in the
scikit-learn wheel, so it works offline. ``write_digits_dataset`` writes them as an imagefolder:
dark ink on white paper, upscaled (bicubic) to ``size`` pixels, RGB, with ``metadata.jsonl``
captions like "a handwritten digit seven" and the label in a ``label`` column.

    pip install -e ".[real]"      # scikit-learn
    ldm data digits --out data/digits --size 32
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.config import ConfigError
from ldm.errors import UserError

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION = "a handwritten digit {}"
CAPTION_PATTERN = re.compile(r"^a handwritten digit (" + "|".join(NAMES) + r")$")
INK_LEVELS = 16  # load_digits values run from 0 (paper) to 16 (ink)


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float in [0, 16], labels [1797] int) from the scikit-learn wheel."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise MissingExtraError("the digits data ships with scikit-learn: pip install -e \".[real]\" "
                          "(or pip install scikit-learn)") from err
    bunch = sklearn_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def caption(label: int) -> str:
    return CAPTION.format(NAMES[label])


def label_of(text: str) -> int | None:
    """The digit a digits caption names, or None for any other caption."""
    match = CAPTION_PATTERN.match(text.strip())
    return NAMES.index(match.group(1)) if match else None


def render_digit(image: np.ndarray, size: int = 32) -> Image.Image:
    """An 8x8 ink image (0-16) -> RGB ``size`` x ``size``: dark ink on white, bicubic upscale."""
    paper = np.clip(255.0 * (1.0 - image / INK_LEVELS), 0, 255).round().astype(np.uint8)
    gray = Image.fromarray(paper, "L")
    if size != gray.width:
        gray = gray.resize((size, size), Image.BICUBIC)
    return gray.convert("RGB")


def write_digits_dataset(out: str | Path, size: int = 32, num: int | None = None) -> Path:
    """Write the first ``num`` (default all 1,797) digits as PNGs + ``metadata.jsonl`` (file_name, text, label)."""
    if size < 8:
        raise ConfigError(f"size must be >= 8 pixels (the scans are 8x8), got {size}")
    images, labels = load_digits()
    num = len(images) if num is None else num
    if not 1 <= num <= len(images):
        raise ConfigError(f"num must be in [1, {len(images)}], got {num}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w") as meta:
        for i in range(num):
            name = f"{i:05d}.png"
            render_digit(images[i], size).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": caption(int(labels[i])), "label": int(labels[i])}) + "\n")
    return out
