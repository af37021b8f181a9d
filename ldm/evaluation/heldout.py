"""Held-out validation loss: the diffusion loss on fixed held-out latents, timesteps and noise.

    L_val = 1/(N·K) Σ_i Σ_k mean‖f_θ(x_ik, t_k, c_i) − target(z_i, ε_ik, t_k)‖²
    x_ik  = √ā_{t_k}·z_i + √(1 − ā_{t_k})·ε_ik

    z_i    = (μ_i − shift)·s: the VAE posterior mean of held-out image i, normalised as in training (N images)
    c_i    = the text encoder's states of its full caption (no caption dropout)
    t_k    = ⌊(k + ½)·T / K⌋, k = 0..K−1: K timesteps evenly spread over [0, T)
    ε_ik   ~ N(0, I) from a generator seeded with ``seed``: the same draws at every evaluation

Everything is fixed, so two evaluations of the same weights give the same number, and a change of the
number is a change of the weights: pick checkpoints by it. The target (ε, v or x0) is the training one
(``ldm.losses.diffusion.diffusion_target``); the loss is the plain MSE of that target, averaged uniformly
over the K timesteps, unless ``min_snr_gamma`` asks for the training's Min-SNR weighting.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ldm.config import DataConfig
from ldm.data.images import DataError, ImageCaptionDataset, collate
from ldm.losses.denoising import Weighting, denoising_losses
from ldm.models.text import encode_prompts
from ldm.models.vae import normalize_latents


def fixed_timesteps(num_train_timesteps: int, k: int) -> torch.Tensor:
    """t_k = ⌊(k + ½)·T / K⌋ for k = 0..K−1: K timesteps evenly spread over [0, T) (midpoints); (K,) long."""
    if not 1 <= k <= num_train_timesteps:
        raise ValueError(f"the number of validation timesteps must be in [1, {num_train_timesteps}]; got {k}")
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).floor().long()


@torch.no_grad()
def heldout_loss(unet, latents: torch.Tensor, text: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction_type: str, num_timesteps: int = 8, seed: int = 0, min_snr_gamma: float | None = None,
                 batch_size: int = 64) -> float:
    """L_val = mean_{i,k} w·‖f_θ(x_ik, t_k, c_i) − target_ik‖² on fixed t_k and ε_ik (see the module docstring).

    latents: (N, C, h, w) normalised posterior means; text: (N, L, D); alphas_cumprod: (T,) ā of the training
    schedule. w = 1, or Min-SNR(γ) as in training when ``min_snr_gamma`` is set (``heldout_weighting``); each
    term is ``ldm.losses.denoising.denoising_losses``, the training loss's. A learned-variance U-Net's
    prediction is its first C output channels. The model's train/eval mode is restored afterwards; the global
    RNGs are not touched.
    """
    n, channels = latents.shape[:2]
    device = next(unet.parameters()).device
    weighting = heldout_weighting(min_snr_gamma)
    alphas = alphas_cumprod.to(device, torch.float32)  # (T,)
    t_all = fixed_timesteps(len(alphas_cumprod), num_timesteps)  # (K,)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_timesteps, *latents.shape), generator=generator)  # (K, N, C, h, w), drawn on the CPU

    def predict(x_t, t, c):
        return unet(x_t, t, encoder_hidden_states=c).sample[:, :channels]

    was_training, total = unet.training, torch.zeros((), dtype=torch.float64)
    unet.eval()
    try:
        for k, t in enumerate(t_all.tolist()):
            for start in range(0, n, batch_size):
                z = latents[start:start + batch_size].to(device, torch.float32)  # (B, C, h, w)
                eps = noise[k, start:start + batch_size].to(device)
                steps = torch.full((z.shape[0],), t, device=device, dtype=torch.long)
                c = text[start:start + batch_size].to(device)
                loss = denoising_losses(predict, z, c, steps, eps, alphas, prediction_type, weighting)  # (B,)
                total += loss.double().sum().cpu()  # (B,) -> ()
    finally:
        unet.train(was_training)
    return float(total / (n * num_timesteps))


def heldout_weighting(min_snr_gamma: float | None = None) -> Weighting:
    """The held-out loss's w: uniform unless ``min_snr_gamma`` asks for min-SNR-γ (``describe_weighting``)."""
    return Weighting("min_snr", min_snr_gamma)


@torch.no_grad()
def encode_heldout(data: DataConfig, vae, text_encoder, tokenizer, batch_size: int = 32
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, C, h, w), c (N, L, D)) on the CPU: normalised posterior means and full-caption text states, once."""
    dataset = ImageCaptionDataset(data)
    if len(dataset) == 0:
        raise DataError(f"validation.data {data.path} has no usable examples")
    latents, texts = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="held-out latents", leave=False):
        batch = collate([dataset[(i, 0)] for i in range(start, min(start + batch_size, len(dataset)))])
        with torch.autocast(vae.device.type, enabled=False):  # the VAE encodes in fp32, as for training
            mean = vae.encode(batch["pixel_values"].to(vae.device, torch.float32)).latent_dist.mean
        latents.append(normalize_latents(mean, vae.config).float().cpu())
        texts.append(encode_prompts(text_encoder, tokenizer, batch["caption"], warn=False).float().cpu())
    return torch.cat(latents), torch.cat(texts)
