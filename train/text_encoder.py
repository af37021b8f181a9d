"""Stage 0: train a small CLIP with open_clip's contrastive loss; keep its text tower.

    ldm train text-encoder --config configs/text_encoder/shapes.yaml [--set key=value ...]
    accelerate launch -m train.text_encoder --config configs/text_encoder/shapes.yaml

Image and text towers come from an open_clip model config built from ``cfg.model``; the loss
(``ldm.losses.contrastive``) is the symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3) with a
learnable temperature:

    L = ½ [CE(τ · V Tᵀ, I) + CE(τ · T Vᵀ, I)],   V, T: [B, E] unit image / text features, τ = exp(logit_scale)

With several processes every process gathers the features of all of them *with* gradients
(``ClipLoss(gather_with_grad=True, local_loss=False)``), so the loss is the one of the global
batch and the averaged gradient equals that of one process with the whole batch. Gradient
accumulation contrasts each micro-batch with its own negatives.

The last ``cfg.eval_samples`` pairs are held out from training; text→image retrieval on them is
logged every ``cfg.eval_every`` steps. Output, ``<output_dir>/final``:
    text_encoder/, tokenizer/   the text tower as CLIPTextModel + CLIPTokenizer (layer choice applied)
    open_clip/                  the whole open_clip model (safetensors) for `ldm eval text-encoder`
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from open_clip import ClipLoss
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_folder
from ldm.config import TextEncoderStageConfig
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.sampler import ResumableBatchSampler
from ldm.data.split import split_heldout_positions
from ldm.ema import EMA
from ldm.entry import stage_entry
from ldm.evaluation.retrieval import evaluate_clip, swap_attribute
from ldm.losses.contrastive import contrastive_loss
from ldm.models.text import (build_clip_tokenizer, build_open_clip, open_clip_config, openclip_to_clip_text,
                             save_open_clip, save_text_encoder, tokenize, warn_if_truncated)
from ldm.training import (Checkpointer, ExampleRNG, apply_update, gradient_sync, log_batch_geometry,
                          make_accelerator, make_lr_scheduler, make_optimizer, new_state, seed_step, write_summary)

logger = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)  # τ ≤ 100, as in CLIP
NEGATIVE_SALT = 0x4E4547  # the hard-negative choice's own random stream


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; gains, biases and the logit scale are not decayed (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def hard_negative_captions(captions: list[str], seeds: torch.Tensor, groups) -> tuple[list[str], torch.Tensor]:
    """Each caption with one word of ``groups`` swapped for another word of its group, chosen by the
    example's own random stream (draw 0 of ``ExampleRNG(seeds, salt=NEGATIVE_SALT)``); captions with
    no such word are returned unchanged and marked False."""
    choice = ExampleRNG(seeds, salt=NEGATIVE_SALT).rand()
    negatives, has = [], []
    for caption, u in zip(captions, choice.tolist()):
        swaps = [swap for group in groups for swap in swap_attribute(caption, tuple(group), first_only=False)]
        negatives.append(swaps[int(u * len(swaps))] if swaps else caption)
        has.append(bool(swaps))
    return negatives, torch.tensor(has)


def main(cfg: TextEncoderStageConfig) -> Path:
    start_time = time.time()
    accelerator = make_accelerator(cfg.output_dir, cfg.train, cfg)
    log_batch_geometry(accelerator, cfg.train)
    device, accum = accelerator.device, cfg.train.grad_accum_steps

    dataset, train_positions, eval_batch, tokenizer = prepare_data(cfg)
    model, opt, lr_scheduler, ema, clip_config = build_clip(cfg, device)
    model, opt = accelerator.prepare(model, opt)
    loss_fn = ClipLoss(gather_with_grad=True, cache_labels=True, rank=accelerator.process_index,
                       world_size=accelerator.num_processes)

    state = new_state(accelerator, cfg.train)
    checkpointer = Checkpointer(accelerator, cfg.output_dir, cfg.train, {"clip": model}, {"clip": opt},
                                {"lr": lr_scheduler}, {"clip": ema} if ema else None)
    checkpointer.resume(state)
    sampler = ResumableBatchSampler([train_positions], cfg.train.batch_size, cfg.train.seed,
                                    accelerator.process_index, accelerator.num_processes, start=state.batches)
    batches = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers))
    model.train()
    held_out_metrics = None

    for _ in tqdm(range(state.step, cfg.train.max_steps), initial=state.step, total=cfg.train.max_steps,
                  desc="text encoder", disable=not accelerator.is_main_process):
        seed_step(cfg.train.seed, state.step, accelerator.process_index)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(batches)
            state.batches += 1
            state.see(batch["seed"])
            input_ids, negative_ids, has_negative = caption_ids(tokenizer, batch, cfg.hard_negatives, device)
            with gradient_sync(accelerator, [model], sync=micro == accum - 1), accelerator.autocast():
                loss = contrastive_loss(model, loss_fn, batch["pixel_values"].to(device), input_ids, negative_ids,
                                        has_negative) / accum
                accelerator.backward(loss)
            loss_sum += loss.detach()

        norm = apply_update(accelerator, state, opt, lr_scheduler, model.parameters(), loss_sum, cfg.train)
        if norm is not None:
            with torch.no_grad():
                accelerator.unwrap_model(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if ema:
                ema.update(model, state.step)
        state.step += 1

        if state.step % cfg.train.log_every == 0:
            tau = accelerator.unwrap_model(model).logit_scale.exp().item()
            log_step(accelerator, state.step, {"loss": loss_sum.item(), "grad_norm": float("nan") if norm is None else norm.item(), "logit_scale": tau,
                                               "lr": lr_scheduler.get_last_lr()[0]})
        if eval_batch is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.train.max_steps):
            held_out_metrics = log_held_out(accelerator, model, tokenizer, eval_batch, state.step)
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.max_steps:
            checkpointer.save(state)  # always at the end too: a rerun of a finished run trains nothing

    final = save_final(accelerator, cfg, model, ema, clip_config, state, time.time() - start_time, held_out_metrics)
    logger.info("done: %d steps (%d skipped), %.1f minutes; text encoder in %s", state.step, state.skipped,
                (time.time() - start_time) / 60, final)
    accelerator.end_training()
    return final


def build_clip(cfg: TextEncoderStageConfig, device):
    """The CLIP (seeded alike on every process), its AdamW (weight decay on matrices only), LR schedule and EMA,
    and its open_clip config."""
    clip_config = open_clip_config(cfg.model, cfg.data.resolution)
    torch.manual_seed(cfg.train.seed)
    model = build_open_clip(clip_config)
    if cfg.train.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    logger.info("CLIP: %.2fM parameters (text tower %.2fM)", sum(p.numel() for p in model.parameters()) / 1e6,
                sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual")) / 1e6)
    opt = make_optimizer(param_groups(model, cfg.train.weight_decay), cfg.train)
    lr_scheduler = make_lr_scheduler(opt, cfg.train)
    ema = EMA(model, cfg.train.ema_decay).to(device) if cfg.train.ema_decay else None
    return model, opt, lr_scheduler, ema, clip_config


def caption_ids(tokenizer, batch: dict, hard_negatives, device):
    """(input_ids, negative_ids, has_negative) of a micro-batch's captions; no negatives without hard_negatives."""
    input_ids = tokenize(tokenizer, batch["caption"]).to(device)
    if not hard_negatives:
        return input_ids, None, None
    negatives, has_negative = hard_negative_captions(batch["caption"], batch["seed"], hard_negatives)
    return input_ids, tokenize(tokenizer, negatives).to(device), has_negative.to(device)


def prepare_data(cfg: TextEncoderStageConfig):
    """The dataset, its training positions, the held-out batch (the last pairs) and the tokenizer.

    Every caption is checked once against the context length: one warning if any is truncated.
    """
    dataset = ImageCaptionDataset(cfg.data)
    train_positions, held_out = split_heldout_positions(len(dataset), cfg.eval_samples)
    tokenizer = build_clip_tokenizer(cfg.model.text_context_length)
    captions = list(dataset.records[cfg.data.caption_column])
    warn_if_truncated(tokenizer, [captions[i] for i in dataset.valid])
    eval_batch = collate([dataset[i] for i in held_out]) if held_out else None
    return dataset, train_positions, eval_batch, tokenizer


def log_step(accelerator, step: int, logs: dict) -> None:
    accelerator.log(logs, step=step)
    logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))


def log_held_out(accelerator, model, tokenizer, eval_batch: dict, step: int) -> dict | None:
    """Retrieval among the held-out pairs (main process only) -> logs."""
    if not accelerator.is_main_process:
        return None
    m = evaluate_clip(accelerator.unwrap_model(model), tokenizer, eval_batch["pixel_values"], eval_batch["caption"])
    sens = m["attribute_sensitivity_projected"]
    keys = ("text_to_image_top1", "text_to_image_top5", "image_to_text_top1")
    logs = {f"heldout/{k}": m[k] for k in keys}
    logs |= {f"heldout/{k}_swap_{s}_cosine": v[f"{s}_cosine"] for k, v in sens.items() if v for s in ("mean", "max")}
    accelerator.log(logs, step=step)
    logger.info("step %d held-out (%d pairs): %s", step, m["candidates"],
                ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in logs.items()))
    return m


def save_final(accelerator, cfg: TextEncoderStageConfig, model, ema, clip_config: dict, state, seconds: float,
               held_out: dict | None) -> Path:
    """<output_dir>/final: text_encoder/ + tokenizer/ (layer choice applied), open_clip/, training.json."""
    final = Path(cfg.output_dir) / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clip = accelerator.unwrap_model(model)
        if ema:
            ema.copy_to(clip)
        text_encoder, tokenizer = openclip_to_clip_text(clip, layer=cfg.model.layer)
        extra = {"layer": cfg.model.layer, "text_context_length": cfg.model.text_context_length}
        if held_out:
            extra |= {f"heldout_{k}": round(held_out[k], 3) for k in ("text_to_image_top1", "text_to_image_top5")}
        with atomic_folder(final) as tmp:
            save_text_encoder(tmp, text_encoder, tokenizer)
            save_open_clip(tmp / "open_clip", clip, clip_config)
            write_summary(tmp, "text_encoder", cfg, state, accelerator, seconds, extra=extra)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


if __name__ == "__main__":
    stage_entry("text_encoder", main)
