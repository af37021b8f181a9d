"""Loading a saved pipeline, choosing a sampler by name, and writing sample grids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)

from ldm.arguments import ArgumentValueError
from ldm.grid import to_pil_grid
from ldm.locations import (LORA_FILE, LocationError, check_can_create, local_or_hub, model_location,
                           not_found_here_or_on_hub)
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline, schedule_problem

logger = logging.getLogger(__name__)
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, config):
    """A sampler of kind ``name`` on the noise schedule of ``config`` (the saved scheduler's config)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    return cls.from_config(config, **extra)


def steps_problem(scheduler, steps: int) -> str | None:
    """Why ``scheduler`` cannot sample in ``steps`` steps (None when it can), from a fresh copy's timesteps."""
    total = scheduler.config.num_train_timesteps
    if not 1 <= steps <= total:
        return f"a count from 1 to the schedule's {total} timesteps is needed"
    trial = type(scheduler).from_config(scheduler.config)
    try:
        trial.set_timesteps(steps)
    except (ValueError, IndexError, RuntimeError) as err:
        return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return schedule_problem(trial, steps)


def check_steps(scheduler, steps: int, key: str = "--steps") -> None:
    """Refuse, before any image is made, a step count the sampler cannot take (it would crash or sample a
    blank image); the message gives the counts that work, found by asking the sampler itself."""
    problem = steps_problem(scheduler, steps)
    if problem is None:
        return
    total = scheduler.config.num_train_timesteps
    works = (lambda n: steps_problem(scheduler, n) is None)
    top = next((n for n in range(total, 0, -1) if works(n)), 0)
    what = (f"the {type(scheduler).__name__} sampler on this pipeline's schedule ({total} training timesteps, "
            f"{scheduler.config.get('timestep_spacing', 'leading')!r} spacing)")
    if not 1 <= steps < top:
        raise ArgumentValueError(f"{key} {steps}: {what} cannot take {steps} steps ({problem}); choose 1 to {top}")
    nearest = [n for n in (next((n for n in range(steps - 1, 0, -1) if works(n)), None),
                           next((n for n in range(steps + 1, top + 1) if works(n)), None)) if n]
    raise ArgumentValueError(f"{key} {steps}: {what} cannot take exactly {steps} steps ({problem}); choose "
                             f"{' or '.join(map(str, nearest))} (most counts from 1 to {top} work, a few like this "
                             f"one do not)")


def check_image_path(out: Path, key: str) -> None:
    """An image file name PIL can write, not a folder: checked before the (slow) pipeline loads."""
    if out.is_dir() or out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise LocationError(f"{key} {out} must be an image file name ending in .png, .jpg or .webp (an existing "
                            f"file of that name is replaced)")


def load_pipeline(model: str | Path, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, scheduler: str | None = None) -> LatentDiffusionPipeline:
    """A ``LatentDiffusionPipeline`` from a saved folder or Hub id, optionally with another sampler.

    A LoRA folder (``pytorch_lora_weights.safetensors`` + ``training.json``) loads its base pipeline
    (the ``base_model`` it was trained from) with the adapters applied.
    """
    location = local_or_hub(str(model), "--model")
    if isinstance(location, Path) and is_lora_folder(location):
        pipe = _from_pretrained(lora_base_model(location), "the base_model of " + str(location), dtype)
        pipe.load_lora_weights(str(location))
    else:
        model_location(str(model), "--model", "model_index.json", "pipeline")
        pipe = _from_pretrained(location, "--model", dtype)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def is_lora_folder(folder: Path) -> bool:
    return (folder / LORA_FILE).exists() and not (folder / "model_index.json").exists()


def lora_base_model(folder: Path) -> str | Path:
    """The base pipeline a LoRA folder was trained on, from its ``training.json``."""
    summary = folder / "training.json"
    try:
        base = json.loads(summary.read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        base = None
    if not base:
        raise ValueError(f"LoRA folder {folder}: {summary.name} does not name its base_model, so the pipeline to "
                         f"apply it to is unknown; load the base pipeline yourself and call "
                         f"pipe.load_lora_weights({str(folder)!r})")
    return local_or_hub(base, f"base_model in {summary}")


def _from_pretrained(location: Path | str, key: str, dtype: torch.dtype) -> LatentDiffusionPipeline:
    try:
        return LatentDiffusionPipeline.from_pretrained(str(location), dtype=dtype)
    except OSError as err:  # a broken local file, or huggingface_hub's not-found, offline and HTTP errors
        if isinstance(location, Path):
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LocationError(f"{key} {location} cannot be loaded: {reason}") from err
        raise not_found_here_or_on_hub(location, key, err) from err


def sample_grid(pipe, prompts: list[str], num_images: int, steps: int, guidance: float, seed: int,
                negative_prompt: str | None = None) -> tuple[list, Image.Image]:
    """Images for every prompt (row per prompt, ``num_images`` columns) and their grid."""
    images = []
    for i, prompt in enumerate(prompts):
        generator = [torch.Generator().manual_seed(seed + 1000 * i + j) for j in range(num_images)]
        out = pipe(prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images,
                   num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt")
        images.append(out.images)
    pixels = torch.cat(images) * 2 - 1  # [0, 1] -> [-1, 1]
    return images, to_pil_grid(pixels, nrow=num_images)


def sample_to_files(model: str, prompts: list[str], negative_prompt: str | None = None, num_images: int = 4,
                    steps: int = 25, guidance: float = 5.0, seed: int = 0, out: str = "samples.png",
                    scheduler: str | None = None, singles: bool = False) -> list[Path]:
    """``ldm sample``: write a PNG grid (and optionally each image) for the prompts."""
    if num_images < 1:
        raise ArgumentValueError(f"--num-images must be >= 1, got {num_images}")
    check_image_path(Path(out), "--out")
    check_can_create(Path(out), "--out")
    pipe = load_pipeline(model, scheduler=scheduler)
    check_steps(pipe.scheduler, steps)
    images, grid = sample_grid(pipe, prompts, num_images, steps, guidance, seed, negative_prompt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    paths = [out]
    if singles:
        for i, batch in enumerate(images):
            for j, image in enumerate(batch):
                path = out.with_name(f"{out.stem}-{i:02d}-{j:02d}.png")
                to_pil_grid(image[None] * 2 - 1, nrow=1).save(path)
                paths.append(path)
    return paths
