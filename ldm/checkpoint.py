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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)
PATTERN = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"


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
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"train.resume={resume} is not a complete checkpoint folder (no valid {MARKER} "
                                f"manifest); use 'latest', 'never' or a checkpoint-<step> folder")
    return path


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
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    _fsync_tree(tmp)
    _replace_folder(tmp, final)


def _replace_folder(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` (e.g. an incomplete one) is set aside first."""
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` and leftovers of killed writes."""
    root = Path(output_dir)
    for stale in [*root.glob(".tmp-checkpoint-*"), *root.glob(".old-checkpoint-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if limit is None:
        return
    complete = list_checkpoints(root)
    for old in complete[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def load_json(path: Path):
    return json.loads(Path(path).read_text())


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
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
