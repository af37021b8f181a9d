"""Evaluate a saved VAE on held-out images: PSNR, SSIM, negative ELBO per dimension, latent spread.

    ldm eval vae --model OUT/final --data H        (prints and writes JSON)

- PSNR and SSIM compare x with the reconstruction from the posterior *mode*, D(μ): the
  deterministic reconstruction a pipeline produces from an encoded image; on [0, 1] images.
- The negative ELBO uses one posterior *sample* z = μ + σ·ε per image (an unbiased estimate of
  E_q[−log p(x|z)]) with the learned variance from ``training_logvar.json``, plus the KL, both per
  pixel dimension (3·H·W), in nats, for data scaled to [-1, 1].
- ``latent_std`` is the standard deviation of scaled posterior samples, (z − shift) · scaling_factor: what
  the stage-2 U-Net sees (≈ 1 when the scaling factor was calibrated on similar data).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ldm.arguments import ArgumentValueError
from ldm.config import DataConfig
from ldm.data.images import ImageCaptionDataset, collate
from ldm.losses.vae import gaussian_kl, normalized_nll
from ldm.models.vae import downsampling_factor, load_training_logvar, normalize_latents

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Image metrics (images in [0, 1], (B, C, H, W))
# --------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR = 10 log10(R² / MSE) per image, in dB; (B,)."""
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian w(i, j) ∝ exp(−(i² + j²) / 2σ²), (size, size)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM = mean over windows of (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))
    (Wang et al. 2004, eq. 13), Gaussian window (σ = 1.5), C_i = (K_i R)², per channel, 'valid'
    windows only, averaged over channels; (B,). The window shrinks to the image for tiny images."""
    size = min(size, x.shape[-1], x.shape[-2])
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    channels = x.shape[1]
    window = gaussian_window(size, sigma).to(x.device).expand(channels, 1, size, size)
    x, y = x.double(), y.double()

    def blur(t):  # local weighted mean per channel, (B, C, H - size + 1, W - size + 1)
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------
def load_vae(model_dir: str) -> tuple[AutoencoderKL, str | Path]:
    """A VAE folder, a pipeline folder with a vae/ subfolder, or a Hub id."""
    path = Path(model_dir)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    source = path if path.exists() else model_dir
    return AutoencoderKL.from_pretrained(source).eval(), source


@torch.no_grad()
def evaluate_vae(model_dir: str, data: DataConfig, num: int | None = None, batch_size: int = 64, seed: int = 0,
                 resolution: int | None = None) -> dict:
    """Metrics of the VAE in ``model_dir`` on the first ``num`` (default 500) images of ``data``."""
    vae, source = load_vae(model_dir)
    resolution = resolution or vae.config.sample_size
    if resolution % downsampling_factor(vae):
        raise ArgumentValueError(f"--resolution {resolution}: must be a multiple of the VAE's downsampling factor "
                                 f"{downsampling_factor(vae)} (it was trained at {vae.config.sample_size})")
    data = dataclasses.replace(data, resolution=resolution)
    dataset = ImageCaptionDataset(data, need_captions=False)
    num = min(num or 500, len(dataset))
    record = load_training_logvar(source) if isinstance(source, Path) else None
    logvar = record["logvar"] if record else 0.0
    kind = record["reconstruction"] if record else "l1"
    if record is None:
        logger.warning("%s has no training_logvar.json: the NLL uses logvar 0 and an L1 (Laplace) likelihood", source)
    loader = DataLoader(Subset(dataset, [(i, 0) for i in range(num)]), batch_size=batch_size, collate_fn=collate)
    gen = torch.Generator().manual_seed(seed)
    scale = vae.config.scaling_factor
    sums = {"psnr": 0.0, "ssim": 0.0, "nll": 0.0, "kl": 0.0, "z": 0.0, "z2": 0.0}
    count, latents = 0, 0
    for batch in tqdm(loader, desc="eval vae", leave=False):
        x = batch["pixel_values"]  # (B, 3, H, W) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        x_mode = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        x_sample = vae.decode(z).sample
        sums["psnr"] += float(psnr((x + 1) / 2, (x_mode + 1) / 2).sum())
        sums["ssim"] += float(ssim((x + 1) / 2, (x_mode + 1) / 2).sum())
        sums["nll"] += float(normalized_nll(x, x_sample, logvar, kind).flatten(1).mean(1).sum())
        sums["kl"] += float((gaussian_kl(posterior.mean, posterior.logvar) / x[0].numel()).sum())
        z_unit = normalize_latents(z, vae.config).double()
        sums["z"] += float(z_unit.sum())
        sums["z2"] += float(z_unit.square().sum())
        count, latents = count + len(x), latents + z.numel()
    z_mean = sums["z"] / latents
    metrics = {
        "psnr": sums["psnr"] / count,
        "ssim": sums["ssim"] / count,
        "nelbo_per_dim": (sums["nll"] + sums["kl"]) / count,
        "nll_per_dim": sums["nll"] / count,
        "kl_per_dim": sums["kl"] / count,
        "latent_std": math.sqrt(max(sums["z2"] / latents - z_mean**2, 0.0)),
        "latent_mean": z_mean,
        "scaling_factor": scale,
        "logvar": logvar,
        "reconstruction": kind,
        "num_images": count,
        "resolution": resolution,
        "latent_shape": list(z.shape[1:]),
    }
    logger.info("VAE %s on %d images: PSNR %.2f dB, SSIM %.4f, -ELBO %.4f nats/dim, latent std %.3f",
                source, count, metrics["psnr"], metrics["ssim"], metrics["nelbo_per_dim"], metrics["latent_std"])
    return metrics
