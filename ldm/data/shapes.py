"""The built-in captioned dataset: one or two coloured shapes on a plain background.

Every image is a pure function of ``(seed, index)``, so a dataset of any size is reproducible
and any single example can be regenerated. Captions name each shape's size, colour, kind and
position, then the background: "a small red circle in the top left on a gray background".

The same geometry (``shape_mask``) is used by the judge in ``ldm.evaluation.judge`` to fit
templates to generated images, so the two can never disagree about what a "triangle" is.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
# Colours the default data never uses: concepts for fine-tuning tests and demos.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (250, 135, 200), "cyan": (40, 215, 225)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"gray": (128, 128, 128), "white": (245, 245, 245),
                                                "black": (15, 15, 15)}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
EXTRA_KINDS: tuple[str, ...] = ("diamond", "ring")  # drawn on request only: shapes the default data never uses
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
# A caption's position words -> (row, col) of the 3x3 grid ("center" is the middle cell).
CELLS: dict[str, tuple[int, int]] = {("center" if (r, c) == (1, 1) else f"{ROWS[r]} {COLS[c]}"): (r, c)
                                     for r in range(3) for c in range(3)}
# Side of the shape as a fraction of the image side. At 32 px "small" is 11-13 px: a latent pixel of
# an f=4 VAE covers 4x4, and shapes below ~10 px came out of a CPU-sized U-Net as blobs (judge 0.5).
SIZES: dict[str, tuple[float, float]] = {"small": (0.34, 0.40), "large": (0.48, 0.56)}
SUPERSAMPLE = 4  # render at 4x and downsample, so edges are anti-aliased


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str  # "small" | "large"
    cell: tuple[int, int]  # (row, col) on the 3x3 grid
    cx: float  # centre and side length in pixels
    cy: float
    side: float

    @property
    def position(self) -> str:
        return next(name for name, cell in CELLS.items() if cell == self.cell)

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} in the {self.position}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str

    @property
    def caption(self) -> str:
        return " and ".join(s.describe() for s in self.shapes) + f" on a {self.background} background"


def shape_mask(kind: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """Coverage in [0, 1] of a ``kind`` shape with centre (cx, cy) and bounding square ``side``."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    _draw(ImageDraw.Draw(canvas), kind, cx * s, cy * s, side * s, 255)
    small = canvas.resize((width, height), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene, size: int, palette: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (anti-aliased by supersampling)."""
    palette = palette or {**COLOURS, **EXTRA_COLOURS}
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw(draw, shape.kind, shape.cx * s, shape.cy * s, shape.side * s, palette[shape.colour])
    return canvas.resize((size, size), Image.BOX)


def sample_scene(rng: random.Random, size: int, colours: tuple[str, ...] = tuple(COLOURS),
                 two_shape_prob: float = 0.3, kinds: tuple[str, ...] = KINDS) -> Scene:
    """Draw a random scene: 1 shape, or 2 non-overlapping shapes of different colours."""
    count = 2 if rng.random() < two_shape_prob else 1
    for _ in range(100):  # rejection sampling for non-overlapping pairs
        cells = rng.sample([(r, c) for r in range(3) for c in range(3)], count)
        chosen = rng.sample(colours, count)
        shapes = tuple(_sample_shape(rng, size, cell, colour, rng.choice(kinds))
                       for cell, colour in zip(cells, chosen))
        if count == 1 or not _overlap(*shapes):
            return Scene(shapes, rng.choice(tuple(BACKGROUNDS)))
    raise RuntimeError(f"could not place two shapes without overlap at size {size}")


def make_scene(index: int, seed: int, size: int, **kwargs) -> Scene:
    """The scene number ``index`` of the dataset with ``seed`` (independent of every other index)."""
    return sample_scene(random.Random(f"shapes-{seed}-{index}"), size, **kwargs)


def single_shape_scenes(num: int, seed: int, size: int, colours: tuple[str, ...] = tuple(COLOURS),
                        kinds: tuple[str, ...] = KINDS) -> list[Scene]:
    """Held-out single-shape scenes (their captions are the judge's prompts)."""
    return [make_scene(i, seed, size, colours=colours, kinds=kinds, two_shape_prob=0.0) for i in range(num)]


def write_shapes_dataset(out: str | Path, num: int = 2000, size: int = 32, seed: int = 0,
                         colours: tuple[str, ...] = tuple(COLOURS), two_shape_prob: float = 0.3,
                         kinds: tuple[str, ...] = KINDS) -> Path:
    """Write ``num`` PNGs and ``metadata.jsonl`` (``file_name``, ``text`` + structured labels)."""
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels (got {size}); shapes smaller than that are unreadable")
    if num < 1:
        raise ValueError(f"num must be >= 1 (got {num})")
    unknown = [c for c in colours if c not in COLOURS and c not in EXTRA_COLOURS]
    if unknown:
        raise ValueError(f"unknown colours {unknown}; choose from {sorted({**COLOURS, **EXTRA_COLOURS})}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(num - 1)))
    with open(out / "metadata.jsonl", "w") as meta:
        for i in tqdm(range(num), desc="shapes", leave=False):
            scene = make_scene(i, seed, size, colours=colours, two_shape_prob=two_shape_prob, kinds=kinds)
            name = f"{i:0{width}d}.png"
            render(scene, size).save(out / name)
            row = {"file_name": name, "text": scene.caption, "background": scene.background,
                   "shapes": [{k: v for k, v in asdict(s).items() if k in ("kind", "colour", "size")}
                              | {"position": s.position} for s in scene.shapes]}
            meta.write(json.dumps(row) + "\n")
    return out


def _sample_shape(rng: random.Random, size: int, cell: tuple[int, int], colour: str, kind: str) -> Shape:
    label = rng.choice(tuple(SIZES))
    lo, hi = SIZES[label]
    side = rng.uniform(lo, hi) * size
    half, jitter = side / 2, size / 24
    cx = (cell[1] + 0.5) * size / 3 + rng.uniform(-jitter, jitter)
    cy = (cell[0] + 0.5) * size / 3 + rng.uniform(-jitter, jitter)
    cx, cy = (min(max(v, half + 0.5), size - half - 0.5) for v in (cx, cy))
    return Shape(kind, colour, label, cell, cx, cy, side)


def _overlap(a: Shape, b: Shape, margin: float = 1.0) -> bool:
    return (abs(a.cx - b.cx) < (a.side + b.side) / 2 + margin
            and abs(a.cy - b.cy) < (a.side + b.side) / 2 + margin)


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, side: float, fill) -> None:
    h = side / 2
    if kind == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif kind == "cross":
        t = side / 6  # half the arm thickness: arms are a third of the side
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif kind == "ring":  # a hollow circle: the outline a fifth of the side thick, the hole 3/5 of the side
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], outline=fill, width=max(1, round(side / 5)))
    else:
        raise ValueError(f"unknown shape kind {kind!r}; choose from {KINDS + EXTRA_KINDS}")

