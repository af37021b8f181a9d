"""The stage-1 autoencoder: diffusers' ``AutoencoderKL`` built from config, the learned output
variance that the training objective carries beside it, and the scaling-factor calibration.

The saved folder is a plain ``AutoencoderKL.save_pretrained`` folder (safetensors) whose config holds
the calibrated ``scaling_factor``; ``AutoencoderKL.from_pretrained(folder)`` needs nothing else. One
extra file, ``training_logvar.json``, records the learned log-variance of p(x|z) and the
reconstruction kind, so that ``ldm eval vae`` can report the negative ELBO; loaders ignore it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL
from torch import nn

from ldm.config import VAEModelConfig

logger = logging.getLogger(__name__)
LOGVAR_FILE = "training_logvar.json"


def build_vae(model: VAEModelConfig, sample_size: int) -> AutoencoderKL:
    """An untrained AutoencoderKL with f = 2 ** (levels - 1) and ``model.latent_channels`` channels."""
    levels = len(model.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(model.block_out_channels),
        layers_per_block=model.layers_per_block,
        latent_channels=model.latent_channels,
        norm_num_groups=model.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=1.0,  # replaced by calibrate_scaling_factor after training
        mid_block_add_attention=model.mid_block_attention,
    )


def downsampling_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def normalize_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """ẑ = (z − shift) · s   (scale: Rombach et al. 2022, §4.3.2; shift: Esser et al. 2024, as in diffusers).

    z (B, C, h, w) from q(z|x) → the unit-scale latent the diffusion model sees; s = ``scaling_factor``,
    shift = ``shift_factor`` (absent or None → 0). The one encode-side formula for training, caches and
    evaluation; the pipeline's ``decode_latents`` inverts it, z = ẑ / s + shift.
    """
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (z - shift) * vae_config.scaling_factor


class AutoencoderWithLogvar(nn.Module):
    """AutoencoderKL plus the learned scalar log-variance s of p(x|z) (Rombach et al. 2022, App. G).

    One module so that data parallelism wraps and all-reduces both: a bare ``nn.Parameter`` kept
    beside a DDP-wrapped VAE would never have its gradient averaged across processes.
    """

    def __init__(self, vae: AutoencoderKL, logvar_init: float = 0.0):
        super().__init__()
        self.vae = vae
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def forward(self, x: torch.Tensor, noise: torch.Tensor):
        """x (B, 3, H, W), noise ε (B, C, H/f, W/f) -> x̂ = D(μ + σ·ε), and the posterior (μ, log σ²)."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # reparameterisation
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


@torch.no_grad()
def posterior_moments(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) of q(z|x) for images (B, 3, H, W), encoded in fp32 (the VAE is never autocast)."""
    with torch.autocast(pixels.device.type, enabled=False):
        dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
    return dist.mean, dist.logvar


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, batches: Iterable[torch.Tensor]) -> tuple[float, float, int]:
    """Over all latent elements: (E[μ], E[μ² + σ²], count) of q(z|x), accumulated in float64."""
    total_mean, total_sq, count = 0.0, 0.0, 0
    device = next(vae.parameters()).device
    for x in batches:
        posterior = vae.encode(x.to(device, torch.float32)).latent_dist
        mean, var = posterior.mean.double(), posterior.var.double()
        total_mean += float(mean.sum())
        total_sq += float((mean.square() + var).sum())
        count += mean.numel()
    if count == 0:
        raise ValueError("no data to calibrate the scaling factor on")
    return total_mean / count, total_sq / count, count


def calibrate_scaling_factor(vae: AutoencoderKL, batches: Iterable[torch.Tensor]) -> float:
    """scaling_factor = 1 / std(z), z ~ q(z|x) over the data, with Var[z] = E[μ² + σ²] − E[μ]² (exact).

    Stage 2 trains on posterior *samples* z = μ + σ·ε, so their spread, not the modes', is what
    must be unit: the moments give it in closed form, free of sampling noise. No shift is used
    (a stock StableDiffusionPipeline ignores ``shift_factor``), so scaled latents have unit
    standard deviation about their mean. ``batches`` yields (B, 3, H, W) images in [-1, 1].
    """
    was_training = vae.training
    vae.eval()
    mean, second, count = latent_statistics(vae, batches)
    vae.train(was_training)
    std = max(second - mean * mean, 0.0) ** 0.5
    if not std > 0:
        raise ValueError("the posterior has zero spread on the calibration data; cannot calibrate")
    logger.info("calibrated on %d latent values: mean %.4f, std %.4f -> scaling_factor %.5f",
                count, mean, std, 1.0 / std)
    return 1.0 / std


def save_vae(vae: AutoencoderKL, folder: str | Path, logvar: float, reconstruction: str) -> Path:
    """``save_pretrained`` (safetensors) plus ``training_logvar.json`` for the ELBO in evaluation."""
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    (folder / LOGVAR_FILE).write_text(json.dumps({"logvar": float(logvar), "reconstruction": reconstruction},
                                                 indent=1))
    return folder


def load_training_logvar(folder: str | Path) -> dict | None:
    """The record written by ``save_vae``, or None for a VAE trained elsewhere."""
    path = Path(folder) / LOGVAR_FILE
    return json.loads(path.read_text()) if path.is_file() else None
