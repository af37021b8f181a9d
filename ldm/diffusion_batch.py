"""Stage 2's loss of one micro-batch: the per-example draws, the encoding, then ``ldm.losses.denoising``.

Every random draw is made per example (``ExampleRNG``), in this order:
  0. z  = (μ + σ·ε_z − shift) · s  latent from the VAE posterior moments (cached or fresh), s = scaling_factor
  1. t  ~ U{0, …, T−1}, or by diffusion.timestep_sampling (logit-normal, Laplace on log SNR)
  2. ε  ~ N(0, I)                   (+ offset noise: a per-channel δ ~ N(0, I), draw 3; with
                                    diffusion.immiscible_noise the batch's ε are then matched to the z)
  4. u  ~ U[0, 1); c = c_∅ if u < p  caption dropout: the empty prompt's embedding, for CFG
then ℓ_i = ``denoising_losses`` (weighted by diffusion.loss_weighting / min_snr_gamma), reduced to the batch
mean (or DreamBooth's instance + λ·class mean). Because the cache stores exactly the moments a fresh encode
computes, and the draws do not depend on where the latents came from, cached and uncached batches give the
same losses (exactly with cache.dtype float32).
"""

from __future__ import annotations

import torch

from ldm.config import DiffusionConfig
from ldm.dreambooth import dreambooth_loss
from ldm.losses import diffusion as D
from ldm.losses.denoising import denoising_losses
from ldm.models.text import encode_prompts
from ldm.models.unet import vae_scale_factor
from ldm.models.vae import normalize_latents, posterior_moments
from ldm.training import ExampleRNG


def training_loss(unet, batch: dict, vae, text_encoder, tokenizer, empty_text: torch.Tensor,
                  alphas_cumprod: torch.Tensor, d: DiffusionConfig, schedule,
                  prior_loss_weight: float = 1.0) -> torch.Tensor:
    """The diffusion loss of one micro-batch, from cached moments or from pixels (same draws either way):
    the mean over its examples, or for a DreamBooth batch (``prior`` marks its class examples) the instance
    mean + prior_loss_weight x the class mean (``ldm.dreambooth.dreambooth_loss``).

    ``schedule`` is the noise scheduler's config: its prediction_type and variance_type define the task.
    A text encoder with trainable weights encodes the captions with gradients ("" where dropped).
    """
    device = alphas_cumprod.device
    cached = "mean" in batch
    f = vae_scale_factor(vae)
    shape = batch["mean"].shape[1:] if cached else (vae.config.latent_channels,
                                                    *(s // f for s in batch["pixel_values"].shape[2:]))
    rng = ExampleRNG(batch["seed"])
    eps_z = rng.randn(shape, device)  # 0.
    t = (rng.randint(len(alphas_cumprod), device) if d.timestep_sampling == "uniform" else  # 1.
         D.sample_timesteps(rng.rand(device), alphas_cumprod, d.timestep_sampling, d.timestep_loc, d.timestep_scale))
    noise = rng.randn(shape, device)  # 2.
    if d.offset_noise:
        noise = D.offset_noise(noise, rng.randn((shape[0], 1, 1), device), d.offset_noise)  # 3.
    dropped = rng.rand(device) < d.caption_dropout  # 4.

    if cached:
        mean, logvar, text = (batch[k].to(device, torch.float32) for k in ("mean", "logvar", "text"))  # stored dtype
    else:
        (mean, logvar), text = posterior_moments(vae, batch["pixel_values"]), None
    text = batch_text(batch, text, dropped, text_encoder, tokenizer, empty_text)
    z = normalize_latents(mean + (0.5 * logvar).exp() * eps_z, vae.config)
    if d.immiscible_noise:
        noise = D.immiscible_noise(z, noise)
    vlb_weight = d.vlb_weight if schedule.variance_type == "learned_range" else None
    losses = denoising_losses(lambda x_t, t_, c: unet(x_t, t_, encoder_hidden_states=c).sample, z, text, t, noise,
                              alphas_cumprod, schedule.prediction_type, d, vlb_weight)  # (B,)
    if "prior" in batch:
        return dreambooth_loss(losses, batch["prior"].to(device), prior_loss_weight)
    return losses.mean()


def batch_text(batch: dict, text: torch.Tensor | None, dropped: torch.Tensor, text_encoder, tokenizer,
               empty_text: torch.Tensor) -> torch.Tensor:
    """c (B, L, D): the cached states ``text`` or the captions encoded, c_∅ where ``dropped``. A text encoder
    with trainable weights encodes with gradients, "" for the dropped captions."""
    if any(p.requires_grad for p in text_encoder.parameters()):  # trained: encode "" for dropped captions
        captions = ["" if drop else c for drop, c in zip(dropped.tolist(), batch["caption"])]
        return encode_prompts(text_encoder, tokenizer, captions, warn=False, grad=True)
    if text is None:
        text = encode_prompts(text_encoder, tokenizer, batch["caption"], warn=False)
    return torch.where(dropped[:, None, None], empty_text.to(text.dtype), text)
