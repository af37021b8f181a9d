"""Bad input and faults: every mistake is an error that names the key, file (and line) or path and the
fix, before any training starts; no fault loses or silently replaces what the user had (issue 11)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm import checkpoint as ckpt
from ldm.cli import main as cli
from ldm.config import (ConfigError, TextEncoderStageConfig, UNetStageConfig, VAEStageConfig, load_config)
from ldm.data.images import DataError, ImageCaptionDataset
from ldm.hub import allowed, assemble_release, model_card, pipeline_components
from ldm.locations import LocationError

# --------------------------------------------------------------------------------------------
# 1 + 6e: --resume never starts fresh without losing the old run; an architecture change is one sentence
# --------------------------------------------------------------------------------------------
TINY_VAE = ["data.resolution=16", "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
            "train.batch_size=4", "train.checkpoint_every=2", "calibration_samples=4", "train.log_every=1"]


def _vae(shapes16, out, *extra):
    from train import vae as stage1

    return stage1.main(load_config(VAEStageConfig, None, [f"data.path={shapes16}", f"output_dir={out}", *TINY_VAE,
                                                          *extra]))


def _steps(folder: Path) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(folder)]


def test_resume_never_sets_the_old_run_aside_and_architecture_changes_are_one_sentence(shapes16, tmp_path):
    out = tmp_path / "vae"
    _vae(shapes16, out, "train.max_steps=4")
    old_final = (out / "final" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert _steps(out) == [2, 4]

    with pytest.raises(ckpt.CheckpointMismatchError) as err:  # another architecture, plain resume
        _vae(shapes16, out, "train.max_steps=2", "model.block_out_channels=[16,16]")
    message = str(err.value)
    assert "\n" not in message and len(message) < 600
    assert "checkpoint-4" in message and "autoencoder" in message and "--resume never" in message

    _vae(shapes16, out, "train.max_steps=2", "model.block_out_channels=[16,16]", "train.resume=never")
    assert _steps(out) == [2]  # the new run only
    [previous] = (out / "previous").iterdir()
    assert _steps(previous) == [2, 4]  # the old run, complete, beside it
    assert (previous / "final" / "diffusion_pytorch_model.safetensors").read_bytes() == old_final
    assert (previous / "samples").is_dir() and (previous / "logs").is_dir()
    # the next plain run continues the new run (it is finished: nothing trains, nothing moves)
    _vae(shapes16, out, "train.max_steps=2", "model.block_out_channels=[16,16]")
    assert _steps(out) == [2] and len(list((out / "previous").iterdir())) == 1


def test_set_aside_keeps_the_cache_and_never_deletes(tmp_path):
    assert ckpt.set_aside_previous_run(tmp_path / "missing") is None
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    assert ckpt.set_aside_previous_run(tmp_path) is None  # only a cache: nothing of a run to move
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    first = ckpt.set_aside_previous_run(tmp_path)
    (tmp_path / "notes.txt").write_text("again")
    second = ckpt.set_aside_previous_run(tmp_path)
    assert first != second and (first / "notes.txt").read_text() == "mine" and (second / "notes.txt").read_text() == "again"
    assert (first / "checkpoint-3").is_dir() and (tmp_path / "cache" / "manifest.json").exists()


def _complete(root, step):
    tmp = ckpt.fresh_folder(root / f".tmp-checkpoint-{step}")
    (tmp / "model-a.safetensors").write_bytes(b"x" * 10)
    ckpt.commit_checkpoint(tmp, root / f"checkpoint-{step}")
    return root / f"checkpoint-{step}"


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    import fcntl
    import os

    other = os.open(tmp_path / ckpt.LOCK, os.O_RDWR | os.O_CREAT)  # another run holds the lock
    os.write(other, b"pid 12345 on elsewhere")
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(ckpt.OutputDirInUseError, match=r"in use by another run \(pid 12345 on elsewhere\)"):
            ckpt.lock_output_dir(tmp_path)
    finally:
        os.close(other)
    ckpt.lock_output_dir(tmp_path)  # free now; and re-entrant within one process
    ckpt.lock_output_dir(tmp_path)
    assert ckpt.set_aside_previous_run(tmp_path) is None  # the lock file is not a previous run


def test_resume_path_refuses_to_overwrite_later_or_other_checkpoints(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        _complete(run, step)
    with pytest.raises(FileExistsError, match=r"later checkpoints \(checkpoint-4\)"):
        ckpt.find_checkpoint(run, str(run / "checkpoint-2"))
    assert ckpt.find_checkpoint(run, str(run / "checkpoint-4")) == run / "checkpoint-4"
    other = tmp_path / "other"
    _complete(other, 6)
    with pytest.raises(FileExistsError, match="other checkpoints"):
        ckpt.find_checkpoint(other, str(run / "checkpoint-4"))
    assert ckpt.find_checkpoint(tmp_path / "fresh", str(run / "checkpoint-4")) == run / "checkpoint-4"


def test_architecture_check_names_the_checkpoint_and_the_fix(tmp_path):
    save_file(torch.nn.Linear(3, 2).state_dict(), str(tmp_path / "model-unet.safetensors"))
    ckpt.check_architecture(tmp_path, "unet", torch.nn.Linear(3, 2))  # same shapes: fine
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"weight is \[2, 3\] there and \[2, 4\] now.*--resume never"):
        ckpt.check_architecture(tmp_path, "unet", torch.nn.Linear(4, 2))
    with pytest.raises(ckpt.CheckpointMismatchError, match="tensor names differ"):
        ckpt.check_architecture(tmp_path, "unet", torch.nn.Sequential(torch.nn.Linear(3, 2)))


# --------------------------------------------------------------------------------------------
# 2 + 7: the release allow-list matches per path component; ids are validated before anything is written
# --------------------------------------------------------------------------------------------
@pytest.fixture
def model_with_junk(tiny_pipeline_dir, tmp_path):
    model = tmp_path / "final"
    shutil.copytree(tiny_pipeline_dir, model)
    for junk in (".tmp-checkpoint-3/model-unet.safetensors", ".tmp-checkpoint-3/config.json",
                 "checkpoint-4/optim-unet.safetensors", "checkpoint-4/model-unet.safetensors",
                 "cache/empty.safetensors", "cache/bucket-16x16/shard-00000.safetensors", "unet/optim.bin",
                 "unet/sub/diffusion_pytorch_model.safetensors", "logs/config.json", "README.md"):
        (model / junk).parent.mkdir(parents=True, exist_ok=True)
        (model / junk).write_bytes(b"junk")
    return model


def test_allow_list_matches_per_component():
    components = frozenset({"unet", "vae", "text_encoder", "tokenizer", "scheduler"})
    assert allowed("unet/diffusion_pytorch_model.safetensors", components)
    assert allowed("tokenizer/vocab.json", components) and allowed("model_index.json", components)
    for path in ("checkpoint-4/optim-unet.safetensors", ".tmp-checkpoint-3/model.safetensors", "cache/empty.safetensors",
                 "cache/bucket-16x16/shard-00000.safetensors", "unet/sub/x.safetensors", "a/unet/x.safetensors",
                 "unet/x.bin", "logs/config.json", "README.md"):
        assert not allowed(path, components), path


def test_dry_run_lists_only_the_model_and_the_release_loads_without_remote_code(model_with_junk, capsys):
    cli(["push", "--model", str(model_with_junk), "--repo-id", "someone/tiny", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    release, listed = Path(lines[-1]), [line.strip() for line in lines[1:-1]]
    assert not [f for f in listed if f.startswith((".tmp", "checkpoint", "cache", "logs")) or "/sub/" in f
                or f.endswith(".bin")]
    assert "unet/diffusion_pytorch_model.safetensors" in listed and "pipeline_latent_diffusion.py" in listed
    assert (release / "README.md").read_text() != "junk"  # the card is generated, never copied

    # 3: model_index.json names the class as a string, so the installed class loads it without remote code
    assert json.loads((release / "model_index.json").read_text())["_class_name"] == "LatentDiffusionPipeline"
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(release)
    assert type(pipe) is LatentDiffusionPipeline
    card = (release / "README.md").read_text()
    assert 'LatentDiffusionPipeline.from_pretrained("someone/tiny"' in card
    assert 'custom_pipeline="pipeline_latent_diffusion"' in card  # the remote-code way names the shipped file

    # a second dry run replaces its own release folder; a foreign folder in its place is never replaced
    cli(["push", "--model", str(model_with_junk), "--repo-id", "someone/tiny", "--dry-run"])
    (release / "my-notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        cli(["push", "--model", str(model_with_junk), "--repo-id", "someone/tiny", "--dry-run"])
    assert exit_info.value.code == 2 and "not a release folder" in capsys.readouterr().err
    assert (release / "my-notes.txt").read_text() == "mine"


def test_a_list_class_name_is_rewritten_so_the_installed_class_loads(tiny_pipeline_dir, tmp_path):
    model = tmp_path / "final"
    shutil.copytree(tiny_pipeline_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index | {"_class_name": ["pipeline_latent_diffusion",
                                                                                "LatentDiffusionPipeline"]}))
    release = assemble_release(model, tmp_path / "release", repo_id="a/b")
    assert json.loads((release / "model_index.json").read_text())["_class_name"] == "LatentDiffusionPipeline"
    assert pipeline_components(release) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}


@pytest.mark.parametrize("args, message", [
    (["--repo-id", 'x/y"); import os; os.system("echo")  #'], "not a valid Hub repo id"),
    (["--repo-id", "a/b/c"], "not a valid Hub repo id"),
    (["--repo-id", "a/b", "--revision", "my branch"], "not a valid branch name"),
    (["--repo-id", "a/b", "--revision", "../main"], "not a valid branch name"),
])
def test_push_validates_ids_before_writing_anything(model_with_junk, capsys, args, message):
    before = sorted(model_with_junk.parent.iterdir())
    with pytest.raises(SystemExit):
        cli(["push", "--model", str(model_with_junk), *args, "--dry-run"])
    assert message in capsys.readouterr().err
    assert sorted(model_with_junk.parent.iterdir()) == before  # no release folder was written


def test_model_card_pastes_only_validated_ids(tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "training.json").write_text(json.dumps({"base_model": str(tmp_path), "datasets": ["x\"y", "u/d"]}))
    with pytest.raises(LocationError):
        model_card(tmp_path, 'a/b") or __import__("os")', has_grid=False)
    card = model_card(tmp_path, "a/b", has_grid=False)
    assert str(tmp_path) not in card.content and 'from_pretrained(BASE)' in card.content  # local base: placeholder
    assert card.data.datasets == ["u/d"] and card.data.base_model is None


def test_training_config_validates_push_ids():
    with pytest.raises(ConfigError, match="push.repo_id"):
        load_config(UNetStageConfig, None, ["push.repo_id=not an id"])
    with pytest.raises(ConfigError, match="push.checkpoints_branch 'a..b'"):
        load_config(UNetStageConfig, None, ["push.repo_id=a/b", "push.checkpoints_branch=a..b"])


# --------------------------------------------------------------------------------------------
# 4 + 6c: captions and metadata.jsonl lines, in every data path
# --------------------------------------------------------------------------------------------
def _metadata(folder: Path, shapes16, edit) -> Path:
    shutil.copytree(shapes16, folder)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join(edit(lines)) + "\n")
    return folder


def _set_row(lines, index, **values):
    row = json.loads(lines[index])
    row.update(values)
    for key in [k for k, v in values.items() if v is ...]:
        del row[key]
    return lines[:index] + [json.dumps(row)] + lines[index + 1:]


@pytest.mark.parametrize("change", [{"text": None}, {"text": ...}])
def test_null_or_missing_captions_name_the_example_in_every_path(shapes16, tmp_path, change):
    from ldm.config import DataConfig
    from ldm.data.streaming import StreamingImageCaptions

    folder = _metadata(tmp_path / "d", shapes16, lambda lines: _set_row(lines, 5, **change))
    name = json.loads((folder / "metadata.jsonl").read_text().splitlines()[5])["file_name"]
    data = DataConfig(path=str(folder), resolution=16)
    with pytest.raises(DataError, match=rf"caption 'text' of example #5 \({name}\).* is None.*use \"\""):
        ImageCaptionDataset(data)  # stages 0 and 2
    assert len(ImageCaptionDataset(data, need_captions=False)) == 48  # stage 1 needs no captions
    stream = StreamingImageCaptions(DataConfig(path=str(folder), resolution=16, streaming=True), seed=0,
                                    shuffle_buffer=1)
    with pytest.raises(DataError, match=rf"caption 'text' of {name}"):
        for _ in zip(range(48), stream):
            pass
    with pytest.raises(DataError, match="example #5"):  # stage 0 fails before training, naming the row
        from train import text_encoder as stage0

        stage0.main(load_config(TextEncoderStageConfig, None, [f"data.path={folder}", f"output_dir={tmp_path / 'te'}",
                                                               "data.resolution=16", "eval_samples=0"]))


def test_broken_metadata_lines_name_file_and_line(shapes16, tmp_path):
    from ldm.config import DataConfig

    bad = _metadata(tmp_path / "bad", shapes16, lambda lines: lines[:3] + ["{not json"] + lines[4:])
    with pytest.raises(DataError, match=rf"{bad / 'metadata.jsonl'} line 4 is not valid JSON"):
        ImageCaptionDataset(DataConfig(path=str(bad), resolution=16), need_captions=False)
    number = _metadata(tmp_path / "number", shapes16, lambda lines: _set_row(lines, 2, text=7))
    with pytest.raises(DataError, match=r"line 3: 'text' must be a string, got 7"):
        ImageCaptionDataset(DataConfig(path=str(number), resolution=16))
    nameless = _metadata(tmp_path / "nameless", shapes16, lambda lines: _set_row(lines, 0, file_name=...))
    with pytest.raises(DataError, match='line 1 needs a "file_name"'):
        ImageCaptionDataset(DataConfig(path=str(nameless), resolution=16))


def test_images_without_a_metadata_line_are_named(shapes16, tmp_path, caplog):
    from ldm.config import DataConfig

    folder = _metadata(tmp_path / "d", shapes16, lambda lines: lines[:-1])
    ImageCaptionDataset(DataConfig(path=str(folder), resolution=16))
    assert "1 image(s) in" in caplog.text and "00047.png" in caplog.text


# --------------------------------------------------------------------------------------------
# 5: every config value is checked at load, naming the key
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, override, message", [
    (VAEStageConfig, "loss.kl_weight=nan", r"loss.kl_weight must be a finite number, got 'nan'"),
    (VAEStageConfig, "loss.kl_weight=.nan", r"loss.kl_weight must be a finite number"),
    (VAEStageConfig, "loss.kl_weight=-1", r"loss.kl_weight must be a finite number >= 0"),
    (VAEStageConfig, "train.learning_rate=inf", r"train.learning_rate must be a finite number"),
    (VAEStageConfig, "train.learning_rate=0", r"train.learning_rate must be a finite number in \(0, 1\]"),
    (VAEStageConfig, "train.learning_rate=1e9", r"train.learning_rate must be a finite number in \(0, 1\]"),
    (VAEStageConfig, "model.norm_num_groups=0", r"model.norm_num_groups must be >= 1"),
    (VAEStageConfig, "model.norm_num_groups=5", r"model.block_out_channels \[32, 64, 64\] not divisible by model.norm_num_groups=5"),
    (VAEStageConfig, "data.resolution=33", r"data.resolution .* multiple of the VAE's downsampling factor 4"),
    (VAEStageConfig, "calibration_samples=0", r"calibration_samples must be >= 1"),
    (VAEStageConfig, "train.adam_beta2=5", r"train.adam_beta2 must be a finite number in \[0, 1\)"),
    (VAEStageConfig, "train.adam_beta1=-0.1", r"train.adam_beta1 must be a finite number in \[0, 1\)"),
    (VAEStageConfig, "train.weight_decay=-1", r"train.weight_decay must be a finite number >= 0"),
    (VAEStageConfig, "train.max_grad_norm=0", r"train.max_grad_norm must be a finite number > 0 or null"),
    (VAEStageConfig, "train.seed=-1", r"train.seed must be in \[0, 2\*\*63\)"),
    (VAEStageConfig, "train.ema_decay=1", r"train.ema_decay must be a finite number in \(0, 1\) or null"),
    (VAEStageConfig, "output_dir=''", r"output_dir must not be empty"),
    (VAEStageConfig, "data.streaming=true", r"data.streaming is supported by the U-Net stage only"),
    (VAEStageConfig, "loss.disc_start=0\ndata.resolution=8", r"loss.disc_layers \(2\) needs images of at least 12 px"),
    (VAEStageConfig, "loss.disc_learning_rate=0", r"loss.disc_learning_rate must be a finite number in \(0, 1\]"),
    (VAEStageConfig, "loss.logvar_init=1e6", r"loss.logvar_init must be a finite number in \[-30, 30\]"),
    (VAEStageConfig, "data.caption_column=image", r"data.caption_column must differ"),
    (VAEStageConfig, "data.max_samples=0", r"data.max_samples must be >= 1 or null"),
    (TextEncoderStageConfig, "model.vision_patch_size=5", r"model.vision_patch_size \(5\) must divide data.resolution"),
    (TextEncoderStageConfig, "data.buckets=[[32,32]]", r"data.buckets must be empty for the text encoder"),
    (UNetStageConfig, "model.norm_num_groups=0", r"model.norm_num_groups must be >= 1"),
    (UNetStageConfig, "model.attention_heads=0", r"model.attention_heads must be >= 1"),
    (UNetStageConfig, "diffusion.beta_end=0.0001", r"diffusion.beta_end must be > diffusion.beta_start"),
    (UNetStageConfig, "diffusion.beta_start=0", r"diffusion.beta_start must be a finite number in \(0, 1\)"),
    (UNetStageConfig, "diffusion.offset_noise=-0.1", r"diffusion.offset_noise must be a finite number >= 0"),
    (UNetStageConfig, "diffusion.num_train_timesteps=1", r"diffusion.num_train_timesteps must be >= 2"),
    (UNetStageConfig, "validation.guidance_scale=nan", r"validation.guidance_scale must be a finite number"),
    (UNetStageConfig, "validation.prompts=[]", r"validation.prompts needs at least one prompt"),
    (UNetStageConfig, "lora.alpha=0", r"lora.alpha must be a finite number > 0 or null"),
    (UNetStageConfig, "lora.rank=-1", r"lora.rank must be >= 0"),
    (UNetStageConfig, "data.buckets=[[32,32]]\ndata.streaming=true", r"data.buckets needs the map-style dataset"),
])
def test_bad_values_name_the_key(cls, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cls, None, override.split("\n"))  # one override per line


def _numeric_keys(cls, prefix=""):
    """(dotted key, int or float) for every numeric field of a stage config, nested sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_keys(hint, f"{prefix}{field.name}.")
        elif kinds := [t for t in (typing.get_args(hint) or (hint,)) if t in (int, float)]:
            yield prefix + field.name, kinds[0]


@pytest.mark.parametrize("cls", [VAEStageConfig, TextEncoderStageConfig, UNetStageConfig])
def test_every_numeric_field_rejects_impossible_values(cls):
    """Every int refuses -1 and every float NaN and -1e9, naming the key (new fields included)."""
    keys = list(_numeric_keys(cls))
    assert len(keys) > 20
    for key, kind in keys:
        for bad in (["-1"] if kind is int else ["nan", "-inf", "-1e9"]):
            with pytest.raises(ConfigError, match=key.split(".")[-1]):
                load_config(cls, None, [f"{key}={bad}"])


def test_output_dir_inside_the_data_folder_is_refused(shapes16):
    with pytest.raises(ConfigError, match="output_dir .* overlaps data.path"):
        load_config(VAEStageConfig, None, [f"data.path={shapes16}", f"output_dir={shapes16 / 'runs'}"])


def test_yaml_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"config file {broken} is not valid YAML.*line"):
        load_config(VAEStageConfig, broken)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(VAEStageConfig, tmp_path)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  max_steps: 5\ndata:\n  resolution: 16\ntrain:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice .* line 5"):
        load_config(VAEStageConfig, twice)
    with pytest.raises(ConfigError, match=r"override 'train.max_steps=\[1': the value is not valid YAML"):
        load_config(VAEStageConfig, None, ["train.max_steps=[1"])


# --------------------------------------------------------------------------------------------
# 6a, 6b: paths and Hub ids say which they are and whether they exist
# --------------------------------------------------------------------------------------------
def test_sample_model_errors_say_what_is_wrong(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "final" / "model_index.json").write_text("{}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{oops")
    cases = [("broken", "--model broken cannot be loaded: It looks like the config file at"),
             ("/nonexistent/model", "--model /nonexistent/model: this folder does not exist"),
             ("runs/unet/final", "runs/unet/final: this folder does not exist (relative to the current folder"),
             ("runs", "is not a pipeline folder (no model_index.json); did you mean runs/final?"),
             ("not an id", "neither an existing folder"),
             ("someone/absent", "is not a folder here")]
    for model, message in cases:
        with pytest.raises(SystemExit):
            cli(["sample", "--model", model, "--prompt", "x", "--out", str(tmp_path / "s.png")])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (model, err)
    assert not (tmp_path / "s.png").exists()


def test_relative_data_path_that_does_not_exist(tmp_path, monkeypatch):
    from ldm.config import DataConfig
    from ldm.data.images import load_records

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data.path ./data/shapes: this folder does not exist \(relative"):
        load_records(DataConfig(path="./data/shapes"))
    with pytest.raises(LocationError, match=r"data.path 'data/shapes' is not a folder here .* as a Hub id failed"):
        load_records(DataConfig(path="data/shapes"))  # could be a Hub dataset name: both are said
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.path .*empty: cannot read it"):
        load_records(DataConfig(path="empty"))


def test_stage_inputs_name_the_wrong_folder(tiny_vae_dir, tiny_text_dir, tmp_path):
    from ldm.models.unet import load_components

    (tmp_path / "vae_run" / "final").mkdir(parents=True)
    shutil.copy(tiny_vae_dir / "config.json", tmp_path / "vae_run" / "final" / "config.json")
    cases = [([f"vae={tmp_path / 'nope'}", f"text_encoder={tiny_text_dir}"], r"vae .*nope: this folder does not exist"),
             ([f"vae={tmp_path / 'vae_run'}", f"text_encoder={tiny_text_dir}"],
              r"vae .*vae_run is not a VAE folder \(no config.json\); did you mean .*vae_run/final\?"),
             ([f"pretrained={tmp_path / 'vae_run'}"], r"pretrained .* is not a pipeline folder \(no model_index.json\)")]
    for overrides, message in cases:
        with pytest.raises(FileNotFoundError, match=message):
            load_components(load_config(UNetStageConfig, None, overrides + [f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(ConfigError, match="output_dir .* overlaps vae"):
        load_config(UNetStageConfig, None, [f"vae={tiny_vae_dir}", f"output_dir={tiny_vae_dir.parent}"])


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    from ldm.locations import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(LocationError, match="output_dir .*file/out is not a folder this process can write to"):
        check_writable(tmp_path / "file" / "out", "output_dir")
    for out in (str(tmp_path), str(tmp_path / "grid")):  # a folder, or no image suffix
        with pytest.raises(SystemExit):
            cli(["sample", "--model", "/nonexistent", "--prompt", "x", "--out", out])
        assert "must be an image file name" in capsys.readouterr().err


def test_cache_dir_that_is_not_a_cache_is_never_replaced(tmp_path):
    from ldm.data.cache import build_cache

    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a latent cache"):
        build_cache(tmp_path, dataset=None, fp={}, encode_images=None, encode_texts=None)
    assert (tmp_path / "mine.txt").read_text() == "mine"


def test_eval_of_a_hub_id_needs_out_and_data_writes_only_new_folders(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["eval", "vae", "--model", "someone/vae", "--data", str(tmp_path)])
    assert "pass --out" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli(["data", "shapes", "--out", str(tmp_path), "--num", "2"])
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


# --------------------------------------------------------------------------------------------
# 8: a kill during rotation or a replace leaves nothing half-done; a LoRA folder without base_model
# --------------------------------------------------------------------------------------------
def test_half_deleted_checkpoints_are_cleaned_up(tmp_path, caplog):
    for step in (2, 4, 6):
        _complete(tmp_path, step)
    (tmp_path / "checkpoint-2" / "model-a.safetensors").unlink()  # killed mid-rmtree by an older version
    ckpt.rotate_checkpoints(tmp_path, limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / ".old-checkpoint-4").mkdir()  # killed mid-delete now: the leftover has a hidden name
    ckpt.rotate_checkpoints(tmp_path, limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    caplog.clear()
    assert ckpt.find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-6" and "incomplete" not in caplog.text


def test_an_interrupted_replace_restores_the_previous_folder(tmp_path):
    final = tmp_path / "final"
    (tmp_path / ".old-final").mkdir()  # killed between "final -> .old-final" and ".tmp-final -> final"
    (tmp_path / ".old-final" / "weights").write_text("previous")
    (tmp_path / ".tmp-final").mkdir()
    with pytest.raises(RuntimeError):
        with ckpt.atomic_folder(final):
            raise RuntimeError("killed again")
    assert (final / "weights").read_text() == "previous"


def test_lora_folder_without_base_model_is_a_clear_error(tmp_path):
    from ldm.sampling import load_pipeline

    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "training.json").write_text(json.dumps({"stages": []}))
    with pytest.raises(ValueError, match=r"training.json does not name its base_model.*load_lora_weights"):
        load_pipeline(tmp_path)
    (tmp_path / "training.json").unlink()
    with pytest.raises(ValueError, match="does not name its base_model"):
        load_pipeline(tmp_path)
