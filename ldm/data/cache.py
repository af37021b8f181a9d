"""Latent + text-embedding cache for stage 2: encode the dataset once, on every process, train many times.

For every example the cache stores the VAE posterior moments (mean, log-variance) of the
centre-cropped image — and of its mirror image when ``data.random_flip`` is on — and the text
encoder's hidden states of its caption, in safetensors shards, one folder per aspect bucket:

    <cache>/manifest.json                      fingerprint, dtype, every shard's size and sha256 (written last)
    <cache>/bucket-<H>x<W>/shard-00000.safetensors   index (N,), mean/logvar (N, C, h, w),
                                                     [mean_flip/logvar_flip], text (N, L, D)
    <cache>/empty.safetensors                  the empty prompt's hidden states (caption dropout)

Building (``build_cache``): the shards are a pure function of the dataset and ``cache.shard_size``
(``plan_shards``); process ``r`` of ``W`` encodes shards ``r, r + W, r + 2W, …`` into a staging folder
``.tmp-<cache>`` beside the cache, each shard written atomically with a record of its size and hash. After
a barrier the main process writes ``empty.safetensors`` and the manifest, and renames the staging folder
into place: the cache appears complete or not at all, and is the same, byte for byte, whatever the number
of processes. A killed build keeps its finished shards; the next build with the same plan continues.

Reading (``ldm.data.cached.CachedLatentDataset``) takes rows straight from the shard files, so memory
does not grow with the dataset. Training draws z = mean + exp(logvar / 2) * ε from the cached moments
with each example's own noise (EDM2 style), and picks the flipped moments exactly when the uncached path
would flip the image, so the cache changes speed, not results. The fingerprint names what made the cache
(VAE and text-encoder hashes, storage dtype, resolution, crop/flip policy, dataset); any change rebuilds
it, and so does a damaged cache (a shard missing or of the wrong size). A random crop cannot be cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.checkpoint import _fsync_tree, _replace_folder, restore_interrupted_replace
from ldm.data.cached import CachedLatentDataset, check_cache, collate_cached, read_manifest  # noqa: F401
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.shards import DamagedCacheError, save_shard

logger = logging.getLogger(__name__)
SHARD_SIZE = 1024
CACHE_VERSION = 2
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """Everything that determines the cache's contents (``dtype``: the storage dtype of moments and text)."""
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


def plan_shards(dataset: ImageCaptionDataset, shard_size: int = SHARD_SIZE) -> list[tuple[str, list[int]]]:
    """Every shard's name and example positions: runs of ``shard_size`` positions within each bucket.

    A pure function of the dataset, so every process (on every machine) computes the same plan, and the
    plan does not depend on how many processes build it.
    """
    plan = []
    for group in dataset.groups():
        h, w = dataset.target_size(group[0])
        for start in range(0, len(group), shard_size):
            plan.append((f"bucket-{h}x{w}/shard-{start // shard_size:05d}.safetensors", group[start:start + shard_size]))
    return plan


class SingleProcess:
    """The ``dist`` of a one-process build (an ``Accelerator`` or ``PartialState`` has the same four names)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def cache_status(folder: Path, fp: dict) -> str:
    """``current`` (complete, fingerprint ``fp``), ``stale`` (other fingerprint), ``damaged`` or ``absent``.

    Raises FileExistsError for a non-empty folder without a manifest: it is not a cache, and never replaced.
    """
    if not (folder / "manifest.json").exists():
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise FileExistsError(f"cache folder {folder} exists and is not a latent cache (no manifest.json); set "
                                  f"cache.dir to a new or empty folder (nothing in {folder} was changed)")
        return "absent"
    try:
        manifest = read_manifest(folder)
    except DamagedCacheError:
        return "damaged"
    if manifest.get("fingerprint") != fp:
        return "stale"
    return "damaged" if check_cache(folder, manifest) else "current"


def main_decides(dist, decide: Callable[[], str]) -> str:
    """``decide()`` on the main process, its answer (or its error) on every process of ``dist``.

    One process reads the cache's state, not every process of every machine, and all of them act
    on the same answer (caches of a shared filesystem may differ between machines for a moment).
    Without an initialised process group (a one-process ``dist``) every process decides alone.
    """
    if dist.num_processes == 1 or not torch.distributed.is_initialized():
        return decide()
    answer: list = [None]
    if dist.is_main_process:
        try:
            answer = [("ok", decide())]
        except Exception as err:  # raised on every process, so none waits at a barrier for ever
            answer = [("error", err)]
    torch.distributed.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise value
    return value


def is_current(folder: Path, expected: dict) -> bool:
    return cache_status(Path(folder), expected) == "current"


def build_cache(folder: str | Path, dataset: ImageCaptionDataset, fp: dict,
                encode_images: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                encode_texts: Callable[[list[str]], torch.Tensor], batch_size: int = 64,
                dtype: torch.dtype = torch.float32, shard_size: int = SHARD_SIZE, dist=None) -> Path:
    """Encode ``dataset`` into ``folder`` unless a complete cache with fingerprint ``fp`` is there.

    Call it on every process of ``dist`` (an ``Accelerator``/``PartialState``; None = one process), each
    with its own encoders: process r encodes shards r, r + W, … of ``plan_shards``; the main process writes
    the manifest last and moves the finished cache into place. ``folder`` must be on a filesystem that
    every process sees.
    """
    dist, folder = dist or SingleProcess(), Path(folder)
    status = main_decides(dist, lambda: cache_status(folder, fp))  # one answer for all, before any change
    if status == "current":
        logger.info("latent cache %s is current", folder)
        return folder
    dist.wait_for_everyone()
    plan = plan_shards(dataset, shard_size)
    staging = folder.parent / f".tmp-{folder.name}"
    if dist.is_main_process:
        logger.log(logging.WARNING if status == "damaged" else logging.INFO, "latent cache %s %s: %s it "
                   "(%d examples, %d shards, %d process(es))", folder, REASONS[status],
                   "building" if status == "absent" else "rebuilding", len(dataset), len(plan), dist.num_processes)
        open_staging(staging, {"fingerprint": fp, "shards": [name for name, _ in plan], "shard_size": shard_size,
                               "batch_size": batch_size})
    dist.wait_for_everyone()
    mine = plan[dist.process_index::dist.num_processes]
    for name, positions in tqdm(mine, desc="caching latents", disable=not dist.is_main_process):
        if not shard_done(staging, name):
            part = _encode_group(dataset, positions, encode_images, encode_texts, batch_size, dtype)
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            record = save_shard(staging / name, part) | {"examples": len(positions)}
            _write_json(staging / f"{name}.json", record)  # after the shard: it marks the shard finished
    dist.wait_for_everyone()
    if dist.is_main_process:
        commit_cache(staging, folder, fp, plan, encode_texts, dtype)
        logger.info("latent cache written to %s (%d examples)", folder, len(dataset))
    dist.wait_for_everyone()
    return folder


REASONS = {"absent": "does not exist yet", "stale": "was made by other models or data",
           "damaged": "is damaged (a shard is missing, truncated or unreadable)"}


def open_staging(staging: Path, spec: dict) -> None:
    """Keep the finished shards of an interrupted build with the same ``spec``; otherwise start afresh."""
    marker = staging / "build.json"
    if marker.exists() and marker.read_text() == json.dumps(spec, sort_keys=True):
        done = sum(shard_done(staging, name) for name in spec["shards"])
        logger.info("continuing the interrupted cache build in %s: %d of %d shards done", staging, done,
                    len(spec["shards"]))
        return
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write_json(marker, spec)


def shard_done(staging: Path, name: str) -> bool:
    """The shard's record exists (written after the shard) and its size matches the file's."""
    record = staging / f"{name}.json"
    try:
        return json.loads(record.read_text())["bytes"] == (staging / name).stat().st_size
    except (OSError, ValueError, KeyError):
        return False


def commit_cache(staging: Path, folder: Path, fp: dict, plan, encode_texts, dtype: torch.dtype) -> None:
    """Main process, after every shard is written: empty prompt, manifest (last), rename into place."""
    shards = []
    for name, positions in plan:
        if not shard_done(staging, name):
            raise DamagedCacheError(f"cache shard {name} was not written to {staging}; every process must see the "
                                    f"same cache.dir (a filesystem shared by all machines) — is it node-local?")
        record = json.loads((staging / f"{name}.json").read_text())
        shards.append({"name": name, **record})
    empty = save_shard(staging / "empty.safetensors", {"text": encode_texts([""])[0].to("cpu", dtype)})
    for path in [staging / "build.json", *(staging / f"{name}.json" for name, _ in plan)]:
        path.unlink()
    manifest = {"fingerprint": fp, "dtype": str(dtype).removeprefix("torch."),
                "examples": sum(len(p) for _, p in plan), "shards": shards, "empty": empty}
    _write_json(staging / "manifest.json", manifest)
    _fsync_tree(staging)
    restore_interrupted_replace(folder)
    _replace_folder(staging, folder)


def _write_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def _encode_group(dataset, positions, encode_images, encode_texts, batch_size, dtype) -> dict:
    out: dict[str, list[torch.Tensor]] = {"index": [], "mean": [], "logvar": [], "text": []}
    if dataset.data.random_flip:
        out |= {"mean_flip": [], "logvar_flip": []}
    for start in range(0, len(positions), batch_size):
        items = [_unflipped(dataset, p) for p in positions[start:start + batch_size]]
        batch = collate(items)
        pixels = batch["pixel_values"]
        encoded = {"": encode_images(pixels)}
        if dataset.data.random_flip:
            encoded["_flip"] = encode_images(pixels.flip(-1))
        stored = [encode_texts(batch["caption"]).to("cpu", dtype)]  # in the storage dtype: fp16 may overflow
        for suffix, (mean, logvar) in encoded.items():
            out["mean" + suffix].append(mean.to("cpu", dtype))
            out["logvar" + suffix].append(logvar.to("cpu", dtype))
            stored += out["mean" + suffix][-1:] + out["logvar" + suffix][-1:]
        out["text"].append(stored[0])
        out["index"].append(batch["index"])
        _refuse_non_finite(dataset, batch["index"], stored)
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


