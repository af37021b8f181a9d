"""Shared test setup: offline, quiet, deterministic; a per-session datasets cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other processes for the two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    """Keep `datasets`' arrow cache out of the user's home directory."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    yield


# --------------------------------------------------------------------------------------------
# Tiny stage-1/stage-0 outputs and data, shared by the stage-2, resume and hub tests
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shapes16(tmp_path_factory):
    """48 captioned shapes images at 16 px."""
    from ldm.data.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes16"), num=48, size=16, seed=0)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A random f=4 AutoencoderKL folder (as stage 1 would save it, with a calibrated-looking scale)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.9)
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A random 2-layer CLIPTextModel + the real CLIP tokenizer (16-token context), pipeline layout."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.text import build_clip_tokenizer, save_text_encoder

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                            vocab_size=49408, max_position_embeddings=32, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=0)
    folder = tmp_path_factory.mktemp("tiny_text")
    save_text_encoder(folder, CLIPTextModel(config), build_clip_tokenizer(32))
    return folder


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory):
    """A random open_clip CLIP folder as stage 0 saves it (16 px images, 8 px patches: a 2x2 patch grid)."""
    import torch

    from ldm.config import CLIPModelConfig
    from ldm.models.text import build_open_clip, open_clip_config, save_open_clip

    config = open_clip_config(CLIPModelConfig(embed_dim=16, vision_layers=1, vision_width=32, vision_heads=2,
                                              vision_patch_size=8, text_context_length=16, text_width=32,
                                              text_heads=2, text_layers=1), 16)
    torch.manual_seed(0)
    return save_open_clip(tmp_path_factory.mktemp("tiny_clip") / "open_clip", build_open_clip(config), config)


@pytest.fixture
def unet_overrides(shapes16, tiny_vae_dir, tiny_text_dir, tmp_path):
    """`--set` overrides for a seconds-long stage-2 run on the tiny components."""
    return [f"data.path={shapes16}", f"vae={tiny_vae_dir}", f"text_encoder={tiny_text_dir}",
            f"output_dir={tmp_path / 'unet'}", "data.resolution=16", "model.block_out_channels=[16,32]",
            "model.cross_attention=[false,true]", "model.layers_per_block=1", "model.norm_num_groups=8",
            "model.attention_heads=2", "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=2",
            "train.log_every=1", "train.lr_warmup_steps=0", "train.learning_rate=1e-3", "train.ema_decay=0.9",
            "validation.every=1000", "validation.steps=2", "train.seed=3",
            "align.weight=0"]  # configs/unet/shapes.yaml aligns to a stage-0 CLIP, which the tiny encoder lacks


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, tiny_vae_dir, tiny_text_dir):
    """A random tiny pipeline folder as stage 2 saves it (the starting point of fine-tuning tests)."""
    import torch
    from diffusers import AutoencoderKL

    from ldm.config import DiffusionConfig, UNetModelConfig
    from ldm.models.text import load_text_encoder
    from ldm.models.unet import build_noise_scheduler, build_unet
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    torch.manual_seed(0)
    text_encoder, tokenizer = load_text_encoder(tiny_text_dir)
    unet = build_unet(UNetModelConfig(block_out_channels=(16, 32), cross_attention=(False, True), layers_per_block=1,
                                      norm_num_groups=8, attention_heads=2), 4, 4, 32)
    pipe = LatentDiffusionPipeline(vae=AutoencoderKL.from_pretrained(tiny_vae_dir), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet,
                                   scheduler=build_noise_scheduler(DiffusionConfig(), learned_variance=False))
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipe.save_pretrained(folder)
    return folder
