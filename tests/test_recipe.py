"""`ldm train all`: the held-out split, per-stage overrides, presets, reuse of finished stages, end to end."""

import hashlib
import json
from pathlib import Path

import pytest

from ldm.config import load_config
from ldm.data.split import heldout_count, split_heldout
from ldm.recipe import PRESETS, preset_configs, reusable, run_once_side_by_side, split_overrides
from ldm.stages import STAGES

QUICK = ["train.max_steps=2", "train.batch_size=8", "train.checkpoint_every=2", "train.log_every=1"]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def digits40(tmp_path_factory):
    pytest.importorskip("sklearn")
    from ldm.data.digits import write_digits_dataset

    return write_digits_dataset(tmp_path_factory.mktemp("digits40"), size=32, num=40)


def test_every_preset_loads_and_fits_together():
    for preset in PRESETS:
        cfg = {stage: load_config(STAGES[stage].config, path) for stage, path in preset_configs(preset).items()}
        f = 2 ** (len(cfg["vae"].model.block_out_channels) - 1)
        assert cfg["unet"].data.resolution == cfg["vae"].data.resolution and cfg["unet"].data.resolution % f == 0
        assert cfg["text_encoder"].data.resolution % cfg["text_encoder"].model.vision_patch_size == 0
        assert not cfg["unet"].data.random_flip  # captions may name left and right
    with pytest.raises(ValueError, match="unknown preset"):
        preset_configs("tpu")


def test_overrides_go_to_one_stage():
    assert split_overrides(["vae.train.max_steps=100", "text-encoder.model.layer=penultimate", "unet.a.b=c=d"]) == {
        "vae": ["train.max_steps=100"], "text_encoder": ["model.layer=penultimate"], "unet": ["a.b=c=d"]}
    for bad in ("train.max_steps=100", "vae.train.max_steps", "clip.x=1"):
        with pytest.raises(ValueError, match="<stage>.key=value"):
            split_overrides([bad])


def test_bad_arguments_stop_before_any_work_with_one_line(digits40, tmp_path, capsys):
    from ldm.cli import main as cli

    for args, message in ((["--set", "vea.train.max_steps=1"], "<stage>.key=value"), (["--heldout", "2"], "at least 4"),
                          ([], "inside --data")):
        out = digits40 / "run" if message == "inside --data" else tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            cli(["train", "all", "--data", str(digits40), "--out", str(out), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not out.exists()


def test_heldout_split_is_seeded_disjoint_reused_and_leaves_the_source_alone(digits40, tmp_path):
    before = folder_digest(digits40)
    train, heldout = split_heldout(digits40, tmp_path / "data", heldout=0.25, seed=3)
    rows = {name: [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
            for name, folder in (("train", train), ("heldout", heldout))}
    assert len(rows["train"]) == 30 and len(rows["heldout"]) == 10
    names = [r["file_name"] for r in rows["train"] + rows["heldout"]]
    assert len(set(names)) == 40 and all((tmp_path / "data" / n).exists() is False for n in names)
    assert all(r["text"].startswith("a handwritten digit ") and "label" in r for r in rows["heldout"])
    assert folder_digest(digits40) == before
    again = split_heldout(digits40, tmp_path / "data", heldout=0.25, seed=3)  # the same split: reused
    assert again == (train, heldout) and json.loads((tmp_path / "data" / "split.json").read_text())["heldout"] == 10
    other = split_heldout(digits40, tmp_path / "other", heldout=0.25, seed=4)[1]
    assert {r["file_name"] for r in rows["heldout"]} != {json.loads(line)["file_name"] for line in
                                                         (other / "metadata.jsonl").read_text().splitlines()}
    with pytest.raises(ValueError, match="use another --out"):
        split_heldout(digits40, tmp_path / "data", heldout=0.25, seed=5)
    assert heldout_count(1797, 0.15) == 270 and heldout_count(100_000, 0.15, 1000) == 1000
    assert heldout_count(100, 20) == 20
    with pytest.raises(ValueError, match="at least 4"):
        heldout_count(10, 0.1)


def fake_stage(cfg):
    """A stand-in stage: writes <output_dir>/final and counts its runs."""
    final = Path(cfg.output_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    runs = final / "runs"
    runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
    return final


def test_a_finished_stage_is_reused_only_with_the_same_config(tmp_path):
    from ldm.config import VAEStageConfig

    def config(steps):
        return load_config(VAEStageConfig, None, [f"output_dir={tmp_path / 'vae'}", f"train.max_steps={steps}"])

    assert reusable(config(5)) is None
    final = run_once_side_by_side((fake_stage, config(5)))[0]
    assert run_once_side_by_side((fake_stage, config(5)))[0] == final and (final / "runs").read_text() == "1"
    run_once_side_by_side((fake_stage, config(6)))  # another config: the stage runs (and resumes) again
    assert (final / "runs").read_text() == "2" and reusable(config(6)) == final and reusable(config(5)) is None


def test_train_all_runs_end_to_end_and_a_rerun_reuses_every_stage(digits40, tiny_text_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """Tiny data, 2 steps per stage; a pretrained text encoder (stage 0's own chain is the demo test's) and
    a named CLIP for the metrics. The numbers mean nothing; the artifacts and the report must be there."""
    import torch

    from ldm.cli import main as cli
    from ldm.config import CLIPModelConfig
    from ldm.models.text import build_open_clip, open_clip_config, save_open_clip

    torch.manual_seed(0)
    clip_cfg = open_clip_config(CLIPModelConfig(embed_dim=16, vision_layers=1, vision_width=32, vision_heads=2,
                                                vision_patch_size=8, text_context_length=16, text_width=32,
                                                text_heads=2, text_layers=1), 32)
    clip = save_open_clip(tmp_path / "clip", build_open_clip(clip_cfg), clip_cfg)
    out, before = tmp_path / "out", folder_digest(digits40)
    sets = [f"{stage}.{item}" for stage in ("vae", "unet") for item in QUICK]
    sets += ["vae.calibration_samples=8", "unet.model.block_out_channels=[32,32]", "unet.model.norm_num_groups=8",
             "unet.model.layers_per_block=1"]
    argv = ["train", "all", "--data", str(digits40), "--out", str(out), "--heldout", "8", "--text-encoder",
            str(tiny_text_dir), "--clip", str(clip), "--eval-images", "8",
            *[arg for item in sets for arg in ("--set", item)]]
    cli(argv)
    for path in ("data/train/metadata.jsonl", "data/heldout/metadata.jsonl", "vae/final/config.json",
                 "pipeline/model_index.json", "pipeline/unet/diffusion_pytorch_model.safetensors",
                 "pipeline/metrics/pipeline.json", "samples.png", "metrics.json"):
        assert (out / path).exists(), path
    assert not (out / "text_encoder").exists()  # pretrained: stage 0 does not run
    metrics = json.loads((out / "metrics.json").read_text())
    pipeline = metrics["pipeline"]
    assert metrics["data"]["train"] == 32 and metrics["data"]["heldout"] == 8 and "psnr" in metrics["vae"]
    assert pipeline["data_kind"] == "digits"
    assert pipeline["features"].startswith("CLIP image tower (") and f"/{clip.parent.name}/clip), 16-d" in \
        pipeline["features"]
    assert pipeline["images_per_set"] == 4 and pipeline["fd"] >= 0 and 0 <= pipeline["classifier_accuracy"] <= 1
    assert {"kid", "clip_score", "clip_score_real", "fd_real_halves", "bits_per_dim", "heldout_loss"} <= set(pipeline)
    validation = json.loads((out / "pipeline" / "training.json").read_text())["config"]["validation"]
    assert validation["data"] == str(out / "data" / "heldout")  # stage 2 logs its held-out validation loss
    printed = capsys.readouterr().out
    assert str(out / "pipeline") in printed and "FD " in printed and "classifier" in printed
    assert folder_digest(digits40) == before

    import train.unet
    import train.vae

    def must_not_run(cfg):
        raise AssertionError(f"{cfg.output_dir} was trained again")

    monkeypatch.setattr(train.vae, "main", must_not_run)
    monkeypatch.setattr(train.unet, "main", must_not_run)
    cli(argv)  # a rerun: split, stage 1 and stage 2 are reused; samples and metrics are made again
    assert json.loads((out / "metrics.json").read_text())["pipeline"]["fd"] == pytest.approx(pipeline["fd"])
