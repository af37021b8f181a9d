"""Latent + text-embedding cache for stage 2: encode the dataset once, train many times.

For every example the cache stores the VAE posterior moments (mean, log-variance) of the
centre-cropped image — and of its mirror image when ``data.random_flip`` is on — and the text
encoder's hidden states of its caption, in safetensors shards, one folder per aspect bucket:

    <cache>/manifest.json                      fingerprint, buckets, shard list (written last)
    <cache>/bucket-<H>x<W>/shard-00000.safetensors   index (N,), mean/logvar (N, C, h, w),
                                                     [mean_flip/logvar_flip], text (N, L, D)
    <cache>/empty.safetensors                  the empty prompt's hidden states (caption dropout)

Training draws z = mean + exp(logvar / 2) * ε from the cached moments with each example's own
noise (EDM2 style), and picks the flipped moments exactly when the uncached path would flip
the image, so the cache changes speed, not results. The manifest's fingerprint names what made
the cache (VAE and text-encoder hashes, dtype, resolution, crop/flip policy, dataset); any
change rebuilds it. A random crop cannot be cached (every epoch sees another window).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_folder
from ldm.data.images import ImageCaptionDataset, collate, flip_decision

logger = logging.getLogger(__name__)
SHARD_SIZE = 4096
CACHE_VERSION = 1


def module_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's class, config and every tensor of its state dict (in key order)."""
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(dataset: ImageCaptionDataset, vae_hash: str, text_hash: str, dtype: torch.dtype) -> dict:
    """Everything that determines the cache's contents."""
    data = dataset.data
    if data.crop == "random":
        raise ValueError("data.crop=random cannot use the latent cache (each epoch sees a different window); "
                         "set data.crop=center or cache.enabled=false")
    records_id = getattr(dataset.records, "_fingerprint", None) or str(len(dataset.records))
    valid = hashlib.sha256(",".join(map(str, dataset.valid)).encode()).hexdigest()
    return {"version": CACHE_VERSION, "vae": vae_hash, "text_encoder": text_hash, "dtype": str(dtype),
            "resolution": data.resolution, "buckets": [list(b) for b in data.buckets], "crop": data.crop,
            "flip": data.random_flip, "dataset": {"path": data.path, "split": data.split, "records": records_id,
                                                  "valid": valid, "image_column": data.image_column,
                                                  "caption_column": data.caption_column}}


def is_current(folder: Path, expected: dict) -> bool:
    manifest = folder / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text())["fingerprint"] == expected


def build_cache(folder: str | Path, dataset: ImageCaptionDataset, fp: dict,
                encode_images: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                encode_texts: Callable[[list[str]], torch.Tensor], batch_size: int = 64,
                dtype: torch.dtype = torch.float32) -> Path:
    """Encode ``dataset`` into ``folder`` (atomically) unless a cache with fingerprint ``fp`` is there."""
    folder = Path(folder)
    if is_current(folder, fp):
        logger.info("latent cache %s is current", folder)
        return folder
    if (folder / "manifest.json").exists():
        logger.info("latent cache %s was made by other models or data: rebuilding", folder)
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):  # rebuilding replaces the folder
        raise FileExistsError(f"cache folder {folder} exists and is not a latent cache (no manifest.json); set "
                              f"cache.dir to a new or empty folder (nothing in {folder} was changed)")
    with atomic_folder(folder) as tmp:
        shards = []
        for group in dataset.groups():
            h, w = dataset.target_size(group[0])
            for start in range(0, len(group), SHARD_SIZE):
                name = f"bucket-{h}x{w}/shard-{start // SHARD_SIZE:05d}.safetensors"
                part = _encode_group(dataset, group[start:start + SHARD_SIZE], encode_images, encode_texts,
                                     batch_size, dtype)
                (tmp / name).parent.mkdir(exist_ok=True)
                save_file(part, str(tmp / name))
                shards.append(name)
        save_file({"text": encode_texts([""])[0].to(dtype).contiguous()}, str(tmp / "empty.safetensors"))
        (tmp / "manifest.json").write_text(json.dumps({"fingerprint": fp, "shards": shards}, indent=1))
    logger.info("latent cache written to %s (%d examples)", folder, len(dataset))
    return folder


@torch.no_grad()
def _encode_group(dataset, positions, encode_images, encode_texts, batch_size, dtype) -> dict:
    out: dict[str, list[torch.Tensor]] = {"index": [], "mean": [], "logvar": [], "text": []}
    if dataset.data.random_flip:
        out |= {"mean_flip": [], "logvar_flip": []}
    for start in tqdm(range(0, len(positions), batch_size), desc="caching latents", leave=False):
        items = [_unflipped(dataset, p) for p in positions[start:start + batch_size]]
        batch = collate(items)
        pixels = batch["pixel_values"]
        encoded = {"": encode_images(pixels)}
        if dataset.data.random_flip:
            encoded["_flip"] = encode_images(pixels.flip(-1))
        text = encode_texts(batch["caption"])
        for suffix, (mean, logvar) in encoded.items():
            out["mean" + suffix].append(mean.to(dtype))
            out["logvar" + suffix].append(logvar.to(dtype))
        out["text"].append(text.to(dtype))
        out["index"].append(batch["index"])
        _refuse_non_finite(dataset, batch["index"], [text, *[t for pair in encoded.values() for t in pair]])
    return {k: torch.cat(v).contiguous() for k, v in out.items()}


def _unflipped(dataset: ImageCaptionDataset, pos: int) -> dict:
    """The example as the cache stores it: centre crop, never flipped (the flip is stored apart)."""
    return dataset.load(pos, seed=0, flip=False)


def _refuse_non_finite(dataset, index: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    bad = torch.zeros(len(index), dtype=torch.bool)
    for t in tensors:
        bad |= ~torch.isfinite(t.flatten(1).float()).all(1).cpu()
    if bad.any():
        names = [dataset.name(int(i)) for i in index[bad]]
        raise ValueError(f"non-finite latents or text embeddings for {names}; the VAE or text encoder produces "
                         f"NaN/Inf on them (check the VAE checkpoint, its dtype — use fp32 — and those images)")


class CachedLatentDataset(Dataset):
    """Items keyed like ``ImageCaptionDataset``: ``(position, example_seed)`` -> cached tensors."""

    def __init__(self, folder: str | Path, dataset: ImageCaptionDataset):
        self.folder, self.flip = Path(folder), dataset.data.random_flip
        manifest = json.loads((self.folder / "manifest.json").read_text())
        self.rows: dict[int, tuple[dict, int]] = {}
        for name in manifest["shards"]:
            shard = load_file(str(self.folder / name))
            for row, pos in enumerate(shard["index"].tolist()):
                self.rows[pos] = (shard, row)
        self.empty_text = load_file(str(self.folder / "empty.safetensors"))["text"]
        if len(self.rows) != len(dataset):
            raise ValueError(f"cache {folder} holds {len(self.rows)} examples, the dataset {len(dataset)}; rebuild it")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        pos, seed = key
        shard, row = self.rows[pos]
        suffix = "_flip" if self.flip and flip_decision(seed) else ""
        return {"mean": shard["mean" + suffix][row], "logvar": shard["logvar" + suffix][row],
                "text": shard["text"][row], "index": pos, "seed": seed}


def collate_cached(items: list[dict]) -> dict:
    batch = {k: torch.stack([it[k] for it in items]) for k in ("mean", "logvar", "text")}
    batch["index"] = torch.tensor([it["index"] for it in items])
    batch["seed"] = torch.tensor([it["seed"] for it in items], dtype=torch.int64)
    return batch
