"""`ldm demo --quick`: the README's main command runs the whole chain end to end (numbers mean nothing)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ldm.cli import main as cli


def test_quick_demo_writes_every_artifact(tmp_path, capsys):
    cli(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    demo = tmp_path / "demo"
    for path in ("data/shapes/metadata.jsonl", "data/heldout/metadata.jsonl", "vae/final/config.json",
                 "text_encoder/final/text_encoder/config.json", "pipeline/model_index.json",
                 "pipeline/unet/diffusion_pytorch_model.safetensors", "samples.png", "metrics.json"):
        assert (demo / path).exists(), path
    metrics = json.loads((demo / "metrics.json").read_text())
    assert {"vae", "text_encoder", "judge_guidance_5", "judge_guidance_1", "unet_bits_per_dim"} <= set(metrics)
    assert 0 <= metrics["judge_guidance_5"]["accuracy"] <= 1
    out = capsys.readouterr().out
    assert str(demo / "pipeline") in out and str(demo / "samples.png") in out


def test_quick_demo_is_reproducible(tmp_path):
    """The same command twice gives the same metrics and weights (fixed seed, fixed thread count)."""
    runs = []
    for name in ("a", "b"):
        cli(["demo", "--out", str(tmp_path / name), "--quick", "--seed", "0"])
        text = (tmp_path / name / "metrics.json").read_text().replace(str(tmp_path / name), "OUT")  # paths differ
        metrics = json.loads(text)
        metrics.pop("minutes")
        weights = load_file(str(tmp_path / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
        runs.append((metrics, weights))
    (ma, wa), (mb, wb) = runs
    assert ma == mb and ma["seed"] == 0 and ma["threads"] >= 1
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_demo_seed_reaches_every_stage(tmp_path, monkeypatch):
    import ldm.recipe

    seen = {}

    def capture(out, train_dir, configs, overrides, **kwargs):
        seen.update(overrides)
        raise RuntimeError("stop after the configs")

    monkeypatch.setattr(ldm.recipe, "train_chain", capture)
    with pytest.raises(RuntimeError, match="stop after"):
        cli(["demo", "--out", str(tmp_path / "d"), "--quick", "--seed", "5"])
    assert set(seen) == {"vae", "text_encoder", "unet"}
    assert all("train.seed=5" in items for items in seen.values())
