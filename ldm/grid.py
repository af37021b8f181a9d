"""Image grids: a batch of images in [-1, 1] as one PIL image, for sample grids and previews.

Used by sampling (``ldm sample``, validation grids, the demo's and the recipe's ``samples.png``) and by the
stages' previews (``train/vae.py``); one home, so every grid is laid out and quantised the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def to_pil_grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, 3, H, W) in [-1, 1] -> one PIL image with ``nrow`` images per row."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(3, rows * h, nrow * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """``to_pil_grid`` written to ``path`` (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil_grid(images, nrow).save(path)
    return path
