"""Precompute stage 2's latent + text-embedding cache, split across every process that is launched.

    ldm cache build --config configs/unet/shapes.yaml --set cache.dir=/shared/cache ...      (one process)
    torchrun --nproc_per_node 8 -m train.cache --config F --set cache.dir=/shared/cache     (eight)
    accelerate launch -m train.cache --config F --set cache.dir=/shared/cache                (any launcher)

The config is the stage-2 config that will train from the cache: the same VAE, text encoder, data and
``cache.*`` keys give the same fingerprint, so ``ldm train unet`` (on this machine or any other that
sees ``cache.dir``) finds the cache current and starts training at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ldm.config import UNetStageConfig
from ldm.data.cache import latent_cache
from ldm.data.cached import read_manifest
from ldm.data.images import ImageCaptionDataset
from ldm.entry import stage_entry
from ldm.errors import UserError
from ldm.models.unet import Components, load_frozen_encoders, vae_scale_factor
from ldm.training import setup_logging

logger = logging.getLogger("train.cache")

def main(cfg: UNetStageConfig) -> Path:
    """Build (or find current) the cache of ``cfg`` with every launched process; return its folder."""
    if not cfg.cache.enabled or cfg.lora.train_text_encoder:
        raise UserError("this config trains without the latent cache (cache.enabled=false or "
                        "lora.train_text_encoder=true): there is nothing to precompute")
    if cfg.data.streaming:
        raise UserError("data.streaming=true encodes every step and cannot be cached; set data.streaming=false")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes == 1:
        raise RuntimeError(f"launched as {world} processes but accelerate initialised a single one; on CPU set "
                           f"ACCELERATE_USE_CPU=1 (torchrun) so the processes share the work")
    setup_logging(state)
    vae, text_encoder, tokenizer = load_frozen_encoders(cfg)  # no U-Net: the cache does not need one
    f = vae_scale_factor(vae)
    bad = [b for b in cfg.data.buckets if b[0] % f or b[1] % f]
    if bad:
        raise UserError(f"data.buckets {bad}: sides must be multiples of the VAE's downsampling factor {f}")
    dataset = ImageCaptionDataset(cfg.data, check=False)  # checked by the build, split; not at all if current
    parts = Components(vae.to(state.device), text_encoder.to(state.device), tokenizer, None, None)
    folder = latent_cache(state, cfg.cache, cfg.output_dir, dataset, parts)
    if state.is_main_process:
        manifest = read_manifest(folder)
        size = sum(r["bytes"] for r in manifest["shards"])
        logger.info("latent cache %s: %d examples in %d shards, %.1f MB (%s)", folder, manifest["examples"],
                    len(manifest["shards"]), size / 1e6, manifest["dtype"])
    return folder

if __name__ == "__main__":
    stage_entry("unet", main)
