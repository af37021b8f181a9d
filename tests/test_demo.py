"""`ldm demo --quick`: the README's main command runs the whole chain end to end (numbers mean nothing)."""

import json

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
