"""Latent + text-embedding cache for stage 2: encode the dataset once, on every process, train many times.

For every example the cache stores the VAE posterior moments (mean, log-variance) of the
centre-cropped image — and of its mirror image when ``data.random_flip`` is on — and the text
encoder's hidden states of its caption, in safetensors shards, one folder per aspect bucket:

    <cache>/manifest.json                      fingerprint, dtype, every shard's size and sha256, the image
                                               check (records checked, skipped names) (written last)
    <cache>/bucket-<H>x<W>/shard-00000.safetensors   index (N,), mean/logvar (N, C, h, w),
                                                     [mean_flip/logvar_flip], text (N, L, D)
    <cache>/empty.safetensors                  the empty prompt's hidden states (caption dropout)
    <cache>/images.safetensors                 the image check: valid (N,) record indices, sizes (N, 2)

Building (``build_cache``): first every image is decoded once (``ldm.data.images.validate_images``), each
process checking its share (runs of ``cache.shard_size`` records, process ``r`` of ``W`` taking runs ``r,
r + W, …``); the results are gathered on every process. The shards are a pure function of the checked
dataset and ``cache.shard_size`` (``plan_shards``); process ``r`` encodes shards ``r, r + W, r + 2W, …`` into
a staging folder ``.tmp-<cache>`` beside the cache, each shard written atomically with a record of its size
and hash. Then the main process writes ``empty.safetensors``, ``images.safetensors`` and the manifest, and
renames the staging folder into place: the cache appears complete or not at all, and is the same, byte for
byte, whatever the number of processes. A killed build keeps its finished shards, whenever it is killed
(during the commit the manifest holds every shard's record); the next build with the same plan continues.
The main process holds an exclusive lock (``.<cache>.lock`` beside the cache, removed when the build ends)
for the whole build: a second job that would build the same folder at the same time is refused with a
message. Every step after which processes wait for each other exchanges each process's outcome, so an error
on one process is raised on all of them (none waits at a barrier for ever).

A run whose fingerprint matches a cache opens no image: the fingerprint names the data's records (whose
``datasets`` fingerprint follows every data file's modification time), and the image check it needs (which
examples are readable, and their sizes for the aspect buckets) is the one recorded in the cache.

Reading (``ldm.data.cached.CachedLatentDataset``) takes rows straight from the shard files, so memory
does not grow with the dataset. Training draws z = mean + exp(logvar / 2) * ε from the cached moments
with each example's own noise (EDM2 style), and picks the flipped moments exactly when the uncached path
would flip the image, so the cache changes speed, not results. The fingerprint names what made the cache
(VAE and text-encoder hashes, storage dtype, resolution, crop/flip policy, dataset); any change rebuilds
it, and so does a damaged cache (a shard missing or of the wrong size). A folder that is not recognisably
a cache (no manifest, or a ``manifest.json`` that is not a cache's) is refused, never replaced. A random
crop cannot be cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.checkpoint import fsync_tree, replace_folder, restore_interrupted_replace
from ldm.data.cache_lock import CacheInUseError, lock_build, unlock_build  # noqa: F401
from ldm.data.cached import CachedLatentDataset, check_cache, collate_cached, read_manifest  # noqa: F401
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.shards import DamagedCacheError, load_shard, save_shard, write_json
from ldm.distributed import SingleProcess, everyone_does, main_decides

logger = logging.getLogger(__name__)
SHARD_SIZE = 1024
IMAGES = "images.safetensors"  # the image check: valid record indices and their sizes
CACHE_VERSION = 3  # 3: the image check is recorded in the cache (images.safetensors), not in the fingerprint
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_WAIT_S = (0.125, 0.25, 0.5, 1.0)  # before a shard of another process counts as missing (NFS caches stat)


def module_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's class, config and every tensor of its state dict (in key order).

    The config's ``_name_or_path`` (the folder ``from_pretrained`` read) is left out: a moved or
    copied folder with the same weights hashes the same.
    """
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        as_dict.pop("_name_or_path", None)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(dataset: ImageCaptionDataset, vae_hash: str, text_hash: str, dtype: torch.dtype) -> dict:
    """Everything that determines the cache's contents (``dtype``: the storage dtype of moments and text).

    Computed without opening an image: the records' ``datasets`` fingerprint names the data files (and
    their modification times), so the image check's result is a function of it (``build_cache``)."""
    data = dataset.data
    if data.crop == "random":
        raise ValueError("data.crop=random cannot use the latent cache (each epoch sees a different window); "
                         "set data.crop=center or cache.enabled=false")
    records_id = getattr(dataset.records, "_fingerprint", None) or str(len(dataset.records))
    return {"version": CACHE_VERSION, "vae": vae_hash, "text_encoder": text_hash, "dtype": str(dtype),
            "resolution": data.resolution, "buckets": [list(b) for b in data.buckets], "crop": data.crop,
            "flip": data.random_flip, "dataset": {"path": data.path, "split": data.split, "records": records_id,
                                                  "examples": len(dataset.records), "image_column": data.image_column,
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


def cache_status(folder: Path, fp: dict) -> str:
    """``current`` (complete, fingerprint ``fp``), ``stale`` (other fingerprint), ``damaged`` or ``absent``.

    Raises FileExistsError for a non-empty folder that is not recognisably a cache (``_is_ours``): it is
    never replaced. ``damaged`` (rebuilt) only for a cache: an unreadable manifest counts as one only when
    the folder holds nothing but a cache's entries.
    """
    if not (folder / "manifest.json").exists():
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise FileExistsError(f"cache folder {folder} exists and is not a latent cache (no manifest.json); set "
                                  f"cache.dir to a new or empty folder (nothing in {folder} was changed)")
        return "absent"
    if not _is_ours(folder):
        raise FileExistsError(f"cache folder {folder} has a manifest.json that is not a latent cache's; set "
                              f"cache.dir to a new or empty folder (nothing in {folder} was changed)")
    try:
        manifest = read_manifest(folder)
    except DamagedCacheError:
        return "damaged"
    if manifest.get("fingerprint") != fp:
        return "stale"
    return "damaged" if check_cache(folder, manifest) else "current"


def _is_ours(folder: Path) -> bool:
    """The folder with a ``manifest.json`` is one of our caches: the manifest is a cache's (a fingerprint
    with its ``version``, or a fingerprint, shard list, example count and dtype), or — unreadable, e.g.
    truncated — the folder holds nothing but a cache's entries."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if isinstance(manifest, dict) and isinstance(manifest.get("fingerprint"), dict):
            return "version" in manifest["fingerprint"] or {"shards", "examples", "dtype"} <= manifest.keys()
    except (OSError, ValueError):
        pass
    entries = list(folder.iterdir())
    return all(p.name in ("manifest.json", "empty.safetensors", IMAGES) or
               (p.name.startswith("bucket-") and p.is_dir()) for p in entries) and len(entries) > 1


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
    every process sees. Raises CacheInUseError while another job builds the same ``folder``.

    ``dataset`` may come unchecked (``ImageCaptionDataset(..., check=False)``): a current cache gives it the
    image check it recorded (no image is opened), else every process checks its share of the images.
    """
    dist, folder = dist or SingleProcess(), Path(folder)
    status = main_decides(dist, lambda: cache_status(folder, fp))  # one answer for all, before any change
    if status == "current":
        adopt_image_check(folder, dataset, dist)
        logger.info("latent cache %s is current", folder)
        return folder
    if not dataset.checked:
        dataset.check(dist, shard_size)
    plan = plan_shards(dataset, shard_size)
    staging = folder.parent / f".tmp-{folder.name}"
    spec = {"fingerprint": fp, "shards": [name for name, _ in plan], "shard_size": shard_size,
            "batch_size": batch_size}
    lock = None

    def prepare() -> str:  # main process: lock, look again (another job may just have finished), staging
        nonlocal lock
        lock = lock_build(folder)
        now = cache_status(folder, fp)
        if now != "current":
            logger.log(logging.WARNING if now == "damaged" else logging.INFO, "latent cache %s %s: %s it (%d "
                       "examples, %d shards, %d process(es))", folder, REASONS[now], "building" if now == "absent"
                       else "rebuilding", len(dataset), len(plan), dist.num_processes)
            open_staging(staging, spec)
        return now

    def encode_mine() -> None:
        mine = plan[dist.process_index::dist.num_processes]
        for name, positions in tqdm(mine, desc="caching latents", disable=not dist.is_main_process):
            if not shard_done(staging, name):
                part = _encode_group(dataset, positions, encode_images, encode_texts, batch_size, dtype)
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                record = save_shard(staging / name, part) | {"examples": len(positions)}
                write_json(staging / f"{name}.json", record)  # after the shard: it marks the shard finished

    try:
        if main_decides(dist, prepare) == "current":
            logger.info("latent cache %s is current (built by another job meanwhile)", folder)
            return folder
        everyone_does(dist, encode_mine)
        main_decides(dist, lambda: commit_cache(staging, folder, spec, dataset, encode_texts, dtype))
    finally:
        unlock_build(folder, lock)
    if dist.is_main_process:
        logger.info("latent cache written to %s (%d examples)", folder, len(dataset))
    return folder


def latent_cache(dist, cache, output_dir: str | Path, dataset: ImageCaptionDataset, parts) -> Path:
    """The cache folder for the ``cache.*`` section (``cache.dir``, else ``<output_dir>/cache``): reused when its
    fingerprint matches (``dataset`` then takes the image check the cache recorded), else built by every process
    of ``dist`` (each checks and encodes its share of the shards, ``build_cache``) with the frozen encoders of
    ``parts`` (its vae, text_encoder and tokenizer)."""
    from ldm.models.text import encode_prompts
    from ldm.models.vae import posterior_moments

    vae, text_encoder, tokenizer = parts.vae, parts.text_encoder, parts.tokenizer
    dtype = STORAGE_DTYPES[cache.dtype]
    fp = fingerprint(dataset, module_hash(vae), module_hash(text_encoder), dtype)
    return build_cache(Path(cache.dir or Path(output_dir) / "cache"), dataset, fp,
                       encode_images=lambda x: posterior_moments(vae, x),
                       encode_texts=lambda texts: encode_prompts(text_encoder, tokenizer, texts), dtype=dtype,
                       shard_size=cache.shard_size, dist=dist)


REASONS = {"absent": "does not exist yet", "stale": "was made by other models or data",
           "damaged": "is damaged (a shard is missing, truncated or unreadable)"}


def open_staging(staging: Path, spec: dict) -> None:
    """Keep the finished shards of an interrupted build with the same ``spec`` (and delete the temporary
    files of writes it was killed in); otherwise start afresh."""
    marker = staging / "build.json"
    reopen_commit(staging, spec)
    if marker.exists() and marker.read_text() == json.dumps(spec, sort_keys=True):
        for leftover in staging.rglob(".*.tmp-*"):  # ``write_atomic``'s names: never renamed into place
            leftover.unlink()
        done = sum(shard_done(staging, name) for name in spec["shards"])
        logger.info("continuing the interrupted cache build in %s: %d of %d shards done", staging, done,
                    len(spec["shards"]))
        return
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_json(marker, spec)


def shard_done(staging: Path, name: str) -> bool:
    """The shard's record exists (written after the shard) and its size matches the file's."""
    record = staging / f"{name}.json"
    try:
        return json.loads(record.read_text())["bytes"] == (staging / name).stat().st_size
    except (OSError, ValueError, KeyError):
        return False


def commit_cache(staging: Path, folder: Path, spec: dict, dataset: ImageCaptionDataset, encode_texts,
                 dtype: torch.dtype) -> None:
    """Main process, after every shard is written: empty prompt, image check, manifest (with every shard's
    record and the build's spec), fsync; then drop the build's records and ``build.json``, and rename into
    place. A kill at any step before the rename leaves a staging folder that the next build continues
    without encoding anything again: before the manifest by the records, after it by the manifest
    (``reopen_commit``)."""
    names = spec["shards"]
    missing = _missing_shards(staging, names)
    if missing:
        raise DamagedCacheError(f"cache shard(s) {', '.join(missing[:3])} were not written to {staging}; every "
                                f"process must see the same cache.dir (a filesystem shared by all machines) — "
                                f"is it node-local?")
    shards = [{"name": name, **json.loads((staging / f"{name}.json").read_text())} for name in names]
    empty = save_shard(staging / "empty.safetensors", {"text": encode_texts([""])[0].to("cpu", dtype)})
    images = save_shard(staging / IMAGES, {"valid": torch.tensor(dataset.valid, dtype=torch.int64),
                                           "sizes": torch.tensor(dataset.sizes, dtype=torch.int64).view(-1, 2)})
    images |= {"checked": len(dataset.records), "readable": len(dataset.valid), "skipped": dataset.skipped}
    manifest = {"fingerprint": spec["fingerprint"], "dtype": str(dtype).removeprefix("torch."),
                "examples": len(dataset), "shards": shards, "empty": empty, "images": images,
                "build": {k: v for k, v in spec.items() if k not in ("fingerprint", "shards")}}
    write_json(staging / "manifest.json", manifest)
    fsync_tree(staging)
    for name in names:  # from here on a kill leaves the manifest, which holds these records
        (staging / f"{name}.json").unlink()
    (staging / "build.json").unlink()
    fsync_tree(staging, files=False)  # the deletes (the files were synced above)
    restore_interrupted_replace(folder)
    replace_folder(staging, folder)


def reopen_commit(staging: Path, spec: dict) -> None:
    """A build with the same ``spec`` killed in ``commit_cache`` after its manifest was written (its shard
    records or ``build.json`` perhaps deleted): write them back from the manifest, then delete the manifest,
    so the build goes on as one killed before its commit, with every shard finished."""
    try:
        manifest = json.loads((staging / "manifest.json").read_text())
        made_by = {"fingerprint": manifest["fingerprint"], "shards": [r["name"] for r in manifest["shards"]],
                   **manifest["build"]}
    except (OSError, ValueError, KeyError, TypeError):
        return
    if json.dumps(made_by, sort_keys=True) != json.dumps(spec, sort_keys=True):
        return
    for record in manifest["shards"]:
        if not shard_done(staging, record["name"]):
            write_json(staging / f"{record['name']}.json", {k: v for k, v in record.items() if k != "name"})
    write_json(staging / "build.json", spec)
    (staging / "manifest.json").unlink()


def adopt_image_check(folder: Path, dataset: ImageCaptionDataset, dist) -> None:
    """Give ``dataset`` the image check recorded in the current cache ``folder`` (unless it has its own)."""
    if dataset.checked:
        return
    manifest, check = read_manifest(folder), load_shard(folder / IMAGES)
    dataset.adopt(check["valid"].tolist(), check["sizes"].tolist(), manifest["images"]["skipped"])
    if dataset.skipped and dist.is_main_process:
        logger.warning("the latent cache %s leaves out %d corrupt or unreadable image(s) (found when it was built): "
                       "%s", folder, len(dataset.skipped), ", ".join(dataset.skipped[:20]) +
                       (" ..." if len(dataset.skipped) > 20 else ""))


def _missing_shards(staging: Path, names: list[str]) -> list[str]:
    """The shards without a finished record, looked for again after short waits (a shared filesystem such as
    NFS may show another machine's new files a moment late)."""
    missing = [name for name in names if not shard_done(staging, name)]
    for wait in SHARD_WAIT_S:
        if not missing:
            break
        time.sleep(wait)
        missing = [name for name in missing if not shard_done(staging, name)]
    return missing


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


