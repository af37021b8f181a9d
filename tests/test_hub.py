"""Publishing: the dry-run release folder loads with the shipped pipeline file; its card is complete; no token leaks."""

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ldm.cli import main as cli
from ldm.config import UNetStageConfig, load_config
from train import unet as stage2

# A token-shaped random string made at run time (no token-like literal in the source): it must reach no file or log.
FAKE_TOKEN = "_".join(["hf", "fake" + secrets.token_hex(16)])


@pytest.fixture
def trained(unet_overrides, tmp_path):
    final = stage2.main(load_config(UNetStageConfig, None, unet_overrides))
    (final / "metrics").mkdir()
    (final / "metrics" / "pipeline.json").write_text(json.dumps({"accuracy": 0.875, "bits_per_dim": 1.25}))
    return final


def test_dry_run_release_loads_with_the_shipped_pipeline_file_and_has_a_full_card(trained, capsys):
    cli(["push", "--model", str(trained), "--repo-id", "someone/tiny-ldm", "--dry-run"])
    release = Path(capsys.readouterr().out.strip().splitlines()[-1])
    files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    assert {"README.md", "model_index.json", "pipeline_latent_diffusion.py", "samples.png", "training.json",
            "unet/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"} <= set(files)
    assert not [f for f in files if f.startswith(("checkpoint", "cache", "logs", "metrics")) or "optim" in f
                or f.endswith((".bin", ".pt", ".pkl"))]
    index = json.loads((release / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionPipeline"  # a string: the installed class needs no remote code

    card = ModelCard.load(release / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "text-to-image" in card.data.tags and card.data.license
    assert "![samples](samples.png)" in card.text and "0.875" in card.text and "1.25" in card.text
    assert "trust_remote_code=True" in card.text and "revision=" in card.text and "| unet |" in card.text

    script = ("import sys, torch; from diffusers import DiffusionPipeline\n"
              "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline='pipeline_latent_diffusion',"
              " trust_remote_code=True)\n"
              "img = pipe('a red circle', num_inference_steps=2, output_type='np',"
              " generator=torch.Generator().manual_seed(0)).images\n"
              "print(type(pipe).__name__, img.shape)")
    fresh = subprocess.run([sys.executable, "-c", script, str(release)], capture_output=True, text=True,
                           env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(release.parent)},
                           cwd=release.parent)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.strip().endswith("LatentDiffusionPipeline (1, 16, 16, 3)")


class FakeApi:
    calls: list = []

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        FakeApi.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        paths = [p for p in Path(kw["folder_path"]).rglob("*") if p.is_file()]  # a temporary folder: read it now
        leaked = [p.name for p in paths if FAKE_TOKEN.encode() in p.read_bytes()]
        FakeApi.calls.append(("upload_folder", kw["repo_id"], {**kw, "files": sorted(p.name for p in paths),
                                                               "leaked": leaked}))


def test_push_and_training_push_never_leak_the_token(unet_overrides, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr("ldm.hub.HfApi", FakeApi)
    FakeApi.calls.clear()
    caplog.set_level("DEBUG")
    cfg = load_config(UNetStageConfig, None, unet_overrides + ["push.repo_id=someone/tiny", "push.private=true",
                                                               "push.checkpoints_branch=checkpoints"])
    final = stage2.main(cfg)
    cli(["push", "--model", str(final), "--repo-id", "someone/tiny", "--revision", "v1"])
    kinds = [(c[0], c[2].get("revision") or c[2].get("branch")) for c in FakeApi.calls]
    assert ("upload_folder", "checkpoints") in kinds and ("upload_folder", None) in kinds
    assert ("create_branch", "v1") in kinds and ("upload_folder", "v1") in kinds
    privacy = [c[2].get("private") for c in FakeApi.calls if c[0] == "create_repo"]
    assert privacy[:-1] and all(privacy[:-1]) and privacy[-1] is False  # training pushes private, the CLI did not
    uploads = [c for c in FakeApi.calls if c[0] == "upload_folder"]
    assert all("README.md" in c[2]["files"] and "token" not in c[2] and not c[2]["leaked"] for c in uploads)
    out = capsys.readouterr()
    assert FAKE_TOKEN not in caplog.text + out.out + out.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_push_refuses_folders_that_are_not_models(tmp_path, capsys):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "model-unet.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_info:
        cli(["push", "--model", str(tmp_path / "checkpoint-4"), "--repo-id", "a/b", "--dry-run"])
    assert exit_info.value.code == 2 and "neither a pipeline folder" in capsys.readouterr().err


def test_model_card_summarises_the_validation_history_by_its_last_value():
    from ldm.hub import _summary_rows

    history = [{"step": 2, "val_loss": 0.5}, {"step": 4, "val_loss": 0.25}]
    rows = _summary_rows({"stages": [{"stage": "unet", "steps": 4, "val_loss": history}]})
    assert rows == [("unet", "steps: 4, final val_loss: 0.25")]


def _strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_a_release_publishes_no_local_path(trained, tiny_vae_dir, tmp_path, monkeypatch):
    """training.json, the component configs and the card name no folder of the machine that trained the model:
    a path inside the model folder becomes relative to it, any other its last component; Hub ids stay."""
    from ldm.hub import assemble_release

    real_home, home = Path.home(), tmp_path / "home" / "alice-ldm"
    monkeypatch.setenv("HOME", str(home))
    summary = json.loads((trained / "training.json").read_text())
    summary["stages"].insert(0, {"stage": "vae", "steps": 3, "data": f"{home}/photos/holiday 2026"})
    summary["config"]["pretrained"] = "~/models/base"
    summary |= {"base_model": "someone/base-model", "datasets": ["someone/photos"],
                "note": f"latents from {home}/cache/latents (copied to C:\\Users\\alice-ldm\\cache)"}
    (trained / "training.json").write_text(json.dumps(summary))
    config = json.loads((trained / "unet" / "config.json").read_text())
    (trained / "unet" / "config.json").write_text(json.dumps(config | {"_name_or_path": str(trained / "unet")}))
    metrics = json.loads((trained / "metrics" / "pipeline.json").read_text())
    (trained / "metrics" / "pipeline.json").write_text(json.dumps(metrics | {"features": f"open_clip in {home}/clip"}))

    release = assemble_release(trained, tmp_path / "release", repo_id="someone/tiny-ldm")
    texts = {p.relative_to(release).as_posix(): p.read_text() for p in release.rglob("*")
             if p.suffix in (".json", ".md", ".py", ".txt")}
    assert {"training.json", "README.md", "unet/config.json", "vae/config.json"} <= texts.keys()
    for name, text in texts.items():
        for leak in (str(tmp_path), "/tmp/", f"{real_home}/", "alice-ldm", "/home/", "C:\\", "~/"):
            assert leak not in text, (name, leak)
    for name in (n for n in texts if n.endswith(".json") and n not in ("tokenizer/tokenizer.json",
                                                                        "tokenizer/vocab.json")):
        assert not [s for s in _strings(json.loads(texts[name])) if s.startswith(("/", "~", "\\"))], name
    published = json.loads(texts["training.json"])
    assert published["config"]["output_dir"] == "unet" and published["config"]["vae"] == tiny_vae_dir.name
    assert published["config"]["pretrained"] == "base" and published["stages"][0]["data"] == "holiday 2026"
    assert published["note"] == "latents from latents (copied to cache)"
    assert published["base_model"] == "someone/base-model" and published["datasets"] == ["someone/photos"]
    assert published["config"]["validation"]["prompts"] == summary["config"]["validation"]["prompts"]
    assert json.loads(texts["unet/config.json"])["_name_or_path"] == "unet"  # inside the model: relative
    assert json.loads(texts["vae/config.json"])["_name_or_path"] == tiny_vae_dir.name
    assert "data: holiday 2026" in texts["README.md"] and "open_clip in clip" in texts["README.md"]
    assert "base_model: someone/base-model" in texts["README.md"]
    assert (release / "tokenizer" / "tokenizer.json").read_bytes() == (trained / "tokenizer" /
                                                                       "tokenizer.json").read_bytes()
