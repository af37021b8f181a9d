"""LoRA beyond attention: feed-forward layers, ResNet convolutions and the time embedding (LoCon), the text
encoder at its own learning rate; what the trainer saves loads in stock diffusers and gives the same images."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from ldm.checkpoint import load_state_dict
from ldm.config import ConfigError, LoRAConfig, UNetStageConfig, load_config
from ldm.locations import LORA_FILE
from ldm.models.unet import (LORA_MODULES, add_lora, lora_modules, parameter_groups, text_lora_modules,
                             trainable_parameters)
from ldm.sampling import load_pipeline
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from train import unet as stage2

ALL = "lora.targets=[attention,feed_forward,resnet,time_embedding]"
RUN = ["data.resolution=16", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2",
       "train.log_every=1", "train.lr_warmup_steps=0", "train.learning_rate=1e-2", "train.ema_decay=0.5",
       "validation.every=1000", "validation.steps=2"]


def _images(pipe):
    return pipe("a small pink circle in the center on a gray background", num_inference_steps=3, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _unet_and_text(tiny_pipeline_dir):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    return pipe.unet, pipe.text_encoder


def test_every_target_set_adapts_its_layers_and_only_those(tiny_pipeline_dir):
    kinds = {"attention": torch.nn.Linear, "feed_forward": torch.nn.Linear, "resnet": torch.nn.Conv2d,
             "time_embedding": torch.nn.Linear}
    for target, kind in kinds.items():
        unet, _ = _unet_and_text(tiny_pipeline_dir)
        add_lora(unet, LoRAConfig(rank=2, targets=(target,)), lora_modules(LoRAConfig(rank=2, targets=(target,))))
        adapted = {name: m for name, m in unet.named_modules() if hasattr(m, "lora_A")}
        assert adapted and all(any(name == t or name.endswith("." + t) for t in LORA_MODULES[target])
                               for name in adapted), target
        assert any(isinstance(m.base_layer, kind) for m in adapted.values()), target
    assert {n.split(".")[-1] for n in adapted} == {"linear_1", "linear_2"}  # time_embedding, last
    resnet = lora_modules(LoRAConfig(rank=2, targets=("resnet",)))
    assert "conv1" in resnet and "time_emb_proj" in resnet
    assert lora_modules(LoRAConfig(rank=2, target_modules=("attn2.to_k",))) == ("attn2.to_k",)  # replaces targets
    assert text_lora_modules(LoRAConfig(rank=2)) == ("q_proj", "k_proj", "v_proj", "out_proj")
    assert text_lora_modules(LoRAConfig(rank=2, targets=("attention", "feed_forward")))[-2:] == ("fc1", "fc2")


def test_the_text_encoder_gets_its_own_learning_rate(tiny_pipeline_dir):
    unet, text_encoder = _unet_and_text(tiny_pipeline_dir)
    lora = LoRAConfig(rank=2, targets=("attention", "resnet"), train_text_encoder=True,
                      text_encoder_learning_rate=1e-5)
    params = trainable_parameters(unet, text_encoder, lora)
    groups = parameter_groups(params, text_encoder, lora, 1e-3)
    text_ids = {id(p) for p in text_encoder.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    assert all(id(p) not in text_ids for p in groups[0]["params"]) and all(id(p) in text_ids for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(params)
    same = parameter_groups(params, text_encoder, LoRAConfig(rank=2, train_text_encoder=True), 1e-3)
    assert [g["lr"] for g in same] == [1e-3, 1e-3]
    unet, text_encoder = _unet_and_text(tiny_pipeline_dir)
    only_unet = parameter_groups(trainable_parameters(unet, text_encoder, LoRAConfig(rank=2)), text_encoder,
                                 LoRAConfig(rank=2), 1e-3)
    assert len(only_unet) == 1


@pytest.mark.parametrize("override, message", [
    ("lora.targets=[attention,convs]", r"lora.targets has unknown sets \['convs'\]; choose from"),
    ("lora.text_encoder_learning_rate=1e-5", "lora.text_encoder_learning_rate is set but lora.train_text_encoder"),
    ("lora.text_encoder_learning_rate=0", "lora.text_encoder_learning_rate must be a finite number > 0"),
    ("lora.targets=[]", "lora.targets needs at least one set"),
])
def test_bad_lora_keys_fail_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(UNetStageConfig, None, ["lora.rank=4", override])
    with pytest.raises(ConfigError, match="lora.targets and lora.target_modules are both set"):
        load_config(UNetStageConfig, None, ["lora.rank=4", "lora.targets=[resnet]", "lora.target_modules=[to_q]"])


def test_locon_lora_loads_in_stock_diffusers_and_gives_our_images(tmp_path, tiny_pipeline_dir, shapes16):
    """Rank 4, alpha 8 (scale 2) on attention, feed-forward, ResNet convs and the time embedding, and on the text
    encoder at its own rate: stock ``load_lora_weights`` gives our pipeline's images, which are the trained model's."""
    cfg = load_config(UNetStageConfig, None, RUN + [
        f"pretrained={tiny_pipeline_dir}", f"data.path={shapes16}", f"output_dir={tmp_path / 'ft'}", "lora.rank=4",
        "lora.alpha=8", ALL, "lora.train_text_encoder=true", "lora.text_encoder_learning_rate=1e-3"])
    final = stage2.main(cfg)
    keys = load_file(final / LORA_FILE).keys()
    for layer in ("resnets.0.conv1.", "conv_shortcut.", "time_emb_proj.", "time_embedding.linear_1.", "ff.net.2.",
                  "attn2.to_k.", "mlp.fc1."):
        assert any(layer in k for k in keys), layer
    checkpoint = tmp_path / "ft" / "checkpoint-2"
    optimizer = json.loads((checkpoint / "optim-unet.json").read_text())
    assert [g["lr"] for g in optimizer["param_groups"]] == [1e-2, 1e-3]

    # the trained model, rebuilt: the base with our adapters, the EMA U-Net adapters and the trained text encoder
    trained = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    add_lora(trained.unet, cfg.lora, lora_modules(cfg.lora))
    add_lora(trained.text_encoder, cfg.lora, text_lora_modules(cfg.lora))
    assert not trained.unet.load_state_dict(load_state_dict(checkpoint / "ema-unet.safetensors"), strict=False).unexpected_keys
    trained.text_encoder.load_state_dict(load_state_dict(checkpoint / "model-text_encoder.safetensors"))

    ours = load_pipeline(final)  # the base pipeline + pipe.load_lora_weights(final)
    stock = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, requires_safety_checker=False)
    stock.load_lora_weights(final)
    conv = stock.unet.down_blocks[0].resnets[0].conv1
    assert isinstance(conv.base_layer, torch.nn.Conv2d) and conv.scaling["default_0"] == 2.0  # alpha / rank
    fc1 = next(m for name, m in stock.text_encoder.named_modules() if name.endswith("layers.0.mlp.fc1"))
    assert fc1.scaling["default_0"] == 2.0
    adapted = {name for name, m in stock.unet.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {name for name, m in trained.unet.named_modules() if hasattr(m, "lora_A")}
    base = _images(LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir))
    a, b, c = _images(ours), _images(stock), _images(trained)
    assert np.allclose(a, b, atol=1e-5, rtol=0)  # stock diffusers = our pipeline with the LoRA
    assert np.allclose(a, c, atol=1e-5, rtol=0)  # = the model the trainer trained
    assert np.abs(a - base).max() > 1e-3  # and not the base model
