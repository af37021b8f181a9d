"""Stage 2: train the text-conditioned latent U-Net (Rombach et al. 2022, §3.3) with classifier-free guidance.

    ldm train unet --config configs/unet/shapes.yaml --set vae=OUT/vae/final --set text_encoder=OUT/te/final
    accelerate launch -m train.unet --config configs/unet/shapes.yaml ...

One optimizer step: for each micro-batch, L = ``ldm.diffusion_batch.training_loss`` (its per-example draws
z, t, ε, caption dropout, then ``ldm.losses.denoising.denoising_losses``:
  x_t = √ā_t z + √(1−ā_t) ε;  L = w(SNR_t) · ‖f_θ(x_t, t, c) − target‖²   (+ λ L_vlb with learned variance)
with w from diffusion.loss_weighting / min_snr_gamma), + λ·L_REPA while alignment is on; then one update.
Cached and uncached batches give the same losses (exactly with cache.dtype float32; float16/bfloat16
storage moves them by its rounding): see ``ldm.diffusion_batch``.
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
from ldm.config import UNetStageConfig
from ldm.data.cache import latent_cache
from ldm.data.cached import CachedLatentDataset, collate_cached
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.sampler import ResumableBatchSampler
from ldm.data.split import heldout_data_config
from ldm.data.streaming import StreamingImageCaptions
from ldm.diffusion_batch import training_loss
from ldm.ema import EMA, SNAPSHOTS, PowerEMA
from ldm.entry import stage_entry
from ldm.evaluation.heldout import encode_heldout, heldout_loss, heldout_weighting
from ldm.losses.denoising import describe_weighting
from ldm.models.alignment import attach_targets, build_aligner
from ldm.models.text import encode_prompts
from ldm.models.unet import (load_components, parameter_groups, save_pipeline, trainable_parameters,
                             vae_scale_factor)
from ldm.training import (Checkpointer, apply_update, gradient_sync, log_batch_geometry, make_accelerator,
                          make_lr_scheduler, make_optimizer, new_state, seed_step, write_summary)

logger = logging.getLogger("train.unet")


def main(cfg: UNetStageConfig) -> Path:
    start_time = time.time()
    dreambooth.check_inputs(cfg)  # before any work: a missing instance folder fails here
    accelerator = make_accelerator(cfg.output_dir, cfg.train, cfg)
    log_batch_geometry(accelerator, cfg.train)
    train, device = cfg.train, accelerator.device
    parts = load_parts(cfg, accelerator)  # vae, text_encoder, tokenizer (frozen, on device), unet, noise scheduler
    vae, tokenizer, schedule = parts.vae, parts.tokenizer, parts.scheduler.config
    params = trainable_parameters(parts.unet, parts.text_encoder, cfg.lora)
    aligner, image_encoder = build_aligner(cfg, parts.unet)  # (None, None) unless align.weight > 0
    if aligner is not None:
        params += list(aligner.projector.parameters())
    alphas_cumprod = parts.scheduler.alphas_cumprod.to(device)
    models, optimizer, lr_scheduler = prepare_models(accelerator, train, cfg.lora, parts, params, aligner)
    unet, text_encoder = models["unet"], models.get("text_encoder", parts.text_encoder)
    raw_unet = accelerator.unwrap_model(unet)
    ema = EMA(raw_unet, train.ema_decay).to(device) if train.ema_decay else None
    phema = power_ema(cfg, raw_unet, device)  # None unless ema.posthoc_sigma_rels
    checkpointer, state = resume(accelerator, cfg.output_dir, train, models, optimizer, lr_scheduler, ema, phema)
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
                                         cfg.diffusion, schedule, cfg.dreambooth.prior_loss_weight)
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
            log_step(accelerator, state, float(loss_sum) / loss_count, lr_scheduler, norm, aligner)
            loss_sum, loss_count = torch.zeros((), device=device), 0
        validate_and_save(cfg, accelerator, state, parts, raw_unet, ema, phema, heldout, alphas_cumprod,
                          checkpointer, start_time)
    return finish(cfg, accelerator, parts, raw_unet, ema, state, start_time)


def load_parts(cfg: UNetStageConfig, accelerator):
    """``load_components`` with the frozen encoders on the device, the U-Net seeded alike on every process, and
    the DreamBooth class images made from the base model (the main process decides) before the barrier."""
    torch.manual_seed(cfg.train.seed)  # the same initial U-Net on every process
    parts = load_components(cfg)
    parts.vae.to(accelerator.device), parts.text_encoder.to(accelerator.device)
    if cfg.train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    dreambooth.prepare_class_images(cfg, parts, accelerator.device, accelerator)
    accelerator.wait_for_everyone()
    return parts


def prepare_models(accelerator, train, lora, parts, params, aligner):
    """AdamW over ``params`` (+ the text encoder's own rate), its LR schedule, and the trained modules (the
    U-Net, the text encoder when LoRA trains it, the REPA projector) prepared: (models, optimizer, schedule)."""
    groups = parameter_groups(params, parts.text_encoder, lora, train.learning_rate)
    optimizer = make_optimizer(groups, train)
    lr_scheduler = make_lr_scheduler(optimizer, train)
    models = {"unet": parts.unet}
    if lora.train_text_encoder:
        models["text_encoder"] = parts.text_encoder
    if aligner is not None:
        models["align"] = aligner.projector.to(accelerator.device)  # trained and checkpointed, never shipped
    prepared = accelerator.prepare(*models.values(), optimizer)
    return dict(zip(models, prepared[:-1])), prepared[-1], lr_scheduler


def resume(accelerator, output_dir: str, train, models: dict, optimizer, lr_scheduler, ema, phema):
    """The checkpointer of ``output_dir`` and the training state, resumed from its latest checkpoint (if any)."""
    state = new_state(accelerator, train)
    emas = {name: e for name, e in (("unet", ema), ("unet-phema", phema)) if e is not None}
    checkpointer = Checkpointer(accelerator, output_dir, train, models, {"unet": optimizer}, {"unet": lr_scheduler},
                                emas)
    checkpointer.resume(state)
    if phema is not None and accelerator.is_main_process:
        phema.drop_snapshots_after(state.step)
    return checkpointer, state


def log_step(accelerator, state, loss: float, lr_scheduler, norm, aligner) -> None:
    accelerator.log({"loss": loss, "lr": lr_scheduler.get_last_lr()[0],
                     "grad_norm": float("nan") if norm is None else float(norm), "skipped_steps": state.skipped,
                     **(aligner.pop_log() if aligner is not None else {})}, step=state.step)


def finish(cfg: UNetStageConfig, accelerator, parts, unet, ema, state, start_time: float) -> Path:
    """``<output_dir>/final`` written (and pushed when push.repo_id is set) by the main process; returns it."""
    final = Path(cfg.output_dir) / "final"
    if accelerator.is_main_process:
        with atomic_folder(final) as tmp:
            save_result(tmp, cfg, parts, unet, ema, state, accelerator, time.time() - start_time)
        if cfg.push.repo_id:
            from ldm.hub import push

            push(final, cfg.push.repo_id, private=cfg.push.private)
    accelerator.wait_for_everyone()
    logger.info("done: %d steps (%d skipped), %.1f minutes; pipeline in %s", state.step, state.skipped,
                (time.time() - start_time) / 60, final)
    accelerator.end_training()
    return final


def validate_and_save(cfg: UNetStageConfig, accelerator, state, parts, unet, ema, phema, heldout, alphas_cumprod,
                      checkpointer, start_time: float) -> None:
    """After a step, when it is due: the validation grid and held-out loss, the post-hoc EMA snapshots, the
    checkpoint (and its push to ``push.checkpoints_branch``)."""
    last = state.step == cfg.train.max_steps
    if accelerator.is_main_process and (state.step % cfg.validation.every == 0 or last):
        validation_grid(cfg, parts, unet, ema, Path(cfg.output_dir) / "samples" / f"step-{state.step}.png")
        if heldout is not None:
            validation_loss(cfg, heldout(), unet, ema, alphas_cumprod, parts.scheduler.config, state, accelerator)
    if phema is not None and accelerator.is_main_process and (state.step % cfg.ema.snapshot_every == 0 or last):
        phema.save_snapshots(state.step)  # before the checkpoint: a resume never skips one
    if state.step % cfg.train.checkpoint_every == 0 or last:
        checkpointer.save(state)
        if cfg.push.repo_id and cfg.push.checkpoints_branch and accelerator.is_main_process:
            publish(cfg, parts, unet, ema, state, accelerator, time.time() - start_time)


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
    encoder is trained (its states change). Logs which weighting the validation loss uses."""
    v, prediction_type = cfg.validation, parts.scheduler.config.prediction_type
    data = heldout_data_config(cfg.data, v.data, v.loss_samples)
    logger.info("validation loss weighted %s (the training loss: %s)", describe_weighting(heldout_weighting(),
                prediction_type), describe_weighting(cfg.diffusion, prediction_type))

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
    folder = latent_cache(accelerator, cfg.cache, cfg.output_dir, dataset, parts)
    return CachedLatentDataset(folder, dataset, in_memory=cfg.cache.in_memory), collate_cached


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
    stage_entry("unet", main)
