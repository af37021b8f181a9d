"""``ldm eval pipeline``: the shapes judge's accuracy on held-out prompts, and the U-Net's bits/dim.

Prompts are single-shape captions drawn from the shapes generator with a seed the training data
never uses; every image has its own seeded generator, so the numbers are reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from diffusers import DDPMScheduler

from ldm.config import DataConfig
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.shapes import COLOURS, KINDS, single_shape_scenes
from ldm.evaluation.judge import judge, summarise
from ldm.losses.diffusion import variational_bound_bpd
from ldm.models.text import encode_prompts
from ldm.models.unet import vae_scale_factor
from ldm.models.vae import normalize_latents

HELD_OUT_SEED = 10_000  # shapes seeds at or above this are never used for training data


def judge_pipeline(pipe, num: int = 100, seed: int = 0, steps: int = 20, guidance: float = 5.0,
                   colours: tuple[str, ...] = tuple(COLOURS), kinds: tuple[str, ...] = KINDS,
                   batch_size: int = 25) -> dict:
    """Generate one image per held-out single-shape prompt and judge colour and kind."""
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
    scenes = single_shape_scenes(num, HELD_OUT_SEED + seed, size, colours=colours, kinds=kinds)
    readable = tuple(dict.fromkeys(KINDS + tuple(kinds)))  # the judge also reads any requested extra kind
    verdicts = []
    for start in range(0, num, batch_size):
        chunk = scenes[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        images = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="np").images
        for scene, image in zip(chunk, images):
            shape = scene.shapes[0]
            verdicts.append(judge((image * 255).round().astype(np.uint8), shape.colour, shape.kind, kinds=readable))
    metrics = summarise(verdicts, [s.shapes[0].kind for s in scenes])
    return metrics | {"steps": steps, "guidance_scale": guidance, "sampler": type(pipe.scheduler).__name__}


@torch.no_grad()
def latent_bits_per_dim(pipe, data: DataConfig, num: int = 16, seed: int = 0) -> float:
    """Mean −ELBO in bits/dim of the U-Net on scaled posterior-mean latents of ``num`` held-out images."""
    dataset = ImageCaptionDataset(data)
    batch = collate([dataset[(i, 0)] for i in range(min(num, len(dataset)))])
    device = pipe.unet.device
    x0 = normalize_latents(pipe.vae.encode(batch["pixel_values"].to(device)).latent_dist.mean, pipe.vae.config)
    text = encode_prompts(pipe.text_encoder, pipe.tokenizer, batch["caption"], warn=False)
    schedule = pipe.scheduler.config
    alphas_cumprod = DDPMScheduler.from_config(schedule).alphas_cumprod.to(device)
    variance_type = "learned_range" if pipe.unet.config.out_channels == 2 * x0.shape[1] else "fixed_small"

    def model_fn(x_t, t):
        return pipe.unet(x_t, t, encoder_hidden_states=text.repeat(x_t.shape[0] // text.shape[0], 1, 1)).sample

    bound = variational_bound_bpd(model_fn, x0, alphas_cumprod, schedule.prediction_type, variance_type,
                                  generator=torch.Generator(device).manual_seed(seed), progress=False)
    return float(bound.total.mean())


def evaluate_pipeline(model: str, data: DataConfig, num: int | None = None, seed: int = 0, steps: int = 20,
                      guidance: float = 5.0, scheduler: str | None = "dpm++") -> dict:
    """``ldm eval pipeline``: judge accuracy on ``num`` (default 100) prompts + bits/dim on ``data``."""
    from ldm.sampling import load_pipeline

    pipe = load_pipeline(model, scheduler=scheduler)
    metrics = judge_pipeline(pipe, num=num or 100, seed=seed, steps=steps, guidance=guidance)
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
    metrics["bits_per_dim"] = latent_bits_per_dim(pipe, dataclasses.replace(data, resolution=size), seed=seed)
    return metrics
