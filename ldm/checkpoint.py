"""Atomic, pickle-free training checkpoints and atomic final folders.

A checkpoint ``<output_dir>/checkpoint-<step>`` holds everything needed to continue exactly:

    trainer.json                 step, data position, skip counters, world size, batch geometry
    model-<name>.safetensors     weights of each trained model (unwrapped)
    ema-<name>.safetensors       EMA weights
    optim-<name>.safetensors     optimizer tensors (+ optim-<name>.json: the rest of its state)
    schedulers.json              LR schedulers and the fp16 grad scaler
    rng-<rank>.safetensors/json  torch (CPU, CUDA), numpy and Python RNG states of every process
    COMPLETE                     written last: the list of files with their sizes

It is written to ``.tmp-checkpoint-<step>`` beside it, fsynced, renamed into place, and only
then are old checkpoints deleted. ``find_checkpoint`` only returns folders whose ``COMPLETE``
manifest matches the files on disk, so a truncated or half-written checkpoint is never resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm import locks
from ldm.errors import UserError

logger = logging.getLogger(__name__)
PATTERN = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"
PREVIOUS = "previous"  # <output_dir>/previous/<date-time>/: earlier runs set aside by train.resume=never
LOCK = ".lock"  # <output_dir>/.lock: held (flock) by the run writing there
_held_locks: dict[Path, int] = {}


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit this run (architecture); the message says which and what to do."""


class OutputDirInUseError(UserError, RuntimeError):
    """Another run is writing to the same output_dir."""


def lock_output_dir(output_dir: str | Path) -> None:
    """One run per output_dir: an exclusive ``flock`` on ``<output_dir>/.lock``, held until this process exits.

    Two runs writing one folder would replace and rotate away each other's checkpoints. The lock is
    re-entrant within a process (stages run one after another in tests and the demo) and released by
    the kernel when the process ends, however it ends (``ldm.locks``).
    """
    root = Path(output_dir).resolve()
    if root in _held_locks:
        return
    try:
        fd = locks.hold(root / LOCK)
    except locks.LockHeld as held:
        raise OutputDirInUseError(f"output_dir {output_dir} is in use by another run ({held.holder}); wait for it "
                                  f"to finish or choose another output_dir") from None
    if fd is not None:
        _held_locks[root] = fd


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------
def is_complete(folder: Path) -> bool:
    """True when ``folder`` has a manifest and every file it lists exists with its recorded size."""
    marker = folder / MARKER
    try:
        sizes = json.loads(marker.read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def step_of(folder: Path) -> int | None:
    match = PATTERN.match(folder.name)
    return int(match.group(1)) if match else None


def find_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """Resolve ``train.resume``: "never", "latest" (None when there is none) or a path."""
    if resume == "never":
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        skipped = [p.name for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p not in found]
        if skipped:
            logger.warning("ignoring incomplete checkpoint(s): %s", ", ".join(sorted(skipped)))
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not is_complete(path):
        raise FileNotFoundError(f"train.resume={resume} is not a complete checkpoint folder (no valid {MARKER} "
                                f"manifest); use 'latest', 'never' or a checkpoint-<step> folder")
    check_resume_path(output_dir, path)
    return path


def check_resume_path(output_dir: str | Path, folder: Path) -> None:
    """``train.resume=PATH`` continues one run; it must not overwrite or mix with another in ``output_dir``.

    Its new checkpoints go to ``output_dir``: later checkpoints already there (the run being forked)
    would be overwritten step by step, and checkpoints of an unrelated run would mix with it.
    """
    same_dir = folder.resolve().parent == Path(output_dir).resolve()
    here = list_checkpoints(output_dir)
    clash = [p.name for p in here if (step_of(p) or 0) > (step_of(folder) or 0)] if same_dir else \
        [p.name for p in here]
    if clash:
        raise FileExistsError(
            f"resuming {folder} would write into {output_dir}, which holds {'later' if same_dir else 'other'} "
            f"checkpoints ({', '.join(clash[-3:])}) that this run would overwrite or mix with; resume into a new "
            f"output_dir, or move those checkpoints away first")


def check_stage_folders(output_dir: str | Path) -> None:
    """A stage replaces ``final/`` (and ``snapshot/``) under ``output_dir``: where no stage has run (no ``logs/``, no
    ``checkpoint-*``) such a folder is someone else's, and is refused before any work (``train.resume=never``
    moves it aside instead)."""
    root = Path(output_dir)
    if not root.is_dir() or (root / "logs").is_dir() or any(root.glob("checkpoint-*")):
        return
    taken = [name for name in ("final", "snapshot") if (root / name).exists()]
    if taken:
        raise FileExistsError(f"output_dir {root} holds {' and '.join(taken)}/, which no stage wrote there (no logs/ "
                              f"or checkpoint-*), and a stage replaces it when it finishes: choose another output_dir, "
                              f"or set train.resume=never to move it to {PREVIOUS}/ (nothing was changed)")


def set_aside_previous_run(output_dir: str | Path) -> Path | None:
    """``train.resume=never``: move what an earlier run left in ``output_dir`` into ``previous/<date-time>/``.

    Everything moves (checkpoints, final, samples, logs, ...) except ``cache/`` (fingerprinted, reused only
    when it matches), ``previous/`` itself and the run lock: the new run starts clean, nothing is deleted.
    """
    root = Path(output_dir)
    keep = {"cache", PREVIOUS, LOCK}
    entries = sorted(p for p in root.iterdir() if p.name not in keep) if root.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    target = root / PREVIOUS / stamp
    for n in range(2, 1000):
        if not target.exists():
            break
        target = root / PREVIOUS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for entry in entries:
        os.replace(entry, target / entry.name)
    _fsync_dir(root)
    logger.warning("train.resume=never: moved the previous run's %s to %s (nothing was deleted)",
                   ", ".join(p.name for p in entries[:6]) + (" ..." if len(entries) > 6 else ""), target)
    return target


def check_architecture(folder: Path, name: str, model: torch.nn.Module) -> None:
    """The saved ``model-<name>.safetensors`` has this model's tensor names and shapes, or one clear error."""
    path = folder / f"model-{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    now = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if saved == now:
        return
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    example = (f"{changed[0]} is {list(saved[changed[0]])} there and {list(now[changed[0]])} now" if changed else
               f"{len(set(saved) ^ set(now))} tensor names differ, e.g. {sorted(set(saved) ^ set(now))[0]}")
    raise CheckpointMismatchError(
        f"cannot resume {folder}: its {name} has another architecture than this run's config ({example}); "
        f"keep the model.* (and lora.*) settings of that run, or start fresh with --resume never (moves the old "
        f"run to {folder.parent / PREVIOUS}/) or another output_dir")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(final: str | Path):
    """Yield a temporary folder beside ``final``; on success fsync it and rename it to ``final``.

    An existing ``final`` is replaced only after the new folder is complete on disk; a crash at
    any point leaves either the old folder or the new one, never a half-written one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_replace(final)
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_interrupted_replace(final: Path) -> None:
    """A kill between the two renames of ``replace_folder`` leaves ``final`` missing and the previous
    version at ``.old-<name>``: put it back, so the user keeps it until a new one is complete."""
    old = final.parent / f".old-{final.name}"
    if old.is_dir() and not final.exists():
        os.replace(old, final)
        logger.warning("restored %s from %s (a previous save was interrupted)", final, old.name)


def write_manifest(folder: Path) -> None:
    """The completion marker: every file in ``folder`` with its size, written last."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"files": files}, indent=1))


def fresh_folder(path: Path) -> Path:
    """An empty folder at ``path`` (a leftover of a killed write is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def commit_checkpoint(tmp: Path, final: Path) -> None:
    """Write the manifest, fsync everything, then rename ``tmp`` to ``final``: the atomic last step."""
    write_manifest(tmp)
    fsync_tree(tmp)
    replace_folder(tmp, final)


def replace_folder(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` (e.g. an incomplete one) is set aside first."""
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` and leftovers of killed writes and deletes.

    A checkpoint is renamed to ``.old-checkpoint-<step>`` before it is deleted, so a kill mid-delete
    leaves a leftover that the next rotation removes, never a half-deleted ``checkpoint-<step>``.
    Incomplete checkpoints older than the newest complete one (half-deleted by an older version, or
    truncated) can never be resumed and are removed too.
    """
    root = Path(output_dir)
    for stale in [*root.glob(".tmp-checkpoint-*"), *root.glob(".old-checkpoint-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    complete = list_checkpoints(root)
    newest = step_of(complete[-1]) if complete else -1
    broken = [p for p in root.glob("checkpoint-*") if p.is_dir() and p not in complete
              and (step_of(p) if step_of(p) is not None else newest) < newest]
    if broken:
        logger.info("removing incomplete checkpoint(s) older than %s: %s", complete[-1].name,
                    ", ".join(sorted(p.name for p in broken)))
    for old in broken + (complete[:-limit] if limit is not None else []):
        _delete_folder(old)


def _delete_folder(folder: Path) -> None:
    """Rename ``folder`` to a ``.old-`` name (atomic), then delete it."""
    doomed = folder.parent / f".old-{folder.name}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def load_json(path: Path):
    return json.loads(Path(path).read_text())


def fsync_tree(folder: Path, files: bool = True) -> None:
    """fsync every file (unless ``files=False``) and every directory under ``folder``, and ``folder``."""
    for path in folder.rglob("*") if files else []:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for sub in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(sub)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# State (de)serialisation without pickle
# --------------------------------------------------------------------------------------------
def save_state_dict(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_optimizer(folder: Path, name: str, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer tensors to safetensors (``state.<param>.<key>``), everything else to JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    save_state_dict(folder / f"optim-{name}.safetensors", tensors)
    save_json(folder / f"optim-{name}.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(folder: Path, name: str, optimizer: torch.optim.Optimizer) -> None:
    meta = load_json(folder / f"optim-{name}.json")
    state: dict[int, dict] = {}
    for key, value in load_state_dict(folder / f"optim-{name}.safetensors").items():
        _, pid, sub = key.split(".", 2)
        state.setdefault(int(pid), {})[sub] = value
    for key, value in meta["scalars"].items():
        pid, sub = key.split(".", 1)
        state.setdefault(int(pid), {})[sub] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]  # JSON turned tuples (betas) into lists
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG of this process: tensors (torch CPU/CUDA) and JSON (numpy, Python)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, pygauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(pystate), pygauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], other: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = other["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, pystate, pygauss = other["python"]
    random.setstate((version, tuple(pystate), pygauss))
