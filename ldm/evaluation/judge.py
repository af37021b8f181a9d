"""The shapes judge: is the prompted colour there, is the shape of that colour the prompted kind, and
does it sit in the prompted cell of the 3x3 grid?

No learned weights: pixels are labelled with the nearest palette colour (or the background,
estimated from the image border), the largest connected region of the prompted colour is
taken, and every shape kind is rendered with ``ldm.data.shapes.shape_mask`` into that region's
bounding box; the kind with the highest IoU is the judge's reading, and the 3x3 grid cell holding
the centre of that box is its position (the data put a shape's centre in its cell). Generator and judge share
one definition of each shape, and the judge can be checked on real data (it should be ~100%).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm.data.shapes import COLOURS, EXTRA_COLOURS, KINDS, shape_mask

PALETTE = {**COLOURS, **EXTRA_COLOURS}


@dataclass(frozen=True)
class Verdict:
    colour_found: bool
    kind_found: str | None  # the judge's reading of the prompted colour's shape
    kind_ok: bool
    position_ok: bool | None = None  # None: no position was asked for

    @property
    def correct(self) -> bool:
        return self.colour_found and self.kind_ok


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel frame of an (H, W, 3) image."""
    frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(frame, axis=0)


def label_pixels(image: np.ndarray, palette: dict[str, tuple[int, int, int]],
                 max_distance: float = 90.0) -> tuple[np.ndarray, list[str]]:
    """Label map (H, W): index into ``names`` of the nearest colour, -1 for background/unclear.

    A pixel takes the nearest of the palette colours and the background colour (Euclidean RGB
    distance); it is unlabelled when the background is nearest or no colour is within
    ``max_distance``.
    """
    names = list(palette)
    refs = np.array([palette[n] for n in names] + [background_colour(image)], dtype=np.float32)  # (K+1, 3)
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - refs[None, None], axis=-1)  # (H, W, K+1)
    nearest = dist.argmin(-1)
    labels = np.where((nearest < len(names)) & (dist.min(-1) <= max_distance), nearest, -1)
    return labels, names


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (iterative flood fill)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, region = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def grid_cell(region: np.ndarray) -> tuple[int, int]:
    """(row, col) of the 3x3 grid cell holding the centre of ``region``'s bounding box."""
    ys, xs = np.nonzero(region)
    height, width = region.shape
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    return min(int(3 * cy / height), 2), min(int(3 * cx / width), 2)


def fit_kind(region: np.ndarray, kinds: tuple[str, ...] = KINDS) -> tuple[str, float]:
    """The kind whose rendered template best matches ``region`` (IoU), searched over small shifts."""
    ys, xs = np.nonzero(region)
    height, width = region.shape
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    best_kind, best_iou = kinds[0], -1.0
    for kind in kinds:
        for ds in (-1.0, 0.0, 1.0):
            for dx, dy in ((0, 0), (0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)):
                template = shape_mask(kind, cx + dx, cy + dy, side + ds, height, width) > 0.5
                iou = (template & region).sum() / max((template | region).sum(), 1)
                if iou > best_iou:
                    best_kind, best_iou = kind, float(iou)
    return best_kind, best_iou


def judge(image: np.ndarray, colour: str, kind: str, palette: dict | None = None,
          min_fraction: float = 0.01, kinds: tuple[str, ...] = KINDS,
          cell: tuple[int, int] | None = None) -> Verdict:
    """Judge one (H, W, 3) uint8 image against a single-shape prompt's colour, kind and (row, col) cell."""
    palette = palette or PALETTE
    if colour not in palette:
        raise ValueError(f"unknown colour {colour!r}; the judge knows {sorted(palette)}")
    labels, names = label_pixels(np.asarray(image), palette)
    mask = labels == names.index(colour)
    if mask.sum() < min_fraction * mask.size:
        return Verdict(False, None, False, None if cell is None else False)
    region = largest_component(mask)
    found, _ = fit_kind(region, kinds)
    return Verdict(True, found, found == kind, None if cell is None else grid_cell(region) == tuple(cell))


def summarise(verdicts: list[Verdict], kinds: list[str]) -> dict:
    """Accuracy (colour and kind both right), colour, kind, per-kind and position accuracy.

    Position accuracy is over the verdicts that were asked for a position (None when none were).
    """
    n = max(len(verdicts), 1)
    placed = [v.position_ok for v in verdicts if v.position_ok is not None]
    per_kind = {k: float(np.mean([v.correct for v, kk in zip(verdicts, kinds) if kk == k]))
                for k in sorted(set(kinds))}
    return {"accuracy": sum(v.correct for v in verdicts) / n,
            "colour_accuracy": sum(v.colour_found for v in verdicts) / n,
            "kind_accuracy": sum(v.kind_ok for v in verdicts) / n,
            "per_kind_accuracy": per_kind, "num_images": len(verdicts),
            "position_accuracy": float(np.mean(placed)) if placed else None}
