"""The latent cache at scale: built by several processes, read from disk, damage detected, shared by runs.

"Identical" means: the cache folders are equal file by file, byte by byte (so every stored tensor of
every example index is equal bit for bit).
"""

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoint import load_state_dict
from ldm.cli import main as cli
from ldm.config import UNetStageConfig, load_config
import ldm.data.cache as cache_module
from ldm.data.cache import (CacheInUseError, build_cache, cache_status, fingerprint, latent_cache, module_hash,
                            plan_shards)
from ldm.data.cached import CachedLatentDataset, check_cache, read_manifest
import ldm.data.images as images_module
from ldm.data.images import ImageCaptionDataset, image_name
from ldm.data.shards import DamagedCacheError
from ldm.models.text import encode_prompts
from ldm.models.unet import load_components
from ldm.models.vae import posterior_moments
from test_unet_stage import logged
from train import unet as stage2

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _cfg(overrides, *extra):
    return load_config(UNetStageConfig, None, list(overrides) + list(extra))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _build(cfg, folder, dtype=torch.float32, shard_size=10, encode_images=None):
    parts = load_components(cfg)
    dataset = ImageCaptionDataset(cfg.data)
    fp = fingerprint(dataset, module_hash(parts.vae), module_hash(parts.text_encoder), dtype)
    build_cache(folder, dataset, fp, encode_images or (lambda x: posterior_moments(parts.vae, x)),
                lambda t: encode_prompts(parts.text_encoder, parts.tokenizer, t), dtype=dtype, shard_size=shard_size)
    return dataset, fp


def test_disk_reads_equal_in_memory_reads_and_a_run_logs_the_same_losses(unet_overrides, tmp_path):
    overrides = [*unet_overrides, "data.random_flip=true", f"cache.dir={tmp_path / 'cache'}", "cache.shard_size=7"]
    a = stage2.main(_cfg(overrides, f"output_dir={tmp_path / 'disk'}", "data.num_workers=1"))  # builds the cache;
    # rows read from disk in a forked DataLoader worker
    b = stage2.main(_cfg(overrides, f"output_dir={tmp_path / 'ram'}", "cache.in_memory=true"))  # reuses it
    assert logged(tmp_path / "disk") == logged(tmp_path / "ram") and len(logged(tmp_path / "disk")) == 4
    wa, wb = (load_state_dict(p.parent / "checkpoint-4" / "model-unet.safetensors") for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    manifest = read_manifest(tmp_path / "cache")
    assert len(manifest["shards"]) == 7 and manifest["examples"] == 48  # 48 examples in shards of 7
    disk = CachedLatentDataset(tmp_path / "cache")
    ram = CachedLatentDataset(tmp_path / "cache", in_memory=True)
    assert disk.loaded is None and len(disk) == 48
    for pos in range(48):
        for seed in (0, 1, 2, 5):  # both flips
            x, y = disk[(pos, seed)], ram[(pos, seed)]
            assert x["index"] == pos and all(torch.equal(x[k], y[k]) for k in ("mean", "logvar", "text"))


def test_storage_dtype_is_in_the_fingerprint_and_fp16_trains(unet_overrides, tmp_path):
    run = stage2.main(_cfg(unet_overrides, "cache.dtype=float16"))
    manifest = read_manifest(tmp_path / "unet" / "cache")
    assert manifest["dtype"] == "float16" and manifest["fingerprint"]["dtype"] == "torch.float16"
    shard = load_file(tmp_path / "unet" / "cache" / manifest["shards"][0]["name"])
    assert {shard[k].dtype for k in ("mean", "logvar", "text")} == {torch.float16}
    fp16 = logged(tmp_path / "unet")
    assert len(fp16) == 4 and all(torch.isfinite(torch.tensor(fp16)))
    assert run.exists()
    stage2.main(_cfg(unet_overrides, f"output_dir={tmp_path / 'fp32'}"))
    assert fp16 == pytest.approx(logged(tmp_path / "fp32"), rel=2e-2)  # close, not equal: rounding of storage
    assert read_manifest(tmp_path / "fp32" / "cache")["fingerprint"] != manifest["fingerprint"]
    with pytest.raises(Exception, match="cache.dtype"):
        _cfg(unet_overrides, "cache.dtype=int8")


def test_damaged_caches_are_detected_refused_and_rebuilt(unet_overrides, tmp_path, caplog, capsys):
    cfg = _cfg(unet_overrides)
    folder = tmp_path / "cache"
    dataset, fp = _build(cfg, folder)
    good = _files(folder)
    shard = folder / read_manifest(folder)["shards"][2]["name"]
    assert cache_status(folder, fp) == "current"

    reader = CachedLatentDataset(folder)
    pos = int((reader.shard_of == 2).nonzero()[0][0])
    reader[(pos, 0)]
    data = bytearray(good[shard.relative_to(folder).as_posix()])
    data[-3] ^= 0xFF  # another job's shard of the same size, moved into place (a new file) while this one reads
    (folder / "new").write_bytes(bytes(data))
    os.replace(folder / "new", shard)
    with pytest.raises(DamagedCacheError, match="shard-00002.safetensors was replaced while in use"):
        reader[(pos, 0)]

    shard.write_bytes(good[shard.relative_to(folder).as_posix()][:-100])  # truncated, as by a killed copy
    assert cache_status(folder, fp) == "damaged"
    with pytest.raises(DamagedCacheError, match=r"is damaged: bucket-16x16/shard-00002.safetensors has \d+ bytes"):
        CachedLatentDataset(folder)
    caplog.set_level("INFO")
    _build(cfg, folder)
    assert "is damaged" in caplog.text and "rebuilding" in caplog.text and _files(folder) == good

    data = bytearray(good[shard.relative_to(folder).as_posix()])
    data[-3] ^= 0xFF  # same size, another byte: only the sha256 sees it
    shard.write_bytes(bytes(data))
    assert check_cache(folder, read_manifest(folder)) == []
    assert check_cache(folder, read_manifest(folder), full=True) == [f"{shard.relative_to(folder).as_posix()} has "
                                                                     f"another sha256 than the manifest records"]
    with pytest.raises(SystemExit) as exit_:
        cli(["cache", "verify", "--dir", str(folder)])
    assert exit_.value.code == 2 and "another sha256" in capsys.readouterr().err
    shard.write_bytes(good[shard.relative_to(folder).as_posix()])
    cli(["cache", "verify", "--dir", str(folder)])
    assert "48 examples in 5 shards" in capsys.readouterr().out

    shard.unlink()
    with pytest.raises(DamagedCacheError, match="shard-00002.safetensors is missing"):
        CachedLatentDataset(folder)
    (folder / "manifest.json").write_text("{not json")
    assert cache_status(folder, fp) == "damaged"
    with pytest.raises(DamagedCacheError, match="no readable manifest.json"):
        CachedLatentDataset(folder)


def test_an_interrupted_build_continues_from_its_finished_shards(unet_overrides, tmp_path):
    cfg = _cfg(unet_overrides)
    parts = load_components(cfg)
    calls = []

    def failing_after_two_shards(pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while encoding the third shard
        return posterior_moments(parts.vae, pixels)

    with pytest.raises(KeyboardInterrupt):
        _build(cfg, tmp_path / "cache", encode_images=failing_after_two_shards)
    assert not (tmp_path / "cache").exists()  # nothing half-built is ever at the cache's path
    calls.clear()
    staging = tmp_path / ".tmp-cache"  # what a SIGKILL inside save_shard / write_json leaves behind:
    (staging / "bucket-16x16" / ".shard-00002.safetensors.tmp-4242").write_bytes(b"half a shard")
    (staging / "bucket-16x16" / ".shard-00001.safetensors.json.tmp-4242").write_text('{"bytes"')

    def counting(pixels):
        calls.append(len(pixels))
        return posterior_moments(parts.vae, pixels)

    _build(cfg, tmp_path / "cache", encode_images=counting)
    assert calls == [10, 10, 8]  # shards 2, 3, 4 of 10, 10, 10, 10, 8 examples: the first two were kept
    calls.clear()  # interrupted again, then continued with another shard size (the same shard names):
    with pytest.raises(KeyboardInterrupt):
        _build(cfg, tmp_path / "other", encode_images=failing_after_two_shards)  # shards of 10, 10, 10, 10, 8
    calls.clear()
    _build(cfg, tmp_path / "other", shard_size=11, encode_images=counting)  # shards of 11, 11, 11, 11, 4
    assert calls == [11, 11, 11, 11, 4]  # nothing of the other plan was reused
    a, b = CachedLatentDataset(tmp_path / "other"), CachedLatentDataset(tmp_path / "cache")
    assert all(torch.equal(a[(i, 0)][k], b[(i, 0)][k]) for i in range(48) for k in ("mean", "logvar", "text"))
    _build(cfg, tmp_path / "fresh")
    assert _files(tmp_path / "cache") == _files(tmp_path / "fresh")
    assert not (tmp_path / ".tmp-cache").exists()


def test_shard_plan_is_a_function_of_the_data_only(unet_overrides):
    dataset = ImageCaptionDataset(_cfg(unet_overrides).data)
    plan = plan_shards(dataset, 10)
    assert [name for name, _ in plan] == [f"bucket-16x16/shard-{k:05d}.safetensors" for k in range(5)]
    assert sum((p for _, p in plan), []) == list(range(48))
    assert plan_shards(dataset, 10) == plan and len(plan_shards(dataset, 1024)) == 1


# ``python -m train.cache`` with test hooks: RECORD_SHARES=<dir> writes the first example position of every
# shard each process encodes to <dir>/rank-<r>.txt; RECORD_OPENS=<dir> writes the name of every image each
# process opens to <dir>/rank-<r>.txt; HIDE_FROM_MAIN=1 hides the odd shards (process 1's) from the main
# process, as a node-local cache.dir would.
WORKER = """
import os
import ldm.data.cache as C
import ldm.data.images as I

rank = int(os.environ["RANK"])
if os.environ.get("RECORD_OPENS"):
    def opened(value, decode=I.decode_image):
        with open(os.path.join(os.environ["RECORD_OPENS"], f"rank-{rank}.txt"), "a") as f:
            f.write(I.image_name(value, -1) + "\\n")
        return decode(value)
    I.decode_image = opened
if os.environ.get("RECORD_SHARES"):
    def recorded(dataset, positions, *args, encode=C._encode_group):
        with open(os.path.join(os.environ["RECORD_SHARES"], f"rank-{rank}.txt"), "a") as f:
            f.write(f"{positions[0]}\\n")
        return encode(dataset, positions, *args)
    C._encode_group = recorded
if os.environ.get("HIDE_FROM_MAIN") and rank == 0:
    C.shard_done = lambda staging, name, done=C.shard_done: done(staging, name) and int(name[-17:-12]) % 2 == 0

from ldm.entry import stage_entry
from train.cache import main
stage_entry("unet", main)
"""


def _torchrun(nproc: int, port: int, overrides: list[str], worker: Path | None = None, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    args = [a for o in overrides for a in ("--set", o)]
    target = [str(worker)] if worker else ["-m", "train.cache"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), *target, "--config", str(REPO / "configs/unet/shapes.yaml"), *args]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [ENV.get("PYTHONPATH")])]), **(env or {})}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # never hangs
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def _worker(tmp_path: Path) -> Path:
    (tmp_path / "worker.py").write_text(WORKER)
    return tmp_path / "worker.py"


def test_two_processes_build_the_same_cache_as_one(unet_overrides, tmp_path):
    base = [o for o in unet_overrides if not o.startswith("output_dir")] + ["data.random_flip=true",
                                                                            "cache.shard_size=10"]
    (tmp_path / "shares").mkdir()
    (tmp_path / "opens").mkdir()
    two = _torchrun(2, 29561, base + [f"cache.dir={tmp_path / 'two'}", f"output_dir={tmp_path / 'out'}"],
                    worker=_worker(tmp_path), env={"RECORD_SHARES": str(tmp_path / "shares"),
                                                   "RECORD_OPENS": str(tmp_path / "opens")})
    assert "5 shards, 2 process(es)" in two.stderr
    shares = {r: (tmp_path / "shares" / f"rank-{r}.txt").read_text().split() for r in (0, 1)}
    assert shares == {0: ["0", "20", "40"], 1: ["10", "30"]}  # shards 0, 2, 4 and 1, 3 (of 10 examples), each once
    records = ImageCaptionDataset(_cfg(base).data, check=False).records
    names = [image_name(records[i]["image"], i) for i in range(48)]
    opens = {r: Counter((tmp_path / "opens" / f"rank-{r}.txt").read_text().split()) for r in (0, 1)}
    # each process opened only the images of its own shards: once to check them, once to encode them
    assert opens[0] == Counter({n: 2 for n in names[0:10] + names[20:30] + names[40:48]})
    assert opens[1] == Counter({n: 2 for n in names[10:20] + names[30:40]})
    cli(["cache", "build", "--config", str(REPO / "configs/unet/shapes.yaml"),
         *[a for o in base + [f"cache.dir={tmp_path / 'one'}", f"output_dir={tmp_path / 'out'}"] for a in ("--set", o)]])
    one, both = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == both.keys() and len(one) == 8 and all(one[k] == both[k] for k in one)
    assert json.loads(one["manifest.json"])["examples"] == 48


def test_stage2_trains_from_a_prebuilt_cache_without_rebuilding(unet_overrides, tmp_path, caplog):
    shared = [*unet_overrides, f"cache.dir={tmp_path / 'shared'}", "cache.dtype=bfloat16"]
    cli(["cache", "build", "--config", str(REPO / "configs/unet/shapes.yaml"),
         *[a for o in shared for a in ("--set", o)]])
    stamp = (tmp_path / "shared" / "manifest.json").stat().st_mtime_ns
    caplog.set_level("INFO")
    caplog.clear()
    stage2.main(_cfg(shared, f"output_dir={tmp_path / 'a'}"))
    assert "is current" in caplog.text and "building" not in caplog.text
    assert (tmp_path / "shared" / "manifest.json").stat().st_mtime_ns == stamp and not (tmp_path / "a" / "cache").exists()
    with pytest.raises(SystemExit):  # nothing to precompute
        cli(["cache", "build", "--config", str(REPO / "configs/unet/shapes.yaml"),
             *[a for o in shared + ["cache.enabled=false"] for a in ("--set", o)]])


@pytest.mark.slow  # ~50 s on one core (two torchrun processes)
def test_an_error_on_one_process_is_raised_on_every_process(unet_overrides, tmp_path):
    """The main process finds process 1's shards missing (a node-local cache.dir): both processes stop with
    the message (before, process 1 waited at a barrier for the main process that had failed)."""
    base = [o for o in unet_overrides if not o.startswith("output_dir")] + ["cache.shard_size=10"]
    done = _torchrun(2, 29563, base + [f"cache.dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"],
                     worker=_worker(tmp_path), env={"HIDE_FROM_MAIN": "1"}, check=False)
    assert done.returncode != 0
    message = "shard-00001.safetensors, bucket-16x16/shard-00003.safetensors were not written"
    assert done.stderr.count(message) >= 2 and done.stderr.count("is it node-local?") >= 2, done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()


def test_a_folder_with_another_manifest_json_is_refused_and_left_as_it_was(unet_overrides, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my work")
    for foreign in ('{"name": "my project", "files": ["notes.txt"]}', '{"shards": [], "fingerprint": {}}',
                    '{"truncated": '):
        (folder / "manifest.json").write_text(foreign)
        with pytest.raises(FileExistsError, match="has a manifest.json that is not a latent cache's"):
            cache_status(folder, {"version": 2})
    before = _files(folder)
    refused = rf"{re.escape(str(folder))} has a manifest.json .*nothing in .*was changed"
    with pytest.raises(FileExistsError, match=refused):
        _build(_cfg(unet_overrides), folder)
    assert _files(folder) == before and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_second_build_of_the_same_cache_at_the_same_time_is_refused(unet_overrides, tmp_path):
    cfg = _cfg(unet_overrides)
    fd = os.open(tmp_path / ".cache.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another job, building
    os.write(fd, b"pid 7 on elsewhere")
    with pytest.raises(CacheInUseError, match=r"being built by another job \(pid 7 on elsewhere\)"):
        _build(cfg, tmp_path / "cache")
    assert not (tmp_path / ".tmp-cache").exists() and not (tmp_path / "cache").exists()
    os.close(fd)
    _build(cfg, tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # the lock is released and its file removed


def test_a_build_killed_while_committing_keeps_its_shards(unet_overrides, tmp_path, monkeypatch):
    cfg = _cfg(unet_overrides)
    parts = load_components(cfg)
    calls = []

    def counting(pixels):
        calls.append(len(pixels))
        return posterior_moments(parts.vae, pixels)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the manifest is written, before the rename

    monkeypatch.setattr(cache_module, "fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(cfg, tmp_path / "cache", encode_images=counting)
    monkeypatch.undo()
    assert calls == [10, 10, 10, 10, 8] and not (tmp_path / "cache").exists()
    calls.clear()
    _build(cfg, tmp_path / "cache", encode_images=counting)
    assert calls == []  # every shard kept
    assert cache_status(tmp_path / "cache", read_manifest(tmp_path / "cache")["fingerprint"]) == "current"


def test_the_lock_file_is_removed_safely_when_a_job_opened_it_just_before(tmp_path, monkeypatch):
    """Job B opens the lock file, job A (the holder) releases and deletes it, then B locks the deleted file: B must
    notice and lock the file now at the path, or a third job could build beside it."""
    from ldm import locks
    from ldm.data import cache_lock

    folder, path = tmp_path / "cache", tmp_path / ".cache.lock"
    holder = cache_lock.lock_build(folder)
    real_flock, locked = locks.fcntl.flock, []

    def flock_after_the_holder_lets_go(fd, how):
        if not locked:  # B has opened the file; now A releases it (deletes it, then closes it)
            cache_lock.unlock_build(folder, holder)
        locked.append(fd)
        return real_flock(fd, how)

    monkeypatch.setattr(locks.fcntl, "flock", flock_after_the_holder_lets_go)
    b = cache_lock.lock_build(folder)
    monkeypatch.undo()
    assert len(locked) == 2 and locked[1] == b  # locked the deleted file, saw it, opened the path again
    assert os.stat(path)[1:3] == os.fstat(b)[1:3]  # (inode, device): the file at the path
    assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(CacheInUseError, match=f"pid {os.getpid()}"):  # a third job is refused: B holds the path
        cache_lock.lock_build(folder)
    cache_lock.unlock_build(folder, b)
    assert not path.exists()


def test_a_build_killed_at_any_step_of_its_commit_keeps_every_shard(unet_overrides, tmp_path, monkeypatch):
    """Killed before the manifest, between the deletes of the shard records, after ``build.json`` is gone, or just
    before the rename: the next build encodes nothing again and gives the cache a build never killed gives."""
    cfg = _cfg(unet_overrides)
    parts = load_components(cfg)
    dataset = ImageCaptionDataset(cfg.data)
    fp = fingerprint(dataset, module_hash(parts.vae), module_hash(parts.text_encoder), torch.float32)
    encoded = []

    def build(folder):
        build_cache(folder, dataset, fp, lambda x: encoded.append(len(x)) or posterior_moments(parts.vae, x),
                    lambda t: encode_prompts(parts.text_encoder, parts.tokenizer, t), shard_size=10)

    build(tmp_path / "fresh")
    fresh = _files(tmp_path / "fresh")
    with monkeypatch.context() as m:  # every shard written, killed as the commit starts
        m.setattr(cache_module, "commit_cache", lambda *a: _raise(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build(tmp_path / "c")
    shutil.move(tmp_path / ".tmp-c", tmp_path / "staged")
    committing = [False]
    commit = cache_module.commit_cache

    def tracked(*args):
        committing[0] = True
        try:
            return commit(*args)
        finally:
            committing[0] = False

    steps = [(cache_module, "write_json", 0), (cache_module, "fsync_tree", 0)]  # before / after the manifest
    steps += [(Path, "unlink", n) for n in range(6)]  # before deleting record n (5 shards) or build.json (n = 5)
    steps += [(cache_module, "fsync_tree", 1), (cache_module, "restore_interrupted_replace", 0),
              (cache_module, "replace_folder", 0)]
    for target, name, survived in steps:
        folder = tmp_path / f"c-{name}-{survived}"
        shutil.copytree(tmp_path / "staged", tmp_path / f".tmp-{folder.name}")
        real, calls = getattr(target, name), []

        def dying(*args, real=real, survived=survived, calls=calls, **kwargs):
            if committing[0] and len(calls) == survived:
                raise KeyboardInterrupt  # killed here
            calls.append(1)
            return real(*args, **kwargs)

        encoded.clear()
        with monkeypatch.context() as m:
            m.setattr(cache_module, "commit_cache", tracked)
            m.setattr(target, name, dying)
            with pytest.raises(KeyboardInterrupt):
                build(folder)
        assert not folder.exists(), (name, survived)
        build(folder)
        assert encoded == [] and _files(folder) == fresh, (name, survived)  # every shard kept, nothing re-encoded
        assert not (tmp_path / f".tmp-{folder.name}").exists() and not (tmp_path / f".{folder.name}.lock").exists()


def _raise(error):
    raise error


def test_a_run_on_a_prebuilt_cache_opens_no_image(unet_overrides, shapes16, tmp_path, monkeypatch):
    """The cache records the image check (one unreadable image here); a run that finds the cache current takes
    the check from it and opens no image at all, and sees the dataset a fresh check sees."""
    from train.cache import main as build_main

    shutil.copytree(shapes16, tmp_path / "data")
    records = ImageCaptionDataset(_cfg(unet_overrides, f"data.path={tmp_path / 'data'}").data, check=False).records
    broken = image_name(records[5]["image"], 5)
    (tmp_path / "data" / broken).write_bytes(b"not an image")
    shared = [*unet_overrides, f"data.path={tmp_path / 'data'}", f"cache.dir={tmp_path / 'shared'}"]
    decoded, opened = [], []
    decode, open_ = images_module.decode_image, PIL.Image.open
    monkeypatch.setattr(images_module, "decode_image", lambda v: decoded.append(v) or decode(v))
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a) or open_(*a, **k))
    build_main(_cfg(shared))
    assert len(decoded) == len(opened) == 48 + 47  # every image checked once, the 47 readable ones encoded once
    images = read_manifest(tmp_path / "shared")["images"]
    assert {k: images[k] for k in ("checked", "readable", "skipped")} == {"checked": 48, "readable": 47,
                                                                          "skipped": [broken]}
    decoded.clear(), opened.clear()
    stage2.main(_cfg(shared, f"output_dir={tmp_path / 'run'}"))
    assert decoded == [] and opened == []  # no image opened: not to check, not to encode
    assert len(logged(tmp_path / "run")) == 4
    fresh = ImageCaptionDataset(_cfg(shared).data)  # opens every image again
    adopted = ImageCaptionDataset(_cfg(shared).data, check=False)
    decoded.clear()
    cfg = _cfg(shared)
    latent_cache(None, cfg.cache, cfg.output_dir, adopted, load_components(cfg))
    assert decoded == [] and (adopted.valid, adopted.sizes, adopted.skipped) == (fresh.valid, fresh.sizes, [broken])


def test_the_main_process_waits_a_moment_for_shards_a_shared_filesystem_shows_late(tmp_path):
    (tmp_path / "s.safetensors").write_bytes(b"x" * 10)
    threading.Timer(0.3, (tmp_path / "s.safetensors.json").write_text, ['{"bytes": 10}']).start()
    assert cache_module._missing_shards(tmp_path, ["s.safetensors"]) == []
    start = time.monotonic()
    assert cache_module._missing_shards(tmp_path, ["s.safetensors", "t.safetensors"]) == ["t.safetensors"]
    assert 1.5 < time.monotonic() - start < 3  # a few tries over ~2 s, then reported


@pytest.mark.slow  # ~100 s on one core (three subprocess runs); test_resume's SIGKILL test reads from disk in CI
def test_kill_and_resume_while_training_from_a_prebuilt_disk_cache_is_exact(unet_overrides, tmp_path):
    from test_resume import _assert_same_checkpoint, _run, _run_and_kill_after_checkpoint

    base = [o for o in unet_overrides if not o.startswith(("output_dir", "train.max_steps", "train.checkpoint"))]
    base += ["train.max_steps=12", "train.checkpoint_every=4", "data.random_flip=true", "cache.dtype=float16",
             f"cache.dir={tmp_path / 'shared'}", "cache.shard_size=8", "train.grad_accum_steps=2"]
    cli(["cache", "build", "--config", str(REPO / "configs/unet/shapes.yaml"),
         *[a for o in base + [f"output_dir={tmp_path / 'x'}"] for a in ("--set", o)]])
    built = _files(tmp_path / "shared")
    straight = _run("unet", base + [f"output_dir={tmp_path / 'straight'}"])
    assert "is current" in straight.stderr
    _run_and_kill_after_checkpoint("unet", base + [f"output_dir={tmp_path / 'killed'}"], tmp_path / "killed", step=4)
    _run("unet", base + [f"output_dir={tmp_path / 'killed'}"])
    _assert_same_checkpoint(tmp_path / "straight" / "checkpoint-12", tmp_path / "killed" / "checkpoint-12",
                            ["model-unet.safetensors", "ema-unet.safetensors", "optim-unet.safetensors"])
    assert _files(tmp_path / "shared") == built  # read by three runs, rebuilt by none


def test_shard_rows_read_from_disk_equal_the_saved_tensors(tmp_path):
    from ldm.data.shards import Shard, save_shard

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 3, 2, generator=g).to(torch.bfloat16), "b": torch.randn(5, 7, generator=g).half(),
               "index": torch.arange(5) * 3}
    record = save_shard(tmp_path / "s.safetensors", tensors)
    assert record["bytes"] == (tmp_path / "s.safetensors").stat().st_size and len(record["sha256"]) == 64
    shard = Shard(tmp_path / "s.safetensors")
    assert len(shard) == 5 and torch.equal(shard.column("index"), tensors["index"])
    for i in range(5):
        rows = shard.rows(["a", "b"], i)
        assert all(rows[k].dtype == tensors[k].dtype and torch.equal(rows[k], tensors[k][i]) for k in rows)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(DamagedCacheError, match="bad.safetensors cannot be read"):
        Shard(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes((tmp_path / "s.safetensors").read_bytes()[:-8])
    with pytest.raises(DamagedCacheError, match="short.safetensors is truncated"):
        Shard(tmp_path / "short.safetensors")
    for entry in ({"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}, {"dtype": "F32", "shape": [1]}):
        header = json.dumps({"a": entry}).encode()
        (tmp_path / "odd.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
        with pytest.raises(DamagedCacheError, match="odd.safetensors has an unreadable header"):
            Shard(tmp_path / "odd.safetensors")
