"""The stage-2 objective as pure functions: from (z, c, t, ε) to per-example losses, and their weighting.

    x_t = √ā_t·z + √(1−ā_t)·ε                                   (Ho et al. 2020, eq. 4)
    ℓ_i = w(SNR_t)·mean‖f_θ(x_t, t, c) − target(z, ε, t)‖²     (eq. 14; target ε | v | z)
          + λ·T·L_t                                            (learned variance only: IDDPM eq. 16)
    w   = min-SNR-γ (Hang et al. 2023) | 1/√SNR (Yu et al. 2024) | 1

Training (``ldm.diffusion_batch.training_loss``), the held-out validation loss
(``ldm.evaluation.heldout``) and the benchmarks call these same functions; only what they pass for the
weighting differs, and ``describe_weighting`` says which one a number was computed with.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ldm.losses import diffusion as D


class Weighting(NamedTuple):
    """The two keys ``loss_weight`` reads, named as in ``diffusion.*`` (``DiffusionConfig`` has both)."""

    loss_weighting: str = "min_snr"  # min_snr | debiased
    min_snr_gamma: float | None = None  # γ of min_snr; None: w = 1


def loss_weight(snr_t: torch.Tensor, weighting, prediction_type: str) -> torch.Tensor | None:
    """w(t) = min-SNR-γ (``D.min_snr_weight``) | 1/√SNR (``D.debiased_weight``) | None (w = 1, γ null).

    ``weighting``: the diffusion section (or a ``Weighting``): its ``loss_weighting`` and ``min_snr_gamma``.
    snr_t: (B,) -> (B,) or None.
    """
    if weighting.loss_weighting == "debiased":
        return D.debiased_weight(snr_t, prediction_type)
    return D.min_snr_weight(snr_t, weighting.min_snr_gamma, prediction_type) if weighting.min_snr_gamma else None


def describe_weighting(weighting, prediction_type: str) -> str:
    """The weighting ``loss_weight`` applies, in words, e.g. ``min-SNR-γ (γ = 5, epsilon target)``."""
    if weighting.loss_weighting == "debiased":
        return f"debiased 1/√SNR ({prediction_type} target)"
    if weighting.min_snr_gamma:
        return f"min-SNR-γ (γ = {weighting.min_snr_gamma:g}, {prediction_type} target)"
    return "uniform (w = 1)"


def denoising_losses(predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                     c: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                     prediction_type: str, weighting, vlb_weight: float | None = None) -> torch.Tensor:
    """ℓ_i = w(SNR_t)·mean‖f_θ(x_t, t, c) − target‖² (+ λ·T·L_t), x_t = √ā_t·z + √(1−ā_t)·ε (module docstring).

    predict(x_t, t, c) is f_θ: (B, C, h, w), or (B, 2C, h, w) for a learned-variance U-Net, which needs
    ``vlb_weight`` (λ of L_hybrid, ``D.hybrid_loss``). z, noise: (B, C, h, w); c: (B, L, D); t: (B,) long;
    alphas_cumprod: (T,) on z's device. ``weighting``: see ``loss_weight``. Returns (B,).
    """
    a_t = alphas_cumprod[t]  # (B,)
    x_t = D.add_noise(z, noise, a_t)  # (B, C, h, w)
    output = predict(x_t, t, c)
    weight = loss_weight(D.snr(a_t), weighting, prediction_type)  # (B,) or None
    if vlb_weight is not None:
        return D.hybrid_loss(output, z, noise, t, alphas_cumprod, prediction_type, vlb_weight, weight)  # (B,)
    return D.simple_loss(output, D.diffusion_target(z, noise, a_t, prediction_type), weight)  # (B,)
