"""The latent U-Net (diffusers ``UNet2DConditionModel``), its noise schedule, LoRA adapters, and the
stage-2 components: loaded from the stage 1 / stage 0 folders or from a pipeline to fine-tune,
and saved as one ``LatentDiffusionPipeline`` folder.
"""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

from ldm.config import DiffusionConfig, LoRAConfig, UNetModelConfig, UNetStageConfig
from ldm.locations import model_location
from ldm.models.text import load_text_encoder

logger = logging.getLogger(__name__)


def build_unet(model: UNetModelConfig, sample_size: int, latent_channels: int,
               cross_attention_dim: int) -> UNet2DConditionModel:
    """A U-Net over (latent_channels, sample_size, sample_size) latents, cross-attending to text.

    With ``model.learned_variance`` it outputs 2 x latent_channels: the prediction and the
    Improved-DDPM variance interpolation v (see ``ldm.losses.diffusion``). With ``model.pooled_text``
    the text states c are also pooled, e = LayerNorm(W · AttentionPool(LayerNorm(c))), and added to the
    timestep embedding (diffusers' ``addition_embed_type="text"``, GLIDE §2.3): the saved config carries
    it, so stock ``StableDiffusionPipeline`` runs the same U-Net with no extra inputs.
    """
    if model.pooled_text and cross_attention_dim % model.attention_heads:
        raise ValueError(f"model.pooled_text pools the text states with model.attention_heads={model.attention_heads} "
                         f"heads, which must divide the text width {cross_attention_dim}")
    pooled = {"addition_embed_type": "text", "addition_embed_type_num_heads": model.attention_heads}
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in model.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(model.cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels * (2 if model.learned_variance else 1),
        block_out_channels=model.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=model.layers_per_block,
        attention_head_dim=model.attention_heads,  # diffusers' legacy name: it is the number of heads
        transformer_layers_per_block=model.transformer_layers,
        norm_num_groups=model.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        **(pooled if model.pooled_text else {}),
    )


def build_noise_scheduler(diffusion: DiffusionConfig, learned_variance: bool) -> DDPMScheduler:
    """The training schedule; saved with the pipeline, so every sampler built from it agrees."""
    return DDPMScheduler(
        num_train_timesteps=diffusion.num_train_timesteps,
        beta_schedule=diffusion.beta_schedule,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        prediction_type=diffusion.prediction_type,
        rescale_betas_zero_snr=diffusion.zero_terminal_snr,
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=False,
        timestep_spacing="trailing" if diffusion.zero_terminal_snr else "leading",
        steps_offset=0 if diffusion.zero_terminal_snr else 1,
    )


# lora.targets -> the peft target names (module-name suffixes) of those layers in UNet2DConditionModel
LORA_MODULES: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),  # self- and cross-attention projections
    "feed_forward": ("ff.net.0.proj", "ff.net.2"),  # the transformer blocks' GEGLU MLP
    "resnet": ("conv1", "conv2", "conv_shortcut", "time_emb_proj"),  # LoCon: 3x3 convs, 1x1 shortcuts, t-proj
    "time_embedding": ("time_embedding.linear_1", "time_embedding.linear_2"),
}
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIPTextModel attention
TEXT_FEED_FORWARD = ("fc1", "fc2")  # CLIPTextModel MLP (with lora.targets' feed_forward)


def lora_modules(lora: LoRAConfig) -> tuple[str, ...]:
    """The U-Net layers LoRA adapts: ``lora.target_modules`` when given, else the union of ``lora.targets``' sets."""
    if lora.target_modules:
        return tuple(lora.target_modules)
    return tuple(dict.fromkeys(m for target in lora.targets for m in LORA_MODULES[target]))


def text_lora_modules(lora: LoRAConfig) -> tuple[str, ...]:
    """The text encoder's adapted layers: its attention, and its MLP too when ``lora.targets`` has feed_forward."""
    return TEXT_LORA_TARGETS + (TEXT_FEED_FORWARD if "feed_forward" in lora.targets and not lora.target_modules
                                else ())


def lora_config(lora: LoRAConfig, target_modules: tuple[str, ...]):
    """peft's ``LoraConfig``: ΔW = (alpha / rank)·B·A on ``target_modules`` (Linear and Conv2d layers alike)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


def add_lora(model: torch.nn.Module, lora: LoRAConfig, target_modules: tuple[str, ...]) -> list:
    """Freeze ``model`` and attach LoRA adapters to ``target_modules``; returns the adapter weights.

    peft's own ``inject_adapter_in_model`` is used for every model (not transformers' or diffusers'
    ``add_adapter`` wrappers): transformers >= 5.24 refuses its wrapper with peft < 0.22, while peft's
    API has been stable since 0.6. ``get_peft_model_state_dict`` reads the adapters back for saving.
    """
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(lora, target_modules), model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"LoRA target modules {list(target_modules)} matched no layer of {type(model).__name__}")
    return params


@dataclass
class Components:
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler  # the training formulation of the noise schedule


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """The VAE's real downsampling factor f = 2^(levels − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_components(cfg: UNetStageConfig) -> Components:
    """Frozen VAE and text encoder, the U-Net to train and its schedule (new, or from ``cfg.pretrained``)."""
    if not cfg.pretrained and cfg.lora.rank > 0:
        raise ValueError("lora.rank > 0 trains adapters for a base model: set `pretrained` to the pipeline "
                         "folder or Hub id to adapt (or lora.rank=0 to train a new U-Net)")
    vae, text_encoder, tokenizer = load_frozen_encoders(cfg)
    if cfg.pretrained:
        src = cfg.pretrained
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(src, subfolder="scheduler"))
        logger.info("fine-tuning %s: its noise schedule (%s, %s) is used; diffusion.* schedule keys are ignored",
                    src, scheduler.config.beta_schedule, scheduler.config.prediction_type)
    else:
        unet = build_unet(cfg.model, cfg.data.resolution // vae_scale_factor(vae), vae.config.latent_channels,
                          text_encoder.config.hidden_size)
        scheduler = build_noise_scheduler(cfg.diffusion, cfg.model.learned_variance)
    return Components(vae, text_encoder, tokenizer, unet, scheduler)


def load_frozen_encoders(cfg: UNetStageConfig):
    """(vae, text_encoder, tokenizer) of a stage-2 config, frozen and in eval mode: from ``cfg.pretrained``,
    or from ``cfg.vae`` + ``cfg.text_encoder`` (what the latent cache needs; no U-Net is built)."""
    for key, marker, what in (("pretrained", "model_index.json", "pipeline"), ("vae", "config.json", "VAE"),
                              ("text_encoder", None, "text encoder")):
        if getattr(cfg, key) and (key == "pretrained" or not cfg.pretrained):
            model_location(getattr(cfg, key), key, marker, what)  # a clear error for a wrong folder or id
    if cfg.pretrained:
        vae = AutoencoderKL.from_pretrained(cfg.pretrained, subfolder="vae")
        text_encoder, tokenizer = load_text_encoder(cfg.pretrained)
    else:
        for key in ("vae", "text_encoder"):
            if not getattr(cfg, key):
                raise ValueError(f"set `{key}` to the folder stage {1 if key == 'vae' else 0} saved (or set "
                                 f"`pretrained` to a pipeline folder to fine-tune)")
        vae = AutoencoderKL.from_pretrained(cfg.vae)
        text_encoder, tokenizer = load_text_encoder(cfg.text_encoder)
        f = vae_scale_factor(vae)
        if cfg.data.resolution % f:
            raise ValueError(f"data.resolution {cfg.data.resolution} is not a multiple of the VAE's downsampling "
                             f"factor {f}")
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    return vae, text_encoder, tokenizer


def trainable_parameters(unet: UNet2DConditionModel, text_encoder, lora: LoRAConfig) -> list:
    """What the optimizer updates: the whole U-Net or its LoRA adapters, plus (optionally) the text encoder
    or its LoRA adapters. Everything else is frozen."""
    params = add_lora(unet, lora, lora_modules(lora)) if lora.rank > 0 else list(unet.parameters())
    if lora.train_text_encoder:
        text_encoder.train()
        if lora.rank > 0:
            params += add_lora(text_encoder, lora, text_lora_modules(lora))
        else:
            params += list(text_encoder.requires_grad_(True).parameters())
    return params


def parameter_groups(params: list, text_encoder, lora: LoRAConfig, learning_rate: float) -> list[dict]:
    """The optimizer's groups: the U-Net's trained weights at ``learning_rate``; the text encoder's (when it is
    trained) at ``lora.text_encoder_learning_rate``, or at ``learning_rate`` when that is null."""
    text = {id(p) for p in text_encoder.parameters()}
    groups = [{"params": [p for p in params if id(p) not in text], "lr": learning_rate}]
    text_params = [p for p in params if id(p) in text]
    if text_params:
        groups.append({"params": text_params, "lr": lora.text_encoder_learning_rate or learning_rate})
    return groups


def make_pipeline(parts: Components, unet: UNet2DConditionModel, scheduler):
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(folder: Path, parts: Components, unet: UNet2DConditionModel, ema, cfg: UNetStageConfig) -> Path:
    """Write the stage's result: a pipeline folder (EMA U-Net, DPM-Solver++ on the training schedule as
    the default sampler), or with LoRA only ``pytorch_lora_weights.safetensors`` for the base pipeline."""
    unet = copy.deepcopy(unet).to("cpu")
    if ema is not None:
        ema.copy_to(unet)
    text_encoder = parts.text_encoder
    sampler = DPMSolverMultistepScheduler.from_config(parts.scheduler.config, algorithm_type="dpmsolver++")
    pipe = make_pipeline(parts, unet, sampler)  # safetensors copies device tensors to the host itself
    if cfg.lora.rank > 0:
        from peft.utils import get_peft_model_state_dict

        lora, text = cfg.lora, cfg.lora.train_text_encoder
        # peft's own key names (lora_A / lora_B), not convert_state_dict_to_diffusers': that renames only the
        # attention layers (lora.down / lora.up), and load_lora_weights, which tells the format by the first key
        # alone, would then drop either those or the conv / feed-forward / time-embedding adapters. The adapters'
        # peft config (rank, alpha, targets) goes into the file's metadata, so load_lora_weights builds exactly
        # these adapters (without it, it would take alpha = rank)
        pipe.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                               text_encoder_lora_layers=get_peft_model_state_dict(text_encoder) if text else None,
                               safe_serialization=True,
                               unet_lora_adapter_metadata=lora_config(lora, lora_modules(lora)).to_dict(),
                               text_encoder_lora_adapter_metadata=(lora_config(lora, text_lora_modules(lora)).to_dict()
                                                                   if text else None))
    else:
        pipe.save_pretrained(folder, safe_serialization=True)
        copy_open_clip(cfg.pretrained or cfg.text_encoder, folder)
    return folder


def copy_open_clip(source: str | None, folder: Path) -> None:
    """Keep the whole stage-0 CLIP beside the pipeline (``open_clip/``, when ``source`` has one): its image
    tower is the feature space in which ``ldm eval pipeline`` measures FD, KID and CLIP score."""
    clip = Path(source) / "open_clip" if source else None
    if clip is not None and (clip / "open_clip_config.json").is_file():
        shutil.copytree(clip, Path(folder) / "open_clip", dirs_exist_ok=True)
