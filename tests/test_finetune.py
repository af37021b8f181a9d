"""Fine-tuning: LoRA that stock diffusers loads, SD-1.x-style starting points, text-encoder training,
streaming and webdataset data, aspect-ratio buckets."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from PIL import Image

from ldm.checkpoint import load_state_dict
from ldm.config import UNetStageConfig, load_config
from ldm.sampling import load_pipeline
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from train import unet as stage2

FINETUNE = ["data.resolution=16", "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=4",
            "train.log_every=1", "train.lr_warmup_steps=0", "train.learning_rate=1e-2", "train.ema_decay=0.5",
            "validation.every=1000", "validation.steps=2"]


def _finetune(tmp_path, base, data, *extra):
    cfg = load_config(UNetStageConfig, None, FINETUNE + [f"pretrained={base}", f"data.path={data}",
                                                          f"output_dir={tmp_path / 'ft'}", *extra])
    return stage2.main(cfg)


def _images(pipe, **kw):
    return pipe("a small pink circle in the center on a gray background", num_inference_steps=3, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def test_lora_file_loads_in_stock_diffusers_and_reproduces_the_fine_tuned_model(tmp_path, tiny_pipeline_dir,
                                                                                shapes16):
    final = _finetune(tmp_path, tiny_pipeline_dir, shapes16, "lora.rank=4")
    assert sorted(p.name for p in final.iterdir()) == ["pytorch_lora_weights.safetensors", "training.json"]
    assert json.loads((final / "training.json").read_text())["base_model"] == str(tiny_pipeline_dir)

    ours = load_pipeline(final)  # base + adapters
    stock = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, requires_safety_checker=False)
    stock.load_lora_weights(final)
    base = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    a, b, c = _images(ours), _images(stock), _images(base)
    assert np.abs(a - b).max() <= 1e-4 and np.abs(a - c).max() > 1e-3  # same model, and not the base model

    # the adapters that stock diffusers applies are the EMA adapters of the last checkpoint
    ema = load_state_dict(tmp_path / "ft" / "checkpoint-4" / "ema-unet.safetensors")
    applied = {k.replace(".default_0.", ".default."): v for k, v in stock.unet.named_parameters()}
    assert ema and all("lora_" in k for k in ema)  # only the adapters were trained
    assert all(torch.allclose(applied[k], v, atol=1e-6) for k, v in ema.items())


def test_lora_with_text_encoder_training(tmp_path, tiny_pipeline_dir, shapes16):
    final = _finetune(tmp_path, tiny_pipeline_dir, shapes16, "lora.rank=2", "lora.train_text_encoder=true")
    from safetensors.torch import load_file

    keys = load_file(final / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    stock = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, requires_safety_checker=False)
    before = stock.text_encoder(torch.tensor([[49406, 320, 49407]]))[0]
    stock.load_lora_weights(final)
    after = stock.text_encoder(torch.tensor([[49406, 320, 49407]]))[0]
    assert not torch.allclose(before, after)


def test_full_fine_tune_from_an_sd1_style_folder(tmp_path, tiny_pipeline_dir, shapes16):
    sd = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, requires_safety_checker=False)
    sd.scheduler = PNDMScheduler.from_config(sd.scheduler.config)  # SD-1.x folders ship PNDM
    sd.save_pretrained(tmp_path / "sd1")
    assert json.loads((tmp_path / "sd1" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    final = _finetune(tmp_path, tmp_path / "sd1", shapes16, "train.ema_decay=null")
    tuned = LatentDiffusionPipeline.from_pretrained(final)
    before = StableDiffusionPipeline.from_pretrained(tmp_path / "sd1").unet.state_dict()
    after = tuned.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert tuned.scheduler.config.num_train_timesteps == sd.scheduler.config.num_train_timesteps
    summary = json.loads((final / "training.json").read_text())
    assert summary["base_model"] == str(tmp_path / "sd1") and summary["stages"][-1]["steps"] == 4


def _webdataset(folder, num=12):
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for i in range(num):
            for ext, payload in (("png", _png((i * 20 % 255, 40, 90), 20, 16)), ("txt", f"sample {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder


def _png(colour, width, height):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_streaming_runs_train_and_resume(tmp_path, tiny_pipeline_dir, shapes16, source):
    data = shapes16 if source == "imagefolder" else _webdataset(tmp_path / "wds")
    columns = [] if source == "imagefolder" else ["data.image_column=png", "data.caption_column=txt"]
    final = _finetune(tmp_path, tiny_pipeline_dir, data, "data.streaming=true", "train.max_steps=3",
                      "train.checkpoint_every=3", *columns)
    assert (final / "model_index.json").exists()
    resumed = stage2.main(load_config(UNetStageConfig, None, FINETUNE + [
        f"pretrained={tiny_pipeline_dir}", f"data.path={data}", f"output_dir={tmp_path / 'ft'}",
        "data.streaming=true", "train.max_steps=5", *columns]))
    trainer = json.loads((tmp_path / "ft" / "checkpoint-5" / "trainer.json").read_text())
    assert trainer["step"] == 5 and trainer["batches"] == 5 and resumed.exists()


def test_bucketed_mixed_size_run(tmp_path, tiny_pipeline_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = [(16, 16), (32, 16), (16, 32), (30, 18)]  # (width, height); the last one goes to the wide bucket
    with open(folder / "metadata.jsonl", "w") as meta:
        for i in range(24):
            w, h = sizes[i % 4]
            Image.new("RGB", (w, h), (i * 10, 100, 200)).save(folder / f"{i:03d}.png")
            meta.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {w}x{h} picture"}) + "\n")
    final = _finetune(tmp_path, tiny_pipeline_dir, folder, "data.buckets=[[16,16],[16,32],[32,16]]")
    cache = tmp_path / "ft" / "cache"
    assert sorted(p.name for p in cache.glob("bucket-*")) == ["bucket-16x16", "bucket-16x32", "bucket-32x16"]
    from safetensors.torch import load_file
    wide = load_file(next((cache / "bucket-16x32").glob("*.safetensors")))
    assert wide["mean"].shape[1:] == (4, 4, 8) and len(wide["index"]) == 12
    assert (final / "model_index.json").exists()
    with pytest.raises(ValueError, match="multiples of 8"):
        _finetune(tmp_path / "bad", tiny_pipeline_dir, folder, "data.buckets=[[16,20]]")
