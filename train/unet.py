"""Stage 2: train the text-conditioned latent U-Net (Rombach et al. 2022, §3.3) with classifier-free guidance.

    ldm train unet --config configs/unet/shapes.yaml --set vae=OUT/vae/final --set text_encoder=OUT/te/final
    accelerate launch -m train.unet --config configs/unet/shapes.yaml ...

One optimizer step; every random draw is made per example (``ExampleRNG``), in this order:
  0. z  = (μ + σ·ε_z − shift) · s  latent from the VAE posterior moments (cached or fresh), s = scaling_factor
  1. t  ~ U{0, …, T−1}, or by diffusion.timestep_sampling (logit-normal, Laplace on log SNR)
  2. ε  ~ N(0, I)                   (+ offset noise: a per-channel δ ~ N(0, I), draw 3; with
                                    diffusion.immiscible_noise the batch's ε are then matched to the z)
  4. u  ~ U[0, 1); c = c_∅ if u < p  caption dropout: the empty prompt's embedding, for CFG
  x_t = √ā_t z + √(1−ā_t) ε;  L = w(SNR_t) · ‖f_θ(x_t, t, c) − target‖²   (+ λ L_vlb with learned variance)
Because the cache stores exactly the moments a fresh encode computes, and the draws do not depend
on where the latents came from, cached and uncached runs give the same losses (exactly with
cache.dtype float32; float16/bfloat16 storage moves them by its rounding).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_folder
from ldm import dreambooth
from ldm.config import DiffusionConfig, UNetStageConfig
from ldm.data.cache import STORAGE_DTYPES, build_cache, fingerprint, module_hash
from ldm.data.cached import CachedLatentDataset, collate_cached
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.sampler import ResumableBatchSampler
from ldm.data.streaming import StreamingImageCaptions
from ldm.ema import EMA, SNAPSHOTS, PowerEMA
from ldm.entry import stage_entry
from ldm.evaluation.heldout import encode_heldout, heldout_data_config, heldout_loss
from ldm.losses import diffusion as D
from ldm.models.alignment import attach_targets, build_aligner
from ldm.models.text import encode_prompts
from ldm.models.unet import (load_components, parameter_groups, save_pipeline, trainable_parameters,
                             vae_scale_factor)
from ldm.models.vae import normalize_latents
from ldm.training import (Checkpointer, ExampleRNG, apply_update, gradient_sync,
                          log_batch_geometry, make_accelerator, make_lr_scheduler, new_state, seed_step,
                          write_summary)

logger = logging.getLogger("train.unet")


def main(cfg: UNetStageConfig) -> Path:
    start_time = time.time()
    dreambooth.check_inputs(cfg)  # before any work: a missing instance folder fails here
    accelerator = make_accelerator(cfg.output_dir, cfg.train, cfg)
    log_batch_geometry(accelerator, cfg.train)
    train, device = cfg.train, accelerator.device
    torch.manual_seed(train.seed)  # the same initial U-Net on every process
    parts = load_components(cfg)  # vae, text_encoder, tokenizer (frozen), unet, noise scheduler
    vae, text_encoder, tokenizer = parts.vae.to(device), parts.text_encoder.to(device), parts.tokenizer
    unet, scheduler = parts.unet, parts.scheduler
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    dreambooth.prepare_class_images(cfg, parts, device, accelerator)  # from the base model; main decides
    accelerator.wait_for_everyone()
    params = trainable_parameters(unet, text_encoder, cfg.lora)
    aligner, image_encoder = build_aligner(cfg, unet)  # (None, None) unless align.weight > 0
    if aligner is not None:
        params += list(aligner.projector.parameters())
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    groups = parameter_groups(params, text_encoder, cfg.lora, train.learning_rate)  # + the text encoder's own rate
    optimizer = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  weight_decay=train.weight_decay)
    lr_scheduler = make_lr_scheduler(optimizer, train)
    models = {"unet": unet}
    if cfg.lora.train_text_encoder:
        models["text_encoder"] = text_encoder
    if aligner is not None:
        models["align"] = aligner.projector.to(device)  # trained and checkpointed with the U-Net, never shipped
    prepared = accelerator.prepare(*models.values(), optimizer)
    models, optimizer = dict(zip(models, prepared[:-1])), prepared[-1]
    unet = models["unet"]
    text_encoder = models.get("text_encoder", text_encoder)
    raw_unet = accelerator.unwrap_model(unet)
    ema = EMA(raw_unet, train.ema_decay).to(device) if train.ema_decay else None
    phema = power_ema(cfg, raw_unet, device)  # None unless ema.posthoc_sigma_rels
    state = new_state(accelerator, train)
    emas = {name: e for name, e in (("unet", ema), ("unet-phema", phema)) if e is not None}
    checkpointer = Checkpointer(accelerator, cfg.output_dir, train, models, {"unet": optimizer},
                                {"unet": lr_scheduler}, emas)
    checkpointer.resume(state)
    if phema is not None and accelerator.is_main_process:
        phema.drop_snapshots_after(state.step)
    heldout = heldout_set(cfg, parts, text_encoder) if cfg.validation.data and accelerator.is_main_process else None
    batches, source, dataset = training_batches(accelerator, cfg, state.batches, parts)
    if aligner is not None and aligner.active(state.step):  # a run resumed past align.steps needs no targets
        attach_targets(aligner, image_encoder, dataset, Path(cfg.output_dir), accelerator, device)
    logger.info("U-Net %.2fM parameters, %.2fM trained; data: %s", _millions(raw_unet.parameters()),
                _millions(params), source)
    empty_text = encode_prompts(text_encoder, tokenizer, [""])[0]  # c_∅ (L, D)
    loss_sum, loss_count = torch.zeros((), device=device), 0

    for _ in tqdm(range(state.step, train.max_steps), initial=state.step, total=train.max_steps, desc="unet",
                  disable=not accelerator.is_local_main_process):
        seed_step(train.seed, state.step, accelerator.process_index)
        total = torch.zeros((), device=device)
        for micro in range(train.grad_accum_steps):
            batch = next(batches)
            state.batches += 1
            state.see(batch["seed"])
            with gradient_sync(accelerator, list(models.values()), sync=micro == train.grad_accum_steps - 1):
                with accelerator.autocast(), aligning(aligner, state.step, raw_unet):
                    loss = training_loss(unet, batch, vae, text_encoder, tokenizer, empty_text, alphas_cumprod,
                                         cfg.diffusion, scheduler.config, cfg.dreambooth.prior_loss_weight)
                    if aligner is not None and aligner.active(state.step):
                        loss = loss + aligner.loss(batch, models["align"])  # + λ·L_REPA
                accelerator.backward(loss / train.grad_accum_steps)
            total += loss.detach() / train.grad_accum_steps
        norm = apply_update(accelerator, state, optimizer, lr_scheduler, params, total, train)
        if norm is not None and ema is not None:
            ema.update(raw_unet, state.step)
        if phema is not None:  # every step, skipped ones too (θ unchanged): t counts time as its profile does
            phema.update(raw_unet, state.step + 1)
        state.step += 1
        loss_sum, loss_count = loss_sum + total, loss_count + 1

        if state.step % train.log_every == 0 or state.step == train.max_steps:
            accelerator.log({"loss": float(loss_sum) / loss_count, "lr": lr_scheduler.get_last_lr()[0],
                             "grad_norm": float("nan") if norm is None else float(norm), "skipped_steps": state.skipped,
                             **(aligner.pop_log() if aligner is not None else {})}, step=state.step)
            loss_sum, loss_count = torch.zeros((), device=device), 0
        if accelerator.is_main_process and (state.step % cfg.validation.every == 0 or state.step == train.max_steps):
            validation_grid(cfg, parts, raw_unet, ema, Path(cfg.output_dir) / "samples" / f"step-{state.step}.png")
            if heldout is not None:
                validation_loss(cfg, heldout(), raw_unet, ema, alphas_cumprod, scheduler.config, state, accelerator)
        if phema is not None and accelerator.is_main_process and (state.step % cfg.ema.snapshot_every == 0
                                                                   or state.step == train.max_steps):
            phema.save_snapshots(state.step)  # before the checkpoint: a resume never skips one
        if state.step % train.checkpoint_every == 0 or state.step == train.max_steps:
            checkpointer.save(state)
            if cfg.push.repo_id and cfg.push.checkpoints_branch and accelerator.is_main_process:
                publish(cfg, parts, raw_unet, ema, state, accelerator, time.time() - start_time)

    final = Path(cfg.output_dir) / "final"
    if accelerator.is_main_process:
        with atomic_folder(final) as tmp:
            save_result(tmp, cfg, parts, raw_unet, ema, state, accelerator, time.time() - start_time)
        if cfg.push.repo_id:
            from ldm.hub import push

            push(final, cfg.push.repo_id, private=cfg.push.private)
    accelerator.wait_for_everyone()
    logger.info("done: %d steps (%d skipped), %.1f minutes; pipeline in %s", state.step, state.skipped,
                (time.time() - start_time) / 60, final)
    accelerator.end_training()
    return final


def save_result(folder: Path, cfg: UNetStageConfig, parts, unet, ema, state, accelerator, seconds: float) -> None:
    """The pipeline (or LoRA) folder with its ``training.json``."""
    save_pipeline(folder, parts, unet, ema, cfg)
    write_summary(folder, "unet", cfg, state, accelerator, seconds,
                  previous=[p for p in (cfg.pretrained or cfg.vae, cfg.pretrained or cfg.text_encoder) if p],
                  base_model=cfg.pretrained,
                  extra={"prediction_type": parts.scheduler.config.prediction_type, "lora_rank": cfg.lora.rank or None,
                         "val_loss": state.extra.get("val_loss", [])})


def publish(cfg: UNetStageConfig, parts, unet, ema, state, accelerator, seconds: float) -> None:
    """Push a snapshot of the current (EMA) model to the branch ``push.checkpoints_branch``."""
    from ldm.hub import push

    snapshot = Path(cfg.output_dir) / "snapshot"
    with atomic_folder(snapshot) as tmp:
        save_result(tmp, cfg, parts, unet, ema, state, accelerator, seconds)
    push(snapshot, cfg.push.repo_id, private=cfg.push.private, revision=cfg.push.checkpoints_branch,
         commit_message=f"checkpoint at step {state.step}")


def power_ema(cfg: UNetStageConfig, unet, device) -> PowerEMA | None:
    """The power-function EMAs whose snapshots ``ldm ema`` turns into any σ_rel (None when off)."""
    if not cfg.ema.posthoc_sigma_rels:
        return None
    if cfg.lora.rank:
        raise ValueError("ema.posthoc_sigma_rels averages the full U-Net; with lora.rank > 0 set it to []")
    return PowerEMA(unet, cfg.ema.posthoc_sigma_rels, Path(cfg.output_dir) / SNAPSHOTS).to(device)


def heldout_set(cfg: UNetStageConfig, parts, text_encoder):
    """A function returning the held-out (latents, text states): encoded once, or at every call when the text
    encoder is trained (its states change)."""
    v = cfg.validation
    data = heldout_data_config(cfg.data, v.data, v.loss_samples)

    def encode():
        return encode_heldout(data, parts.vae, text_encoder, parts.tokenizer)

    if cfg.lora.train_text_encoder:
        return encode
    fixed = encode()
    logger.info("validation loss on %d held-out examples of %s x %d timesteps", len(fixed[0]), v.data, v.loss_timesteps)
    return lambda: fixed


def validation_loss(cfg: UNetStageConfig, heldout, unet, ema, alphas_cumprod, schedule, state, accelerator) -> None:
    """Held-out loss of the shipped weights (EMA when on) and of the raw ones: logged, and kept in ``state``."""
    v = cfg.validation

    def loss() -> float:
        return heldout_loss(unet, *heldout, alphas_cumprod, schedule.prediction_type, v.loss_timesteps, v.seed)

    row = {"step": state.step, "val_loss": loss()}
    if ema is not None:
        row["val_loss_raw"] = row["val_loss"]
        with ema.applied_to(unet):
            row["val_loss"] = loss()
    state.extra.setdefault("val_loss", []).append(row)  # in trainer.json: the history survives a resume
    accelerator.log({k: x for k, x in row.items() if k != "step"}, step=state.step)
    logger.info("step %d: validation loss %.5f", state.step, row["val_loss"])


def training_batches(accelerator, cfg: UNetStageConfig, start: int, parts):
    """An endless iterator of this process's micro-batches from global batch ``start`` on, its description, and
    the image dataset it reads (None for streamed data and DreamBooth)."""
    train, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    if cfg.dreambooth.instance_data is not None:
        check_buckets(cfg, parts)
        return *dreambooth.training_batches(accelerator, cfg, start), None
    loader = dict(num_workers=cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda")
    if cfg.data.streaming:
        stream = StreamingImageCaptions(cfg.data, train.seed, rank, world, train.batch_size, start_batches=start)
        return iter(DataLoader(stream, batch_size=train.batch_size, collate_fn=collate, **loader)), \
            "streamed, encoded every step", None
    dataset = ImageCaptionDataset(cfg.data, check=False)  # images checked below: split, or not at all
    check_buckets(cfg, parts)
    data, collate_fn = training_data(accelerator, cfg, dataset, parts)
    sampler = ResumableBatchSampler(dataset.groups(), train.batch_size, train.seed, rank, world, start=start)
    cached = data is not dataset
    return iter(DataLoader(data, batch_sampler=sampler, collate_fn=collate_fn, **loader)), \
        f"{len(dataset)} examples in {len(dataset.groups())} bucket(s), " + \
        ("cached latents and text states" if cached else "encoded every step"), dataset


def aligning(aligner, step: int, unet):
    """Capture the U-Net's middle-block features while representation alignment is on (else nothing)."""
    return aligner.capture(unet) if aligner is not None and aligner.active(step) else contextlib.nullcontext()


def check_buckets(cfg: UNetStageConfig, parts) -> None:
    """Every bucket's sides must survive the VAE's and the U-Net's downsampling."""
    step = vae_scale_factor(parts.vae) * 2 ** (len(parts.unet.config.block_out_channels) - 1)
    bad = [b for b in cfg.data.buckets if b[0] % step or b[1] % step]
    if bad or cfg.data.resolution % step:
        raise ValueError(f"data.buckets {bad or ''} / data.resolution {cfg.data.resolution}: sides must be "
                         f"multiples of {step} (VAE factor x U-Net downsampling)")


def training_data(accelerator, cfg: UNetStageConfig, dataset, parts):
    """The dataset the loader reads: cached moments + text states, or images encoded every step.

    ``dataset``'s images are checked here, each process checking its share; a current cache holds that
    check, and then no image is opened at all."""
    if not cfg.cache.enabled or cfg.lora.train_text_encoder:
        if cfg.lora.train_text_encoder and cfg.cache.enabled:
            logger.info("the text encoder is trained: no cache, images and captions are encoded every step")
        dataset.check(accelerator, cfg.cache.shard_size)
        return dataset, collate
    folder = latent_cache(accelerator, cfg, dataset, parts)
    return CachedLatentDataset(folder, dataset, in_memory=cfg.cache.in_memory), collate_cached


def latent_cache(dist, cfg: UNetStageConfig, dataset, parts) -> Path:
    """The cache folder for ``cfg``: reused when its fingerprint matches (``dataset`` then takes the image check
    the cache recorded), else built by every process of ``dist`` (each checks and encodes its share of the
    shards; ``ldm.data.cache.build_cache``)."""
    vae, text_encoder, tokenizer = parts.vae, parts.text_encoder, parts.tokenizer
    dtype = STORAGE_DTYPES[cfg.cache.dtype]
    fp = fingerprint(dataset, module_hash(vae), module_hash(text_encoder), dtype)
    return build_cache(Path(cfg.cache.dir or Path(cfg.output_dir) / "cache"), dataset, fp,
                       encode_images=lambda x: posterior_moments(vae, x),
                       encode_texts=lambda texts: encode_prompts(text_encoder, tokenizer, texts), dtype=dtype,
                       shard_size=cfg.cache.shard_size, dist=dist)


@torch.no_grad()
def posterior_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) of q(z|x), encoded in fp32 (the VAE is never autocast)."""
    with torch.autocast(pixels.device.type, enabled=False):
        dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
    return dist.mean, dist.logvar


def training_loss(unet, batch: dict, vae, text_encoder, tokenizer, empty_text: torch.Tensor,
                  alphas_cumprod: torch.Tensor, d: DiffusionConfig, schedule,
                  prior_loss_weight: float = 1.0) -> torch.Tensor:
    """The diffusion loss of one micro-batch, from cached moments or from pixels (same draws either way):
    the mean over its examples, or for a DreamBooth batch (``prior`` marks its class examples) the instance
    mean + prior_loss_weight x the class mean (``ldm.dreambooth.dreambooth_loss``).

    ``schedule`` is the noise scheduler's config: its prediction_type and variance_type define the task.
    A text encoder with trainable weights encodes the captions with gradients ("" where dropped).
    """
    device, prediction_type = alphas_cumprod.device, schedule.prediction_type
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
        mean, logvar = posterior_moments(vae, batch["pixel_values"])
    if any(p.requires_grad for p in text_encoder.parameters()):  # trained: encode "" for dropped captions
        captions = ["" if drop else c for drop, c in zip(dropped.tolist(), batch["caption"])]
        text = encode_prompts(text_encoder, tokenizer, captions, warn=False, grad=True)
    else:
        if not cached:
            text = encode_prompts(text_encoder, tokenizer, batch["caption"], warn=False)
        text = torch.where(dropped[:, None, None], empty_text.to(text.dtype), text)
    z = normalize_latents(mean + (0.5 * logvar).exp() * eps_z, vae.config)
    if d.immiscible_noise:
        noise = D.immiscible_noise(z, noise)
    a_t = alphas_cumprod[t]
    x_t = D.add_noise(z, noise, a_t)
    output = unet(x_t, t, encoder_hidden_states=text).sample
    weight = loss_weight(D.snr(a_t), d, prediction_type)
    if schedule.variance_type == "learned_range":
        losses = D.hybrid_loss(output, z, noise, t, alphas_cumprod, prediction_type, d.vlb_weight, weight)  # (B,)
    else:
        losses = D.simple_loss(output, D.diffusion_target(z, noise, a_t, prediction_type), weight)  # (B,)
    if "prior" in batch:
        return dreambooth.dreambooth_loss(losses, batch["prior"].to(device), prior_loss_weight)
    return losses.mean()


def loss_weight(snr_t: torch.Tensor, d: DiffusionConfig, prediction_type: str) -> torch.Tensor | None:
    """w(t) of diffusion.loss_weighting: min-SNR-γ (none when γ is null) or debiased 1/√SNR."""
    if d.loss_weighting == "debiased":
        return D.debiased_weight(snr_t, prediction_type)
    return D.min_snr_weight(snr_t, d.min_snr_gamma, prediction_type) if d.min_snr_gamma else None


@torch.no_grad()
def validation_grid(cfg: UNetStageConfig, parts, unet, ema, path: Path) -> None:
    """Fixed prompts and seeds, rendered by the shipping pipeline class with the EMA weights."""
    from ldm.models.unet import make_pipeline
    from ldm.sampling import make_scheduler, sample_grid

    v = cfg.validation
    with ema.applied_to(unet) if ema is not None else contextlib.nullcontext():
        pipe = make_pipeline(parts, unet, make_scheduler("dpm++", parts.scheduler.config))
        _, grid = sample_grid(pipe, list(v.prompts), 4, v.steps, v.guidance_scale, v.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _millions(params) -> float:
    return sum(p.numel() for p in params) / 1e6


if __name__ == "__main__":
    stage_entry("UNetStageConfig", main)
