"""Checkpoint files: pickle-free round trips, atomic writes, truncated ones skipped, safe rotation."""

import json
import random

import numpy as np
import pytest
import torch

from ldm import checkpoint as ckpt


def _complete(root, step, payload=b"x" * 100):
    tmp = ckpt.fresh_folder(root / f".tmp-checkpoint-{step}")
    (tmp / "model-a.safetensors").write_bytes(payload)
    ckpt.commit_checkpoint(tmp, root / f"checkpoint-{step}")
    return root / f"checkpoint-{step}"


def test_optimizer_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    ckpt.save_optimizer(tmp_path, "opt", opt)
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=5.0)
    ckpt.load_optimizer(tmp_path, "opt", other)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][key])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    tensors, other = ckpt.rng_state()
    other = json.loads(json.dumps(other))  # it really is JSON
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(tensors, other)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_truncated_or_unfinished_checkpoints_are_skipped(tmp_path, caplog):
    _complete(tmp_path, 2)
    newest = _complete(tmp_path, 4)
    assert ckpt.find_checkpoint(tmp_path, "latest") == newest
    with open(newest / "model-a.safetensors", "r+b") as f:  # truncated mid-write
        f.truncate(50)
    assert ckpt.find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert "checkpoint-4" in caplog.text
    (tmp_path / "checkpoint-6").mkdir()  # renamed without a manifest (not something we write, but possible)
    (tmp_path / "checkpoint-6" / "model-a.safetensors").write_bytes(b"y")
    ckpt.fresh_folder(tmp_path / ".tmp-checkpoint-8")  # a write killed before its rename
    assert ckpt.find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert ckpt.find_checkpoint(tmp_path, "never") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.find_checkpoint(tmp_path, str(tmp_path / "checkpoint-4"))


def test_rotation_keeps_limit_valid_checkpoints(tmp_path):
    for step in (1, 2, 3):
        _complete(tmp_path, step)
    broken = _complete(tmp_path, 4)
    (broken / ckpt.MARKER).unlink()
    ckpt.fresh_folder(tmp_path / ".tmp-checkpoint-5")
    ckpt.rotate_checkpoints(tmp_path, limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / ".tmp-checkpoint-5").exists()
    ckpt.rotate_checkpoints(tmp_path, limit=None)
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_atomic_folder_replaces_only_on_success(tmp_path):
    final = tmp_path / "final"
    with ckpt.atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with ckpt.atomic_folder(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("killed mid-save")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
