"""Config loading: YAML + overrides -> frozen dataclasses; every mistake is a clear error."""

import dataclasses

import pytest

from ldm.config import (ConfigError, UNetStageConfig, VAEStageConfig, load_config, save_config,
                        TextEncoderStageConfig)


def test_yaml_and_overrides_build_frozen_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\ntrain:\n  max_steps: 7\n  learning_rate: 1e-4\nmodel:\n"
                    "  block_out_channels: [16, 32]\n")
    cfg = load_config(VAEStageConfig, path, ["train.batch_size=3", "data.random_flip=true",
                                             "loss.kl_weight=2e-6"])
    assert cfg.output_dir == "out" and cfg.train.max_steps == 7 and cfg.train.batch_size == 3
    assert cfg.train.learning_rate == pytest.approx(1e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.model.block_out_channels == (16, 32) and cfg.data.random_flip is True
    assert cfg.loss.kl_weight == pytest.approx(2e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 1


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(UNetStageConfig, None, ["model.block_out_channels=[32,64,64]",
                                              "model.cross_attention=[false,true,true]",
                                              "data.buckets=[[32,48],[48,32]]"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(UNetStageConfig, tmp_path / "saved.yaml") == cfg


def test_stable_key_names_exist():
    for cls in (VAEStageConfig, TextEncoderStageConfig, UNetStageConfig):
        cfg = load_config(cls)
        for key in ("seed", "max_steps", "batch_size", "learning_rate", "grad_accum_steps", "checkpoint_every",
                    "checkpoints_total_limit", "mixed_precision"):
            assert hasattr(cfg.train, key)
        for key in ("path", "resolution", "caption_column"):
            assert hasattr(cfg.data, key)
        assert cfg.output_dir and cfg.model is not None


@pytest.mark.parametrize("override, message", [
    ("train.max_stesp=5", r"unknown config key 'train.max_stesp' \(did you mean 'train.max_steps'\?\).*max_steps"),
    ("tarin.max_steps=5", r"unknown config key 'tarin'.*valid keys under the top level: .*train"),
    ("train.max_steps=abc", r"train.max_steps must be of type int, got 'abc'"),
    ("train.max_steps=0", r"train.max_steps must be >= 1"),
    ("train.mixed_precision=fp32", r"train.mixed_precision must be one of 'no', 'bf16', 'fp16'"),
    ("diffusion.prediction_type=x0", r"diffusion.prediction_type must be one of"),
    ("model.cross_attention=[true]", r"model.cross_attention needs one entry per level"),
    ("train.max_steps", r"must look like key.sub=value"),
    ("train=3", r"train must be a mapping"),
    ("data.buckets=[[32]]", r"data.buckets\[0\] must have 2 items"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(UNetStageConfig, None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(VAEStageConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(VAEStageConfig, bad)


def test_shipped_configs_load():
    from pathlib import Path

    classes = {"vae": VAEStageConfig, "text_encoder": TextEncoderStageConfig, "unet": UNetStageConfig}
    root = Path(__file__).resolve().parents[1] / "configs"
    found = 0
    for folder, cls in classes.items():
        for path in sorted((root / folder).glob("*.yaml")):
            load_config(cls, path)
            found += 1
    assert found >= 1
