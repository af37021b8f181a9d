"""Stage 1: train the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3, App. G).

    ldm train vae --config configs/vae/shapes.yaml --set data.path=D --set output_dir=OUT
    accelerate launch -m train.vae --config configs/vae/shapes.yaml --set data.path=D ...

One optimizer step, with ε drawn per example (so resumed and multi-process runs are exact):
  1. autoencoder  x -> q(z|x) = N(μ, σ²) -> z = μ + σ·ε -> x̂
                  L = NLL(x, x̂; s) + β·KL(q ‖ N(0, I))  [+ λ·L_G(D(x̂)) from loss.disc_start on]
  2. discriminator (from loss.disc_start on)  L_D(D(x), D(sg[x̂]))
Step 2 runs after step 1's update: each optimizer then has its own backward and fp16 loss scale.
At the end the EMA weights are calibrated (scaling_factor) and saved to <output_dir>/final.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_folder
from ldm.config import VAELossConfig, VAEStageConfig
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.sampler import ResumableBatchSampler
from ldm.ema import EMA
from ldm.entry import stage_entry
from ldm.grid import save_grid
from ldm.losses import vae as L
from ldm.models.discriminator import PatchDiscriminator
from ldm.models.vae import (AutoencoderWithLogvar, build_vae, calibrate_scaling_factor, downsampling_factor,
                            save_vae)
from ldm.training import (Checkpointer, ExampleRNG, apply_update, gradient_sync, log_batch_geometry,
                          make_accelerator, make_lr_scheduler, make_optimizer, new_state, seed_step)

logger = logging.getLogger("train.vae")


def main(cfg: VAEStageConfig) -> Path:
    start_time = time.time()
    accelerator = make_accelerator(cfg.output_dir, cfg.train, cfg)
    log_batch_geometry(accelerator, cfg.train)
    train, loss_cfg, device = cfg.train, cfg.loss, accelerator.device
    dataset = ImageCaptionDataset(cfg.data, need_captions=False)

    model, disc, opt_g, opt_d, lr_g, lr_d = build_models(cfg)
    model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    ae, disc_raw = accelerator.unwrap_model(model), accelerator.unwrap_model(disc)
    ema = EMA(ae, train.ema_decay).to(device) if train.ema_decay else None
    perceptual = make_perceptual(loss_cfg, device)

    state = new_state(accelerator, train)
    checkpointer = Checkpointer(accelerator, cfg.output_dir, train,
                                {"autoencoder": model, "discriminator": disc},
                                {"autoencoder": opt_g, "discriminator": opt_d},
                                {"autoencoder": lr_g, "discriminator": lr_d}, {"autoencoder": ema} if ema else {})
    checkpointer.resume(state)
    sampler = ResumableBatchSampler(dataset.groups(), train.batch_size, train.seed, accelerator.process_index,
                                    accelerator.num_processes, start=state.batches)
    batches = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers))
    preview = collate([dataset[(i, 0)] for i in range(min(8, len(dataset)))])["pixel_values"]
    meter: dict[str, float] = {}

    for _ in tqdm(range(state.step, train.max_steps), initial=state.step, total=train.max_steps,
                  desc="vae", disable=not accelerator.is_local_main_process):
        seed_step(train.seed, state.step, accelerator.process_index)
        gan_on = state.step >= loss_cfg.disc_start
        micro_batches = [next_batch(batches, state, device) for _ in range(train.grad_accum_steps)]
        # 1. autoencoder: accumulate over the micro-batches, one update, then the EMA
        terms, pairs = autoencoder_pass(accelerator, model, disc_raw, micro_batches, perceptual, loss_cfg, gan_on)
        terms["grad_norm"] = apply_update(accelerator, state, opt_g, lr_g, ae.parameters(), terms["loss"], train,
                                          "autoencoder")
        if ema is not None and terms["grad_norm"] is not None:
            ema.update(ae, state.step)
        # 2. discriminator, on the same images and the reconstructions of step 1
        if gan_on and terms["grad_norm"] is not None:
            terms |= discriminator_pass(accelerator, disc, pairs, loss_cfg.disc_loss)
            terms["disc_grad_norm"] = apply_update(accelerator, state, opt_d, lr_d, disc_raw.parameters(),
                                                   terms["disc_loss"], train, "discriminator")
        state.step += 1

        _meter(meter, terms | {"lr": lr_g.get_last_lr()[0], "logvar": ae.logvar.detach()})
        if state.step % train.log_every == 0 or state.step == train.max_steps:
            log_metrics(accelerator, meter, state.step)
        if accelerator.is_main_process and (state.step % train.image_every == 0 or state.step == train.max_steps):
            save_preview(ae, preview, Path(cfg.output_dir) / "samples" / f"step-{state.step}.png")
        if state.step % train.checkpoint_every == 0 or state.step == train.max_steps:
            checkpointer.save(state)  # always at the end too: rerunning a finished run trains nothing
    final = save_final(accelerator, cfg, ae, ema, dataset)
    logger.info("done: %d steps (%d skipped), %.1f minutes; final VAE in %s", state.step, state.skipped,
                (time.time() - start_time) / 60, final)
    accelerator.end_training()
    return final


def build_models(cfg: VAEStageConfig):
    """Autoencoder (+ learned logvar), discriminator, their AdamW optimizers and LR schedules.

    Each schedule steps with its own optimizer: the discriminator's warm-up starts at loss.disc_start."""
    train, loss_cfg = cfg.train, cfg.loss
    torch.manual_seed(train.seed)  # the same initial weights on every process
    model = AutoencoderWithLogvar(build_vae(cfg.model, cfg.data.resolution), loss_cfg.logvar_init)
    disc = PatchDiscriminator(3, loss_cfg.disc_channels, loss_cfg.disc_layers)
    opt_g = make_optimizer(model.parameters(), train)
    opt_d = make_optimizer(disc.parameters(), train, loss_cfg.disc_learning_rate or train.learning_rate)
    logger.info("autoencoder %.2fM parameters (f=%d, %d latent channels), discriminator %.2fM (on from step %d)",
                _millions(model), downsampling_factor(model.vae), cfg.model.latent_channels, _millions(disc),
                loss_cfg.disc_start)
    return model, disc, opt_g, opt_d, make_lr_scheduler(opt_g, train), make_lr_scheduler(opt_d, train)


def next_batch(batches, state, device) -> dict:
    """The next micro-batch, counted in the data position; ε for the posterior drawn per example."""
    batch = next(batches)
    state.batches += 1
    state.see(batch["seed"])
    batch["pixel_values"] = batch["pixel_values"].to(device)
    batch["rng"] = ExampleRNG(batch["seed"])
    return batch


# --------------------------------------------------------------------------------------------
# The two losses
# --------------------------------------------------------------------------------------------
def autoencoder_pass(accelerator, model, disc_raw, micro_batches, perceptual, cfg: VAELossConfig, gan_on: bool):
    """Backward of L / accum for each micro-batch (gradients all-reduced on the last); returns the
    averaged loss terms and the (x, sg[x̂]) pairs for the discriminator."""
    vae, accum = accelerator.unwrap_model(model).vae, len(micro_batches)
    f, channels = downsampling_factor(vae), vae.config.latent_channels
    terms, pairs = {}, []
    for micro, batch in enumerate(micro_batches):
        x = batch["pixel_values"]  # (B, 3, H, W)
        eps = batch["rng"].randn((channels, x.shape[2] // f, x.shape[3] // f), x.device)  # (B, C, h, w)
        with gradient_sync(accelerator, [model], sync=micro == accum - 1):
            with accelerator.autocast():
                loss, x_hat, parts = autoencoder_loss(accelerator, model, disc_raw, x, eps, perceptual, cfg, gan_on)
            accelerator.backward(loss / accum)
        pairs.append((x, x_hat.detach()))
        _add(terms, parts, accum)
    return terms, pairs


def discriminator_pass(accelerator, disc, pairs, kind: str) -> dict:
    """Backward of L_D / accum for each (x, sg[x̂]) pair; returns the averaged terms."""
    terms = {}
    for micro, (x, x_hat) in enumerate(pairs):
        with gradient_sync(accelerator, [disc], sync=micro == len(pairs) - 1):
            with accelerator.autocast():
                loss, parts = discriminator_loss(disc, x, x_hat, kind)
            accelerator.backward(loss / len(pairs))
        _add(terms, parts, len(pairs))
    return terms


def autoencoder_loss(accelerator, model, disc_raw, x, eps, perceptual, cfg: VAELossConfig, gan_on: bool):
    """The forward pass, then ``ldm.losses.vae.autoencoder_objective``: L = NLL + β·KL [+ λ·L_G]; returns
    (loss, x̂, terms for logging)."""
    x_hat, mean, logvar_q = model(x, eps)  # (B, 3, H, W), (B, C, h, w) x 2
    ae = accelerator.unwrap_model(model)
    logits_fake = None
    if gan_on:
        disc_raw.requires_grad_(False)  # L_G trains the generator only
        logits_fake = disc_raw(x_hat)
        disc_raw.requires_grad_(True)
    reduce = (lambda g: accelerator.reduce(g, "mean")) if accelerator.num_processes > 1 else None
    loss, terms = L.autoencoder_objective(x, x_hat, mean, logvar_q, ae.logvar, cfg, perceptual, logits_fake,
                                          ae.vae.decoder.conv_out.weight, reduce)
    return loss, x_hat, terms


def discriminator_loss(disc, x, x_hat, kind: str):
    """L_D on one forward pass over [x; x̂] (GroupNorm is per example, so the halves do not mix)."""
    logits_real, logits_fake = disc(torch.cat([x, x_hat])).float().chunk(2)
    loss = L.discriminator_loss(logits_real, logits_fake, kind)
    return loss, {"disc_loss": loss.detach(), "logits_real": logits_real.mean().detach(),
                  "logits_fake": logits_fake.mean().detach()}


# --------------------------------------------------------------------------------------------
# Updates, logging, images, the final folder
# --------------------------------------------------------------------------------------------
def make_perceptual(cfg: VAELossConfig, device):
    if cfg.lpips_weights is None or cfg.perceptual_weight == 0:
        logger.info("LPIPS is off: %s; the reconstruction term is %s only", "loss.perceptual_weight is 0"
                    if cfg.lpips_weights else "loss.lpips_weights is not set (the lpips package downloads its VGG "
                    "weights, which is impossible offline)", cfg.reconstruction.upper())
        return None
    logger.info("LPIPS on: weight %g, weights from %s", cfg.perceptual_weight, cfg.lpips_weights)
    return L.load_lpips(cfg.lpips_weights, device)


def _add(total: dict, parts: dict, accum: int) -> None:
    for key, value in parts.items():
        total[key] = total.get(key, 0.0) + value / accum


def _meter(meter: dict, terms: dict) -> None:
    for key, value in terms.items():
        if value is not None:
            meter[key] = meter.get(key, 0.0) + float(value)
            meter[f"_n_{key}"] = meter.get(f"_n_{key}", 0) + 1


def log_metrics(accelerator, meter: dict, step: int) -> None:
    means = {f"train/{k}": v / meter[f"_n_{k}"] for k, v in meter.items() if not k.startswith("_n_")}
    accelerator.log(means, step=step)
    logger.info("step %d: %s", step, ", ".join(f"{k[6:]} {v:.4g}" for k, v in means.items()))
    meter.clear()


@torch.no_grad()
def save_preview(ae: AutoencoderWithLogvar, images: torch.Tensor, path: Path) -> None:
    """Inputs (top row) above their reconstructions from the posterior mode (bottom row)."""
    was_training = ae.training
    ae.eval()
    x = images.to(ae.logvar.device)
    x_hat = ae.vae.decode(ae.vae.encode(x).latent_dist.mode()).sample
    ae.train(was_training)
    save_grid(torch.cat([x, x_hat]), path, nrow=len(x))


def save_final(accelerator, cfg: VAEStageConfig, ae: AutoencoderWithLogvar, ema, dataset) -> Path:
    """EMA weights -> calibrated scaling_factor -> <output_dir>/final, written atomically (main process)."""
    final = Path(cfg.output_dir) / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(ae)  # training is over: the live weights may be replaced
        vae = ae.vae.float().eval()
        n = min(cfg.calibration_samples, len(dataset))
        loader = DataLoader(Subset(dataset, [(i, 0) for i in range(n)]), batch_size=cfg.train.batch_size,
                            collate_fn=collate, num_workers=cfg.data.num_workers)
        scale = calibrate_scaling_factor(vae, (b["pixel_values"] for b in tqdm(loader, desc="calibrate",
                                                                                 leave=False)))
        vae.register_to_config(scaling_factor=scale)
        with atomic_folder(final) as tmp:
            save_vae(vae, tmp, ae.logvar.item(), cfg.loss.reconstruction)
        logger.info("saved %s VAE to %s: scaling_factor %.5f (from %d images), learned logvar %.4f",
                    "EMA" if ema is not None else "final", final, scale, n, ae.logvar.item())
    accelerator.wait_for_everyone()
    return final


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


if __name__ == "__main__":
    stage_entry("vae", main)
