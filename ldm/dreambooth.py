"""DreamBooth: teach a pipeline one subject from a few images (Ruiz et al. 2023, "DreamBooth: Fine Tuning
Text-to-Image Diffusion Models for Subject-Driven Generation").

The instance images all carry one identifier prompt ("a sks circle"); the U-Net (LoRA or full) learns
that the identifier means this subject. Prior preservation (§4.2, eq. 2) keeps what the base model knew
of the class: images the *base* pipeline generates for the class prompt ("a circle") are trained on
beside the instance images, so the class prompt keeps producing the class, not the subject:

    L = mean_{i ∈ instance} ℓ_i + λ · mean_{j ∈ class} ℓ_j        ℓ = the stage's per-example diffusion loss

Batches: B instance examples, then B class examples (B = train.batch_size); example k of an epoch pairs
instance image k mod N_inst with class image k mod N_class, each with its own seed for every draw.

With ``dreambooth.prior_prompts`` (a .txt of prompts, or an imagefolder whose captions the base model was
trained on) the prior covers more than the class: class image i is generated for the class prompt when i
is even and for prior prompt ⌊i/2⌋ mod P when i is odd, and is trained on with the prompt that made it, so
the model keeps what it knew beyond the class (the "forgetting" a single class prompt does not prevent).

Class images are generated once into ``dreambooth.class_data`` (default ``<output_dir>/class_images``), an
imagefolder with ``metadata.jsonl`` and a manifest ``dreambooth.json`` of what made them (hashes of the
base pipeline's models, prompt, sampler settings, resolution, first seed). Image i always comes from seed
``class_seed + i``, so a later run (or a resume) reuses them and generates only missing ones; a folder made
for another prompt or model is refused. A folder of your own class images (no manifest) is used as is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ldm.config import UNetStageConfig
from ldm.data.cache import module_hash
from ldm.distributed import SingleProcess, main_decides
from ldm.data.images import IMAGE_SUFFIXES, ImageCaptionDataset, collate
from ldm.data.sampler import ResumableBatchSampler
from ldm.errors import UserError

logger = logging.getLogger(__name__)
MANIFEST = "dreambooth.json"


class DreamBoothError(UserError, ValueError):
    """DreamBooth's instance or class images are missing or do not fit; the message says what to fix."""


def dreambooth_loss(losses: torch.Tensor, prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """L = mean_{i: ¬prior_i} ℓ_i + λ · mean_{j: prior_j} ℓ_j  (Ruiz et al. 2023, eq. 2; λ = prior_loss_weight).

    losses: (B,) per-example diffusion losses; prior: (B,) bool, True for class (prior-preservation)
    examples. Without class examples L is the instance mean alone.
    """
    instance = losses[~prior].mean()
    if not bool(prior.any()):
        return instance
    return instance + prior_loss_weight * losses[prior].mean()


# --------------------------------------------------------------------------------------------
# Checks, before any work
# --------------------------------------------------------------------------------------------
def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def check_inputs(cfg: UNetStageConfig) -> None:
    """The instance folder exists and holds at least one image, and the class folder is neither it nor nested
    in it either way (no-op when DreamBooth is off)."""
    db = cfg.dreambooth
    if db.instance_data is None:
        return
    folder = Path(db.instance_data).expanduser()
    if not folder.is_dir():
        raise DreamBoothError(f"dreambooth.instance_data {folder} is not a folder; point it at the folder that "
                              f"holds the subject's images (3-5 are typical)")
    if not image_files(folder):
        raise DreamBoothError(f"dreambooth.instance_data {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                              f"; DreamBooth needs at least 1 image of the subject")
    if not db.prior_preservation:
        return
    if db.prior_prompts is not None:
        read_prior_prompts(db.prior_prompts)
    paths = {"class_data": class_folder(cfg).resolve(), "instance_data": folder.resolve()}
    if paths["class_data"] == paths["instance_data"]:
        raise DreamBoothError(f"dreambooth.class_data {class_folder(cfg)} is the instance folder; class images "
                              f"must live apart (leave class_data null for <output_dir>/class_images)")
    for inner, outer in (("class_data", "instance_data"), ("instance_data", "class_data")):
        if paths[inner].is_relative_to(paths[outer]):
            raise DreamBoothError(f"dreambooth.{inner} {paths[inner]} is inside dreambooth.{outer} {paths[outer]}: "
                                  f"folders are searched for images recursively, so instance and class images would "
                                  f"mix; keep the two folders apart (leave class_data null for "
                                  f"<output_dir>/class_images)")


def read_prior_prompts(source: str) -> list[str]:
    """The distinct prompts (first-seen order) of a .txt file (one per line) or an imagefolder's
    ``metadata.jsonl`` ("text" column)."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        prompts = [json.loads(line).get("text", "") for line in (path / "metadata.jsonl").read_text().splitlines()
                   if line.strip()]
    elif path.is_file():
        prompts = path.read_text(encoding="utf-8").splitlines()
    else:
        raise DreamBoothError(f"dreambooth.prior_prompts {path} is neither a file nor a folder with metadata.jsonl; "
                              f"give a .txt with one prompt per line, or the imagefolder the base model was trained on")
    prompts = list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))
    if not prompts:
        raise DreamBoothError(f"dreambooth.prior_prompts {path} holds no prompts (empty lines and captions are "
                              f"skipped)")
    return prompts


def class_prompts(class_prompt: str, prior: list[str] | None, start: int, stop: int) -> list[str]:
    """The prompt of class images ``start``..``stop-1``: the class prompt, or with prior prompts P_0..P_{n-1}
    the class prompt for even i and P_{⌊i/2⌋ mod n} for odd i."""
    if prior is None:
        return [class_prompt] * (stop - start)
    return [class_prompt if i % 2 == 0 else prior[(i // 2) % len(prior)] for i in range(start, stop)]


def class_folder(cfg: UNetStageConfig) -> Path:
    return Path(cfg.dreambooth.class_data or Path(cfg.output_dir) / "class_images").expanduser()


# --------------------------------------------------------------------------------------------
# Class images, generated once by the base pipeline
# --------------------------------------------------------------------------------------------
def class_manifest(cfg: UNetStageConfig, parts) -> dict:
    """What makes the class images: the base models' hashes, the prompt and every sampling setting."""
    db = cfg.dreambooth
    prior = {} if db.prior_prompts is None else {"prior_prompts": read_prior_prompts(db.prior_prompts)}
    return {"class_prompt": db.class_prompt, **prior, "base_model": str(cfg.pretrained),
            "resolution": cfg.data.resolution, "sampler": "dpm++", "steps": db.class_steps,
            "guidance_scale": db.class_guidance, "first_seed": db.class_seed,
            "models": {name: module_hash(getattr(parts, name)) for name in ("vae", "text_encoder", "unet")}}


def prepare_class_images(cfg: UNetStageConfig, parts, device, dist=None) -> Path | None:
    """The class-image folder, complete: reused, extended to ``num_class_images``, or generated.

    Call it on every process of ``dist`` (an ``Accelerator``; None = one process) before adapters are
    attached or weights change: the images must come from the base model. The main process checks,
    reuses or generates them and broadcasts the folder, or its error, so every process raises the same
    DreamBoothError and none waits at a barrier for ever.
    """

    db = cfg.dreambooth
    if db.instance_data is None or not db.prior_preservation:
        return None
    return Path(main_decides(dist or SingleProcess(), lambda: str(_prepare_class_images(cfg, parts, device))))


def _prepare_class_images(cfg: UNetStageConfig, parts, device) -> Path:
    db = cfg.dreambooth
    folder = class_folder(cfg)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists() and folder.is_dir() and image_files(folder):
        return _own_class_images(folder, db.num_class_images)
    manifest = class_manifest(cfg, parts)
    if manifest_path.exists():
        _check_manifest(json.loads(manifest_path.read_text()), manifest, folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    have = len(listed_images(folder))
    if have >= db.num_class_images:
        logger.info("DreamBooth: reusing %d class images for %r in %s", have, db.class_prompt, folder)
        return folder
    logger.info("DreamBooth: generating class images %d-%d of %d for %r with the base pipeline into %s",
                have, db.num_class_images - 1, db.num_class_images, db.class_prompt, folder)
    generate_class_images(cfg, parts, folder, have, db.num_class_images, device)
    return folder


def _own_class_images(folder: Path, needed: int) -> Path:
    found = len(image_files(folder))
    if found < needed:
        raise DreamBoothError(f"dreambooth.class_data {folder} holds {found} images of your own (no {MANIFEST}), "
                              f"fewer than dreambooth.num_class_images={needed}: add images, lower num_class_images, "
                              f"or point class_data at an empty folder to have them generated")
    logger.info("DreamBooth: using the class images in %s as they are (no %s: not generated here)", folder, MANIFEST)
    return folder


def _check_manifest(old: dict, new: dict, folder: Path) -> None:
    """Same prompts, settings and model weights (the base model's path may move: its hashes decide)."""
    keys = [*new, *(key for key in old if key not in new)]
    differ = [key for key in keys if key != "base_model" and old.get(key) != new.get(key)]
    if differ:
        models = [name for name in new["models"] if (old.get("models") or {}).get(name) != new["models"][name]]
        was = [f"{k}={old.get(k)!r}" for k in differ if k != "models"]
        if models:
            was.append(f"other {', '.join(models)} weights")
        raise DreamBoothError(f"the class images in {folder} were generated with other {', '.join(differ)} "
                              f"({'; '.join(was)}); delete the folder to regenerate them, or set "
                              f"dreambooth.class_data to another folder")


def listed_images(folder: Path) -> list[str]:
    """File names in ``folder/metadata.jsonl`` (an image counts once its line is written)."""
    path = folder / "metadata.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["file_name"] for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def generate_class_images(cfg: UNetStageConfig, parts, folder: Path, start: int, stop: int, device,
                          batch_size: int = 25) -> None:
    """Class images ``start``..``stop-1`` (prompts: ``class_prompts``); image i from its own generator seeded
    class_seed + i."""
    from ldm.models.unet import make_pipeline
    from ldm.sampling import make_scheduler

    db, size = cfg.dreambooth, cfg.data.resolution
    pipe = make_pipeline(parts, parts.unet, make_scheduler("dpm++", parts.scheduler.config)).to(device)
    prior = None if db.prior_prompts is None else read_prior_prompts(db.prior_prompts)  # read once
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as meta:
        for first in tqdm(range(start, stop, batch_size), desc="class images"):
            indices = range(first, min(first + batch_size, stop))
            generators = [torch.Generator().manual_seed(db.class_seed + i) for i in indices]
            prompts = class_prompts(db.class_prompt, prior, indices.start, indices.stop)
            one_prompt = prior is None  # one prompt, repeated: the batch of a single-prompt run
            images = pipe(prompts[0] if one_prompt else prompts, num_images_per_prompt=len(indices) if one_prompt
                          else 1, height=size, width=size, num_inference_steps=db.class_steps,
                          guidance_scale=db.class_guidance, generator=generators, output_type="np").images
            for i, image, prompt in zip(indices, images, prompts):
                name = f"{i:05d}.png"
                Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f".{name}.tmp", format="PNG")
                os.replace(folder / f".{name}.tmp", folder / name)
                meta.write(json.dumps({"file_name": name, "text": prompt, "seed": db.class_seed + i}) + "\n")
                meta.flush()


# --------------------------------------------------------------------------------------------
# Training data: instance + class examples in every batch
# --------------------------------------------------------------------------------------------
def class_example_seed(seed: int) -> int:
    """The class example's seed, its own stream derived from its instance partner's seed (63 bits)."""
    return int(np.random.SeedSequence([seed, 0xC1A55]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class DreamBoothPairs(Dataset):
    """Item ``(k, seed)``: instance image k mod N_inst with the instance prompt, and (with prior
    preservation) class image k mod N_class with the class prompt, or with its own caption (the prompt
    that generated it) when ``own_captions``."""

    def __init__(self, instances: ImageCaptionDataset, classes: ImageCaptionDataset | None, instance_prompt: str,
                 class_prompt: str, length: int, own_captions: bool = False):
        self.instances, self.classes, self.length = instances, classes, length
        self.instance_prompt, self.class_prompt, self.own_captions = instance_prompt, class_prompt, own_captions

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> tuple[dict, dict | None]:
        k, seed = key
        instance = self.instances[(k % len(self.instances), seed)] | {"caption": self.instance_prompt}
        if self.classes is None:
            return instance, None
        other = self.classes[(k % len(self.classes), class_example_seed(seed))]
        return instance, other if self.own_captions else other | {"caption": self.class_prompt}


def collate_pairs(items: list[tuple[dict, dict | None]]) -> dict:
    """One batch: the instance examples, then the class examples; ``prior`` marks the class ones."""
    instances, classes = [a for a, _ in items], [b for _, b in items if b is not None]
    batch = collate(instances + classes)
    batch["prior"] = torch.tensor([False] * len(instances) + [True] * len(classes))
    return batch


def training_batches(accelerator, cfg: UNetStageConfig, start: int):
    """An endless iterator of this process's DreamBooth batches from global batch ``start`` on, and its description."""
    db, train = cfg.dreambooth, cfg.train
    data = dataclasses.replace(cfg.data, path=str(db.instance_data), max_samples=None)
    instances = ImageCaptionDataset(data, need_captions=False)
    classes, own_captions = None, False
    if db.prior_preservation:
        folder = class_folder(cfg)
        own_captions = db.prior_prompts is not None and (folder / MANIFEST).exists()  # generated here, per prompt
        classes = ImageCaptionDataset(dataclasses.replace(data, path=str(folder), max_samples=db.num_class_images,
                                                          caption_column="text"), need_captions=own_captions)
    length = max(len(instances), len(classes or ()), train.batch_size * accelerator.num_processes)
    pairs = DreamBoothPairs(instances, classes, db.instance_prompt, db.class_prompt, length, own_captions)
    sampler = ResumableBatchSampler([list(range(length))], train.batch_size, train.seed, accelerator.process_index,
                                    accelerator.num_processes, start=start)
    loader = DataLoader(pairs, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=cfg.data.num_workers)
    source = (f"DreamBooth: {len(instances)} instance image(s) as {db.instance_prompt!r}" +
              (f" + {len(classes)} class images as {db.class_prompt!r}" +
               (f" and {db.prior_prompts}'s prompts" if own_captions else "") +
               f" (prior_loss_weight {db.prior_loss_weight:g})"
               if classes is not None else ", no prior preservation") + ", encoded every step")
    return iter(loader), source
