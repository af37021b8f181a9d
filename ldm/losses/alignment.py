"""Representation alignment (REPA, Yu et al. 2024, "Representation Alignment for Generation", eq. 8).

A small projection h_φ of the denoiser's hidden state at a middle layer is pulled towards a frozen image
encoder's patch features y* of the *clean* image, patch by patch:

    L_REPA = −E[ (1/N) Σ_n sim(y*_n, h_φ(f_θ(x_t))_n) ],   sim = cosine similarity,

added to the diffusion loss as L = L_diffusion + λ L_REPA. Pure functions on tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−(1/N) Σ_n cos(h_n, y*_n) per example: projected [B, N, D], targets [B, N, D] -> [B]."""
    if projected.shape != targets.shape:
        raise ValueError(f"alignment: projected features {tuple(projected.shape)} and encoder targets "
                         f"{tuple(targets.shape)} differ in shape")
    return -F.cosine_similarity(projected, targets.to(projected.dtype), dim=-1).mean(dim=1)


def common_grid(features: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int]:
    """The coarser of the U-Net's feature grid (h, w) and the encoder's patch grid, side by side."""
    return min(features.shape[-2], grid[0]), min(features.shape[-1], grid[1])


def to_patch_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Feature maps [B, C, h, w] -> tokens [B, N = gh·gw, C] on ``grid`` (gh ≤ h, gw ≤ w): the mean over each
    cell's area (adaptive average pooling; exact when the sides divide), a reshape when the grids agree."""
    if tuple(features.shape[-2:]) != tuple(grid):
        features = F.adaptive_avg_pool2d(features, grid)
    return features.flatten(2).transpose(1, 2)


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """Patch tokens [B, gh·gw, D] on ``grid`` -> [B, N, D] on the coarser grid ``to`` (area means)."""
    if tuple(grid) == tuple(to):
        return tokens
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
    return to_patch_grid(maps, to)
