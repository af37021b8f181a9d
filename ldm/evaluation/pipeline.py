"""``ldm eval pipeline``: how good are a pipeline's images on held-out data, on any data.

For held-out image-caption pairs (``data``), split by a seeded shuffle into two disjoint halves
A and B, one image is generated for each caption of A (each with its own seeded generator) and
    FD, KID      generated vs B, in a CLIP feature space (``ldm.evaluation.fid``), and as the yardstick
                 the same metric between the real halves A and B (same sizes: the sampling noise floor)
    CLIP score   each generated image against its caption (mean), and of the real images of A
    bits/dim     the U-Net's −ELBO on held-out latents (``latent_bits_per_dim``)
    loss         the held-out diffusion loss on fixed timesteps and noise (``ldm.evaluation.heldout``, the
                 number training logs as its validation loss)
and a task-specific reading where the data is one this project knows: the shapes judge for shapes
data (on its own held-out single-shape prompts), the digit classifier for digits data (fitted with the
real images of A, on the generated images of A's captions). Each judge first reads the data's own real
held-out images (the shapes judge: A and B; the classifier: B, never fitted): that accuracy, its ceiling,
is reported beside the reading, and below 0.9 the reading is withheld with the reason
(``ldm.evaluation.ceiling``).
The report names the feature space: the pipeline's stage-0 CLIP, a CLIP the user names, or none.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from functools import lru_cache

import numpy as np
import torch
from diffusers import DDPMScheduler

from ldm.config import DataConfig
from ldm.data.images import DataError, ImageCaptionDataset, collate
from ldm.data.shapes import BACKGROUNDS, CELLS, COLOURS, EXTRA_KINDS, KINDS, render, single_shape_scenes
from ldm.data.split import heldout_data_config, heldout_halves
from ldm.evaluation.ceiling import ceiling, ceiling_text, checked_reading
from ldm.evaluation.judge import PALETTE, judge, summarise
from ldm.losses.diffusion import variational_bound_bpd
from ldm.models.text import encode_prompts
from ldm.models.unet import vae_scale_factor
from ldm.models.vae import normalize_latents

logger = logging.getLogger(__name__)
HELD_OUT_SEED = 10_000  # shapes seeds at or above this are never used for training data
CAPTION_SHAPE = re.compile(rf"\ba (?:small|large) ({'|'.join(PALETTE)}) ({'|'.join(KINDS + EXTRA_KINDS)}) "
                           rf"in the ({'|'.join(CELLS)})\b")
JUDGE_HINT = ("it knows the built-in shapes data: its palette colours and shape kinds on a plain background, "
              "as `ldm data shapes` draws them")


def judge_real(images, captions: list[str], kinds: tuple[str, ...] = KINDS) -> dict:
    """The shapes judge's ceiling on real images: an image is right when every shape its caption names
    ("a small red circle in the top left and a ...") is read, colour, kind and position; captions naming none
    are skipped.
    Returns {"real_accuracy", "real_images"}."""
    readable = tuple(dict.fromkeys(KINDS + tuple(kinds)))
    correct = []
    for image, text in zip(images, captions):
        named = CAPTION_SHAPE.findall(text)
        if named:
            verdicts = [judge(np.asarray(image), colour, kind, kinds=tuple(dict.fromkeys(readable + (kind,))),
                              cell=CELLS[where])
                        for colour, kind, where in named]
            correct.append(all(v.correct and v.position_ok for v in verdicts))
    return ceiling(correct)


def judge_pipeline(pipe, num: int = 100, seed: int = 0, steps: int = 20, guidance: float = 5.0,
                   colours: tuple[str, ...] = tuple(COLOURS), kinds: tuple[str, ...] = KINDS,
                   batch_size: int = 25, real: dict | None = None) -> dict:
    """Generate one image per held-out single-shape prompt and judge colour, kind and position, once the judge has
    checked itself on real images: ``real`` (``judge_real`` of a data folder's real held-out images), or by
    default the real renderings of these same prompts. Its ceiling (``real_accuracy``) is reported beside
    the reading; below 0.9 the reading is withheld (``ldm.evaluation.ceiling``)."""
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
    scenes = single_shape_scenes(num, HELD_OUT_SEED + seed, size, colours=colours, kinds=kinds)
    readable = tuple(dict.fromkeys(KINDS + tuple(kinds)))  # the judge also reads any requested extra kind

    def read() -> dict:
        verdicts = []
        for start in range(0, num, batch_size):
            chunk = scenes[start:start + batch_size]
            generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
            images = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=generators, output_type="np").images
            for scene, image in zip(chunk, images):
                shape = scene.shapes[0]
                verdicts.append(judge((image * 255).round().astype(np.uint8), shape.colour, shape.kind,
                                      kinds=readable, cell=shape.cell))
        return summarise(verdicts, [s.shapes[0].kind for s in scenes])

    limit = real if real is not None else rendered_ceiling(num, seed, size, tuple(colours), tuple(kinds))
    metrics = checked_reading(limit, "shapes judge", JUDGE_HINT, read)
    return metrics | {"steps": steps, "guidance_scale": guidance, "sampler": type(pipe.scheduler).__name__}


@lru_cache(maxsize=8)
def rendered_ceiling(num: int, seed: int, size: int, colours: tuple[str, ...], kinds: tuple[str, ...]) -> dict:
    """The judge on the real renderings of ``judge_pipeline``'s own prompts: {"real_accuracy", "real_images"}."""
    scenes = single_shape_scenes(num, HELD_OUT_SEED + seed, size, colours=colours, kinds=kinds)
    return judge_real([np.asarray(render(s, size)) for s in scenes], [s.caption for s in scenes], kinds)


def folder_ceiling(data: DataConfig, num: int | None = None) -> dict:
    """The shapes judge's ceiling on the first ``num`` (default all) real images of a shapes folder."""
    dataset = ImageCaptionDataset(data)
    batch = collate([dataset[(i, 0)] for i in range(len(dataset) if num is None else min(num, len(dataset)))])
    return judge_real(to_uint8(batch["pixel_values"]), list(batch["caption"]))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) pixels in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


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


SHAPES_CAPTION = re.compile(rf"^a (small|large) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)}) in the .* on a "
                            rf"({'|'.join(BACKGROUNDS)}) background$")
MAX_IMAGES = 1000  # held-out pairs used by default (500 generated images)


def data_kind(captions: list[str]) -> str | None:
    """"shapes" or "digits" when every caption is one of that built-in data's captions; "classes" when the
    captions name a few classes (``ldm.evaluation.classes.caption_classes``); else None."""
    from ldm.data.digits import label_of
    from ldm.evaluation.classes import caption_classes

    if captions and all(label_of(c) is not None for c in captions):
        return "digits"
    if captions and all(SHAPES_CAPTION.match(c) for c in captions):
        return "shapes"
    return "classes" if caption_classes(captions) else None


@torch.no_grad()
def generate(pipe, captions: list[str], steps: int, guidance: float, seed: int, batch_size: int = 25) -> np.ndarray:
    """One image per caption, image i from its own generator (seed · 100003 + i): uint8 [N, H, W, 3]."""
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        images.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                           output_type="np").images)
    return (np.concatenate(images) * 255).round().astype(np.uint8)


def distribution_metrics(space, generated: np.ndarray, real_a: dict, real_b: dict) -> dict:
    """FD and KID of generated vs B and of A vs B (the floor), CLIP scores; in the ``space`` named."""
    from ldm.evaluation.fid import clip_score, frechet_distance_features, kernel_inception_distance

    fake = space.images(torch.from_numpy(generated).permute(0, 3, 1, 2).float() / 127.5 - 1)
    a, b = space.images(real_a["pixel_values"]), space.images(real_b["pixel_values"])
    text = space.texts(real_a["caption"])
    kid, kid_std = kernel_inception_distance(fake, b)
    kid_real, kid_real_std = kernel_inception_distance(a, b)
    fd, fd_real = frechet_distance_features(fake, b), frechet_distance_features(a, b)
    return {"features": space.name, "fd": fd, "fd_real_halves": fd_real,
            "fd_ratio": fd / fd_real if fd_real > 0 else float("nan"),
            "kid": kid, "kid_std": kid_std, "kid_real_halves": kid_real, "kid_real_halves_std": kid_real_std,
            "clip_score": float(clip_score(fake, text).mean()), "clip_score_real": float(clip_score(a, text).mean()),
            "images_per_set": len(fake)}


def diffusion_loss(pipe, data: DataConfig, num: int = 64, seed: int = 0) -> float:
    """The held-out diffusion loss of the first ``num`` pairs of ``data`` (8 fixed timesteps, seeded noise)."""
    from ldm.evaluation.heldout import encode_heldout, heldout_loss

    latents, text = encode_heldout(heldout_data_config(data, data.path, num), pipe.vae, pipe.text_encoder,
                                   pipe.tokenizer)
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    return heldout_loss(pipe.unet, latents, text, alphas_cumprod, pipe.scheduler.config.prediction_type, seed=seed)


def evaluate_pipeline(model: str, data: DataConfig, num: int | None = None, seed: int = 0, steps: int = 20,
                      guidance: float = 5.0, scheduler: str | None = "dpm++", clip: str | None = None,
                      judge_prompts: int | None = None, bpd_images: int = 16, batch_size: int = 25) -> dict:
    """``ldm eval pipeline``: FD, KID, CLIP score, bits/dim on ``data`` (+ judge or digit classifier).

    num: held-out pairs to use (default all, at most 1,000): ``num // 2`` images are generated; also
    the number of judge prompts for shapes data unless ``judge_prompts`` is given (default 100).
    clip: an open_clip model for the feature space (``MODEL_NAME:PRETRAINED_PATH``, see
    ``ldm.evaluation.fid.load_feature_space``); default the pipeline's stage-0 CLIP.
    """
    from ldm.evaluation.fid import load_feature_space
    from ldm.sampling import check_steps, load_pipeline

    pipe = load_pipeline(model, scheduler=scheduler)
    check_steps(pipe.scheduler, steps)
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
    data = dataclasses.replace(data, resolution=size)
    dataset = ImageCaptionDataset(data)
    captions = [str(dataset.records[i][data.caption_column]) for i in dataset.valid]
    kind = data_kind(captions)
    metrics: dict = {"data": data.path, "data_kind": kind or "other", "resolution": size, "steps": steps,
                     "guidance_scale": guidance, "sampler": type(pipe.scheduler).__name__, "seed": seed}
    real_a, real_b = heldout_halves(dataset, num or MAX_IMAGES, seed)
    if len(real_a["caption"]) < 2:
        raise DataError(f"{data.path} has {len(dataset)} usable pairs; FD and KID need at least 4 held-out pairs")
    generated = generate(pipe, real_a["caption"], steps, guidance, seed, batch_size)
    space = load_feature_space(model, clip, device=pipe.device)
    if space is None:
        logger.warning("no feature space: %s has no stage-0 CLIP (open_clip/); name one with --clip "
                       "MODEL_NAME:PRETRAINED_PATH for FD, KID and CLIP score", model)
        metrics["features"] = "none (the pipeline has no stage-0 CLIP; pass --clip MODEL_NAME:PRETRAINED_PATH)"
    else:
        metrics |= distribution_metrics(space, generated, real_a, real_b)
    metrics["bits_per_dim"] = latent_bits_per_dim(pipe, data, num=bpd_images, seed=seed)
    metrics["heldout_loss"] = diffusion_loss(pipe, data, seed=seed)
    if kind in ("digits", "classes"):
        metrics |= classifier_reading(kind, generated, real_a, real_b, size)
    elif kind == "shapes":  # the judge reads its own held-out prompts; its ceiling is this data's real images
        real = judge_real(np.concatenate([to_uint8(real_a["pixel_values"]), to_uint8(real_b["pixel_values"])]),
                          list(real_a["caption"]) + list(real_b["caption"]))
        reading = judge_pipeline(pipe, num=judge_prompts or num or 100, seed=seed, steps=steps, guidance=guidance,
                                 batch_size=batch_size, real=real)
        metrics |= {"judge_accuracy": reading["accuracy"], "judge_real_accuracy": reading["real_accuracy"],
                    "judge": reading}
    return metrics


def digits_reading(generated: np.ndarray, real_a: dict, real_b: dict, size: int) -> dict:
    """The digit classifier on the generated images of A's captions: fitted with A's real images, checked on B's."""
    from ldm.data.digits import label_of
    from ldm.evaluation.digits import judge_digits

    labels_a, labels_b = ([label_of(c) for c in half["caption"]] for half in (real_a, real_b))
    reading = judge_digits(generated, labels_a, (to_uint8(real_a["pixel_values"]), labels_a),
                           (to_uint8(real_b["pixel_values"]), labels_b), size)
    return {"classifier_accuracy": reading["accuracy"], "classifier_real_accuracy": reading["real_accuracy"],
            "classifier": reading}


def classifier_reading(kind: str, generated: np.ndarray, real_a: dict, real_b: dict, size: int) -> dict:
    """``digits_reading`` or ``classes_reading``, by ``kind`` (``data_kind``: "digits" or "classes")."""
    return digits_reading(generated, real_a, real_b, size) if kind == "digits" else \
        classes_reading(generated, real_a, real_b)


def classes_reading(generated: np.ndarray, real_a: dict, real_b: dict) -> dict:
    """The class classifier on the generated images of A's captions: fitted with A's real images, checked on B's."""
    from ldm.evaluation.classes import judge_classes

    fit, check = ((to_uint8(half["pixel_values"]), list(half["caption"])) for half in (real_a, real_b))
    reading = judge_classes(generated, list(real_a["caption"]), fit, check)
    return {"classifier_accuracy": reading["accuracy"], "classifier_real_accuracy": reading["real_accuracy"],
            "classifier": reading}


def summary_lines(metrics: dict) -> list[str]:
    """The report's lines for ``evaluate_pipeline``'s metrics (the CLI and ``ldm train all`` print them)."""
    lines = [f"features        {metrics.get('features')}"]
    if "fd" in metrics:
        lines += [f"FD              {metrics['fd']:.4g} generated vs held-out (real half vs real half: "
                  f"{metrics['fd_real_halves']:.4g}, ratio {metrics['fd_ratio']:.2f}; {metrics['images_per_set']} "
                  f"images per set)",
                  f"KID             {metrics['kid']:.4g} ± {metrics['kid_std']:.2g} (real halves: "
                  f"{metrics['kid_real_halves']:.4g})",
                  f"CLIP score      {metrics['clip_score']:.2f} generated, {metrics['clip_score_real']:.2f} real"]
    lines.append(f"U-Net bound     {metrics['bits_per_dim']:.3f} bits/dim on held-out latents; held-out diffusion "
                 f"loss {metrics['heldout_loss']:.4f}")
    if "classifier_accuracy" in metrics:
        c = metrics["classifier"]
        things, thing = ("digits", "digit") if metrics.get("data_kind") == "digits" else ("images", "class")
        lines.append(f"classifier      withheld: {c['withheld']}" if c["accuracy"] is None else
                     f"classifier      {c['accuracy']:.2f} of generated {things} read as their caption's {thing} "
                     f"(its ceiling: {ceiling_text(c)})")
    if "judge_accuracy" in metrics:
        j = metrics["judge"]
        lines.append(f"judge accuracy  withheld: {j['withheld']}" if j["accuracy"] is None else
                     f"judge accuracy  {j['accuracy']:.2f} on {j['num_images']} held-out shapes prompts (its ceiling: "
                     f"{ceiling_text(j)})")
    return lines
