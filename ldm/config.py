"""Configuration: YAML -> validated frozen dataclasses, with ``--set a.b=value`` overrides.

One dataclass per concern, one stage dataclass per training stage. The dataclass fields are the
schema: an unknown or misspelled key is an error that names the key and lists the valid ones,
a value of the wrong type is an error that names the key and the expected type.

    cfg = load_config(VAEStageConfig, "configs/vae/shapes.yaml", ["train.max_steps=100"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ldm.errors import UserError
from ldm.locations import LocationError, check_repo_id, check_revision


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message says what to fix."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _number(key: str, value: float | None, low: float = -math.inf, high: float = math.inf, *,
            low_open: bool = False, high_open: bool = False, nullable: bool = False) -> None:
    """``value`` is a finite number in [low, high] (ends open as asked), or None when ``nullable``."""
    if value is None and nullable:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    where = ("" if low == -math.inf and high == math.inf else
             f" {'>' if low_open else '>='} {low:g}" if high == math.inf else
             f" {'<' if high_open else '<='} {high:g}" if low == -math.inf else
             f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    _check(math.isfinite(value) and above and below, key,
           f"must be a finite number{where}{' or null' if nullable else ''}, got {value!r}")


def _at_least(key: str, value: int | None, low: int, nullable: bool = False) -> None:
    if not (value is None and nullable):
        _check(value >= low, key, f"must be >= {low}{' or null' if nullable else ''}, got {value!r}")


def _divides(key: str, channels: tuple[int, ...], groups: int, groups_key: str) -> None:
    """Every entry of ``channels`` is a multiple of ``groups`` (GroupNorm, attention heads)."""
    _at_least(groups_key, groups, 1)
    bad = [c for c in channels if c % groups]
    _check(not bad, key, f"{list(bad)} not divisible by {groups_key}={groups}")


def _check_output_dir(output_dir: str, data: "DataConfig", inputs: dict[str, str | None] | None = None) -> None:
    """A stage writes (and ``train.resume=never`` moves) everything under output_dir: it must not overlap
    the data or any folder the stage reads (``inputs``: key -> local path or Hub id)."""
    _check(bool(output_dir.strip()), "output_dir", "must not be empty (it would write into the current folder)")
    out = Path(output_dir).expanduser().resolve()
    for key, value in {"data.path": data.path, **(inputs or {})}.items():
        source = Path(value).expanduser().resolve() if value else None
        if source is None or not source.exists():
            continue  # a Hub id, or a path whose absence is reported where it is read
        _check(not (out.is_relative_to(source) or source.is_relative_to(out)), "output_dir",
               f"{output_dir} overlaps {key} {value}: a run writes its checkpoints, samples and final folder under "
               f"output_dir (and --resume never moves them aside), so keep what it reads outside output_dir and "
               f"output_dir outside it")


def _check_map_style(data: "DataConfig", stage: str) -> None:
    _check(not data.streaming, "data.streaming", f"is supported by the U-Net stage only; {stage} reads the "
           "whole dataset (set data.streaming=false, and data.max_samples to use fewer examples)")


# --------------------------------------------------------------------------------------------
# Shared sections (every stage accepts these)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """Where images and captions come from and how they are turned into tensors."""

    path: str = ""  # imagefolder (with metadata.jsonl) or a dataset name for datasets.load_dataset
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 32
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    streaming: bool = False  # iterate with datasets' streaming mode (data larger than memory)
    max_samples: int | None = None  # use only the first N examples
    num_workers: int = 0
    buckets: tuple[tuple[int, int], ...] = ()  # (height, width) aspect buckets; empty = square crops

    def __post_init__(self):
        for key in ("split", "image_column", "caption_column"):
            _check(bool(getattr(self, key).strip()), f"data.{key}", "must not be empty")
        _check(self.image_column != self.caption_column, "data.caption_column", "must differ from data.image_column")
        _at_least("data.resolution", self.resolution, 8)
        _at_least("data.num_workers", self.num_workers, 0)
        _at_least("data.max_samples", self.max_samples, 1, nullable=True)
        _check(all(h >= 8 and w >= 8 for h, w in self.buckets), "data.buckets",
               f"sides must be >= 8, got {self.buckets}")
        _check(not (self.buckets and self.streaming), "data.buckets",
               "needs the map-style dataset: set data.streaming=false to bucket, or data.buckets=[]")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping shared by every stage."""

    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 32  # per process
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema_decay: float | None = 0.999  # None disables EMA
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 2
    resume: str = "latest"  # latest | never | path to a checkpoint folder
    log_every: int = 25
    image_every: int = 500  # periodic PNG grid
    gradient_checkpointing: bool = False
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite steps

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "grad_accum_steps", "checkpoint_every", "log_every",
                    "image_every", "max_nonfinite_steps"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        _check(0 <= self.seed < 2**63, "train.seed", f"must be in [0, 2**63), got {self.seed}")
        _number("train.learning_rate", self.learning_rate, 0, 1, low_open=True)
        _at_least("train.lr_warmup_steps", self.lr_warmup_steps, 0)
        _number("train.adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        _number("train.adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        _number("train.weight_decay", self.weight_decay, 0)
        _number("train.max_grad_norm", self.max_grad_norm, 0, low_open=True, nullable=True)
        _number("train.ema_decay", self.ema_decay, 0, 1, low_open=True, high_open=True, nullable=True)
        _at_least("train.checkpoints_total_limit", self.checkpoints_total_limit, 1, nullable=True)
        _check(bool(self.resume.strip()), "train.resume", "must be latest, never or a checkpoint folder")


# --------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAEModelConfig:
    """AutoencoderKL architecture. Downsampling factor f = 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_block_attention: bool = True

    def __post_init__(self):
        _check(len(self.block_out_channels) >= 1, "model.block_out_channels", "needs at least one level")
        _divides("model.block_out_channels", self.block_out_channels, self.norm_num_groups, "model.norm_num_groups")
        _at_least("model.layers_per_block", self.layers_per_block, 1)
        _at_least("model.latent_channels", self.latent_channels, 1)


@dataclass(frozen=True)
class VAELossConfig:
    """The latent-diffusion autoencoder objective (Rombach et al. 2022, App. G; Esser et al. 2021)."""

    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6  # beta
    logvar_init: float = 0.0
    perceptual_weight: float = 1.0  # LPIPS, used only when its weights are available locally
    lpips_weights: str | None = None  # path to a local LPIPS checkpoint; None = off
    disc_start: int = 10**9  # step at which the discriminator (and the GAN term) switches on
    disc_weight: float = 0.5
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_layers: int = 2
    disc_channels: int = 64
    disc_learning_rate: float | None = None  # None = train.learning_rate

    def __post_init__(self):
        for key in ("kl_weight", "perceptual_weight", "disc_weight"):
            _number(f"loss.{key}", getattr(self, key), 0)
        _number("loss.logvar_init", self.logvar_init, -30, 30)
        _check(self.lpips_weights is None or bool(self.lpips_weights.strip()), "loss.lpips_weights",
               "must be a file path or null")
        _at_least("loss.disc_start", self.disc_start, 0)
        _at_least("loss.disc_layers", self.disc_layers, 1)
        _at_least("loss.disc_channels", self.disc_channels, 1)
        _number("loss.disc_learning_rate", self.disc_learning_rate, 0, 1, low_open=True, nullable=True)


@dataclass(frozen=True)
class VAEStageConfig:
    output_dir: str = "outputs/vae"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    model: VAEModelConfig = VAEModelConfig()
    loss: VAELossConfig = VAELossConfig()
    calibration_samples: int = 512  # images used to calibrate scaling_factor after training

    def __post_init__(self):
        _check_output_dir(self.output_dir, self.data)
        _check_map_style(self.data, "the VAE stage")
        _at_least("calibration_samples", self.calibration_samples, 1)
        f = 2 ** (len(self.model.block_out_channels) - 1)  # the VAE's downsampling factor
        sides = [self.data.resolution, *(s for bucket in self.data.buckets for s in bucket)]
        _check(all(s % f == 0 for s in sides), "data.resolution",
               f"(and every data.buckets side) must be a multiple of the VAE's downsampling factor {f} = "
               f"2**(levels - 1) of model.block_out_channels, got {sides}")
        smallest = 3 * 2 ** self.loss.disc_layers  # each discriminator layer halves; its last two convs need 3 px
        _check(self.loss.disc_start >= self.train.max_steps or min(sides) >= smallest, "loss.disc_layers",
               f"({self.loss.disc_layers}) needs images of at least {smallest} px, data.resolution is "
               f"{min(sides)}: lower loss.disc_layers")


# --------------------------------------------------------------------------------------------
# Stage 0: CLIP text encoder (trained here with open_clip) or a pretrained one
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CLIPModelConfig:
    """A small open_clip CLIP: ViT image tower + causal transformer text tower."""

    embed_dim: int = 128
    vision_layers: int = 4
    vision_width: int = 128
    vision_heads: int = 4
    vision_patch_size: int = 4
    text_context_length: int = 77  # tokens per prompt, <|startoftext|> and <|endoftext|> included
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 4
    quick_gelu: bool = False
    init_temperature: float = 0.07  # softmax temperature T of the contrastive loss at step 0 (logit scale 1/T)
    layer: Literal["last", "penultimate"] = "last"  # which hidden state the U-Net is conditioned on

    def __post_init__(self):
        for key in ("embed_dim", "vision_layers", "vision_width", "vision_heads", "vision_patch_size",
                    "text_width", "text_heads", "text_layers"):
            _check(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        _check(self.text_context_length >= 3, "model.text_context_length", "must be >= 3")
        _check(0.01 <= self.init_temperature <= 1, "model.init_temperature", "must be in [0.01, 1]")
        _check(self.vision_width % self.vision_heads == 0, "model.vision_width", "must be divisible by model.vision_heads")
        _check(self.text_width % self.text_heads == 0, "model.text_width", "must be divisible by model.text_heads")
        _check(self.layer == "last" or self.text_layers >= 2, "model.layer", "'penultimate' needs model.text_layers >= 2")


@dataclass(frozen=True)
class TextEncoderStageConfig:
    output_dir: str = "outputs/text_encoder"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(learning_rate=5e-4, ema_decay=None)
    model: CLIPModelConfig = CLIPModelConfig()
    eval_samples: int = 100  # held-out image-caption pairs (the last ones) for retrieval during training
    eval_every: int = 250  # steps between held-out retrieval evaluations (and at the end)
    # Groups of interchangeable words, e.g. [[red, blue, ...], [circle, square, ...]]: each caption also
    # gets a hard negative, itself with one such word swapped for another of its group (NegCLIP).
    hard_negatives: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        _check_output_dir(self.output_dir, self.data)
        _check_map_style(self.data, "the text-encoder stage")
        _check(not self.data.buckets, "data.buckets", "must be empty for the text encoder: its ViT sees one "
               "square data.resolution")
        _check(self.data.resolution % self.model.vision_patch_size == 0, "model.vision_patch_size",
               f"({self.model.vision_patch_size}) must divide data.resolution ({self.data.resolution})")
        _at_least("eval_samples", self.eval_samples, 0)
        _at_least("eval_every", self.eval_every, 1)
        _check(all(len(group) >= 2 for group in self.hard_negatives), "hard_negatives",
               "every group needs at least 2 words to swap between")
        _check(all(word.strip() for group in self.hard_negatives for word in group), "hard_negatives",
               "words must not be empty")


# --------------------------------------------------------------------------------------------
# Stage 2: latent U-Net
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetModelConfig:
    """UNet2DConditionModel architecture; cross-attention at the levels marked True."""

    block_out_channels: tuple[int, ...] = (64, 128)
    cross_attention: tuple[bool, ...] = (False, True)
    layers_per_block: int = 2
    attention_heads: int = 4  # per transformer block (diffusers calls this `attention_head_dim`)
    transformer_layers: int = 1
    norm_num_groups: int = 32
    learned_variance: bool = False  # Improved DDPM: also predict the variance interpolation
    # Pooled text conditioning (GLIDE, Imagen, SDXL): the text states, attention-pooled, are added to the
    # timestep embedding of every ResNet block beside cross-attention (diffusers addition_embed_type="text")
    pooled_text: bool = False

    def __post_init__(self):
        _check(len(self.cross_attention) == len(self.block_out_channels), "model.cross_attention",
               "needs one entry per level of model.block_out_channels")
        _check(len(self.block_out_channels) >= 1, "model.block_out_channels", "needs at least one level")
        _divides("model.block_out_channels", self.block_out_channels, self.norm_num_groups, "model.norm_num_groups")
        for key in ("layers_per_block", "attention_heads", "transformer_layers"):
            _at_least(f"model.{key}", getattr(self, key), 1)


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule, parameterisation and loss weighting."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = 5.0  # γ of loss_weighting min_snr; None disables the weighting
    loss_weighting: Literal["min_snr", "debiased"] = "min_snr"  # debiased: 1/√SNR (Yu et al. 2024)
    # How training draws t: uniform over {0..T-1}; logit_normal, t/T = sigmoid(N(loc, scale²)) (SD3);
    # laplace, log SNR(t) ~ Laplace(loc, scale) (Hang et al. 2024). See ldm.losses.diffusion.sample_timesteps.
    timestep_sampling: Literal["uniform", "logit_normal", "laplace"] = "uniform"
    timestep_loc: float = 0.0
    timestep_scale: float = 1.0
    offset_noise: float = 0.0
    immiscible_noise: bool = False  # assign the batch's noise to latents by minimum distance (Li et al. 2024)
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    vlb_weight: float = 0.001  # lambda of L_hybrid when model.learned_variance

    def __post_init__(self):
        _at_least("diffusion.num_train_timesteps", self.num_train_timesteps, 2)
        _number("diffusion.beta_start", self.beta_start, 0, 1, low_open=True, high_open=True)
        _number("diffusion.beta_end", self.beta_end, 0, 1, low_open=True, high_open=True)
        _check(self.beta_start < self.beta_end, "diffusion.beta_end", f"must be > diffusion.beta_start "
               f"({self.beta_end:g} <= {self.beta_start:g})")
        _number("diffusion.caption_dropout", self.caption_dropout, 0, 1, high_open=True)
        _number("diffusion.min_snr_gamma", self.min_snr_gamma, 0, low_open=True, nullable=True)
        _number("diffusion.offset_noise", self.offset_noise, 0)
        _number("diffusion.timestep_loc", self.timestep_loc, -20, 20)
        _number("diffusion.timestep_scale", self.timestep_scale, 0, 20, low_open=True)
        _number("diffusion.vlb_weight", self.vlb_weight, 0)
        _check(not (self.zero_terminal_snr and self.prediction_type == "epsilon"), "diffusion.zero_terminal_snr",
               "needs diffusion.prediction_type v_prediction or sample: at zero terminal SNR an epsilon model "
               "cannot recover x0 at the last step (Lin et al. 2023)")
        _check(not (self.zero_terminal_snr and self.prediction_type == "sample" and self.min_snr_gamma),
               "diffusion.min_snr_gamma", "with diffusion.zero_terminal_snr and diffusion.prediction_type sample "
               "weighs the terminal step min(SNR, γ) = 0, so it is never trained: use prediction_type "
               "v_prediction (its min-SNR weight stays 1 there) or min_snr_gamma: null")


@dataclass(frozen=True)
class ValidationConfig:
    """Every ``every`` steps: fixed prompts and seeds rendered by the shipping pipeline, and (with ``data``)
    the held-out validation loss on fixed latents, timesteps and noise (``ldm.evaluation.heldout``)."""

    prompts: tuple[str, ...] = ("a large red circle in the center on a gray background",)
    every: int = 500
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0  # also seeds the validation loss's fixed noise
    data: str | None = None  # held-out imagefolder or dataset name for the validation loss; None = no loss
    loss_samples: int = 64  # its first N examples, encoded once at the start
    loss_timesteps: int = 8  # K timesteps spread evenly over [0, T) at which each example is noised

    def __post_init__(self):
        _check(len(self.prompts) >= 1, "validation.prompts", "needs at least one prompt")
        _at_least("validation.every", self.every, 1)
        _at_least("validation.steps", self.steps, 1)
        _number("validation.guidance_scale", self.guidance_scale, 0)
        _check(0 <= self.seed < 2**63, "validation.seed", f"must be in [0, 2**63), got {self.seed}")
        _at_least("validation.loss_samples", self.loss_samples, 1)
        _at_least("validation.loss_timesteps", self.loss_timesteps, 1)


@dataclass(frozen=True)
class EMAConfig:
    """Power-function EMAs tracked for post-hoc EMA (Karras et al. 2024, EDM2 §3): ``ldm ema`` rebuilds any σ_rel."""

    posthoc_sigma_rels: tuple[float, ...] = ()  # σ_rel of the tracked averages, e.g. [0.05, 0.10]; empty = off
    snapshot_every: int = 100  # steps between snapshots in <output_dir>/ema-snapshots (and at the last step)

    def __post_init__(self):
        for i, sigma_rel in enumerate(self.posthoc_sigma_rels):  # above 0.2886 is wider than a uniform average
            _number(f"ema.posthoc_sigma_rels[{i}]", sigma_rel, 0, 0.2886, low_open=True, high_open=True)
        _check(len(set(self.posthoc_sigma_rels)) == len(self.posthoc_sigma_rels), "ema.posthoc_sigma_rels",
               f"values must be distinct, got {list(self.posthoc_sigma_rels)}")
        _at_least("ema.snapshot_every", self.snapshot_every, 1)


LORA_TARGET_SETS = ("attention", "feed_forward", "resnet", "time_embedding")  # module names: ldm.models.unet


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA (W + (alpha / rank)·B·A) on sets of U-Net layers, through peft (rank 0 = full fine-tune).

    targets: attention (to_q/k/v/out), feed_forward (the transformer blocks' MLPs), resnet (the ResNet blocks'
    3x3 and shortcut convolutions and their time-embedding projections: LoCon), time_embedding (its two
    linear layers). feed_forward also adds the text encoder's MLPs when it is trained."""

    rank: int = 0
    alpha: float | None = None  # None = rank
    targets: tuple[str, ...] = ("attention",)
    target_modules: tuple[str, ...] = ()  # explicit peft module names that replace `targets`, e.g. [attn2.to_k]
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None  # the text encoder's own rate; None = train.learning_rate

    def __post_init__(self):
        _at_least("lora.rank", self.rank, 0)
        _number("lora.alpha", self.alpha, 0, low_open=True, nullable=True)
        unknown = [t for t in self.targets if t not in LORA_TARGET_SETS]
        _check(not unknown, "lora.targets", f"has unknown sets {unknown}; choose from {list(LORA_TARGET_SETS)}")
        _check(not self.target_modules or self.targets == ("attention",), "lora.targets",
               "and lora.target_modules are both set: target_modules (module names) replaces targets; keep one")
        _check(self.rank == 0 or bool(self.targets or self.target_modules), "lora.targets",
               "needs at least one set (or lora.target_modules at least one module)")
        _number("lora.text_encoder_learning_rate", self.text_encoder_learning_rate, 0, low_open=True, nullable=True)
        _check(self.text_encoder_learning_rate is None or self.train_text_encoder, "lora.text_encoder_learning_rate",
               "is set but lora.train_text_encoder is false (set it to true, or remove the rate)")


@dataclass(frozen=True)
class AlignConfig:
    """Representation alignment (REPA, Yu et al. 2024): λ·L_REPA pulls a projection of the U-Net's
    middle-block features towards a frozen image encoder's patch features of the clean image
    (``ldm.models.alignment``), for the first ``steps`` optimizer steps (HASTE)."""

    weight: float = 0.0  # λ; 0 = off
    steps: int | None = None  # align for the first `steps` optimizer steps only; null = the whole run
    encoder: str | None = None  # open_clip folder or MODEL:WEIGHTS; null = the stage-0 CLIP beside text_encoder
    projector_width: int = 256

    def __post_init__(self):
        _number("align.weight", self.weight, 0)
        _at_least("align.steps", self.steps, 1, nullable=True)
        _at_least("align.projector_width", self.projector_width, 1)
        _check(self.encoder is None or bool(self.encoder.strip()), "align.encoder", "must be a folder or null")
        if self.encoder and not Path(self.encoder, "open_clip_config.json").is_file():
            name, _, weights = self.encoder.partition(":")
            _check(bool(weights) and Path(weights).expanduser().is_file(), "align.encoder",
                   f"{self.encoder!r} is neither an open_clip folder (with open_clip_config.json) nor "
                   "MODEL:WEIGHTS with a local weights file: random features would teach nothing")


@dataclass(frozen=True)
class DreamBoothConfig:
    """DreamBooth (Ruiz et al. 2023): a few instance images under one identifier prompt, with prior preservation
    on class images the base pipeline generates for the class prompt (``ldm.dreambooth``). Off while
    ``instance_data`` is null; on, it replaces ``data.path`` as the training data."""

    instance_data: str | None = None  # folder of the subject's images (captions, if any, are ignored)
    instance_prompt: str = ""  # the identifier prompt, e.g. "a large red sks circle in the center on a gray background"
    prior_preservation: bool = True
    class_prompt: str = ""  # the same prompt without the identifier, e.g. "a large red circle in the ..."
    # what else the base model should keep knowing: a .txt (one prompt per line) or an imagefolder (its captions);
    # then every other class image is generated (and trained on) with one of these prompts instead
    prior_prompts: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0  # λ in L = L_instance + λ·L_class
    class_data: str | None = None  # None = <output_dir>/class_images; missing images are generated there
    class_steps: int = 20  # DPM-Solver++ steps, guidance and first seed of the generated class images
    class_guidance: float = 5.0
    class_seed: int = 0

    def __post_init__(self):
        _at_least("dreambooth.num_class_images", self.num_class_images, 1)
        _number("dreambooth.prior_loss_weight", self.prior_loss_weight, 0)
        _check(self.prior_prompts is None or bool(self.prior_prompts.strip()), "dreambooth.prior_prompts",
               "must be a .txt file (one prompt per line), an imagefolder with metadata.jsonl, or null")
        _check(self.prior_prompts is None or self.prior_preservation, "dreambooth.prior_prompts",
               "is set but dreambooth.prior_preservation is false (set it to true, or remove the prompts)")
        _check(self.class_data is None or bool(self.class_data.strip()), "dreambooth.class_data",
               "must be a folder or null")
        _at_least("dreambooth.class_steps", self.class_steps, 1)
        _number("dreambooth.class_guidance", self.class_guidance, 0)
        _check(0 <= self.class_seed < 2**63, "dreambooth.class_seed", f"must be in [0, 2**63), got {self.class_seed}")
        if self.instance_data is None:
            return
        _check(bool(self.instance_data.strip()), "dreambooth.instance_data", "must be a folder of images or null")
        _check(bool(self.instance_prompt.strip()), "dreambooth.instance_prompt",
               "must name the subject with an identifier, e.g. 'a sks circle'")
        _check(not self.prior_preservation or bool(self.class_prompt.strip()), "dreambooth.class_prompt",
               "is needed with dreambooth.prior_preservation (the instance prompt without its identifier, e.g. "
               "'a circle'), or set dreambooth.prior_preservation=false")
        _check(self.class_prompt.strip() != self.instance_prompt.strip(), "dreambooth.class_prompt",
               "must differ from dreambooth.instance_prompt (the identifier is what tells them apart)")


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    dir: str | None = None  # None = <output_dir>/cache; on a filesystem every process (machine) sees
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage of moments and text states
    shard_size: int = 1024  # examples per shard file; shards are split among the building processes
    in_memory: bool = False  # load every shard at start (small caches); default: rows read from disk

    def __post_init__(self):
        _check(self.dir is None or bool(self.dir.strip()), "cache.dir", "must be a folder or null")
        _at_least("cache.shard_size", self.shard_size, 1)


@dataclass(frozen=True)
class PushConfig:
    repo_id: str | None = None  # push <output_dir>/final here when training ends
    private: bool = False
    checkpoints_branch: str | None = None  # also push each checkpoint to this branch

    def __post_init__(self):
        try:
            if self.repo_id is not None:
                check_repo_id(self.repo_id, "push.repo_id")
            if self.checkpoints_branch is not None:
                check_revision(self.checkpoints_branch, "push.checkpoints_branch")
        except LocationError as err:
            raise ConfigError(str(err)) from None
        _check(self.repo_id is not None or self.checkpoints_branch is None, "push.checkpoints_branch",
               "needs push.repo_id")


@dataclass(frozen=True)
class UNetStageConfig:
    output_dir: str = "outputs/unet"
    pretrained: str | None = None  # diffusers pipeline folder or Hub id to start from (fine-tuning)
    vae: str | None = None  # saved VAE folder (stage 1); ignored when `pretrained` is set
    text_encoder: str | None = None  # folder/Hub id with text_encoder/ + tokenizer/; ignored with `pretrained`
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    model: UNetModelConfig = UNetModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    validation: ValidationConfig = ValidationConfig()
    ema: EMAConfig = EMAConfig()
    lora: LoRAConfig = LoRAConfig()
    cache: CacheConfig = CacheConfig()
    push: PushConfig = PushConfig()
    dreambooth: DreamBoothConfig = DreamBoothConfig()
    align: AlignConfig = AlignConfig()

    def __post_init__(self):
        _check_output_dir(self.output_dir, self.data, {"pretrained": self.pretrained, "vae": self.vae,
                                                       "text_encoder": self.text_encoder,
                                                       "validation.data": self.validation.data,
                                                       "dreambooth.instance_data": self.dreambooth.instance_data})
        if self.dreambooth.instance_data is not None:
            _check(bool(self.pretrained), "dreambooth.instance_data", "needs `pretrained`: DreamBooth fine-tunes a "
                   "pipeline (and generates its class images with it)")
            _check(not self.data.path, "data.path", "must be empty with dreambooth.instance_data (the instance "
                   "and class images are the training data)")
            _check(not self.data.streaming and not self.data.buckets, "data.streaming",
                   "and data.buckets are not supported with dreambooth: its images are square data.resolution")
        for key in ("pretrained", "vae", "text_encoder"):
            value = getattr(self, key)
            _check(value is None or bool(value.strip()), key, "must be a folder, a Hub id or null")
        _check(not self.align.weight or (not self.data.streaming and self.dreambooth.instance_data is None
                                         and self.data.crop != "random"),
               "align.weight", "> 0 needs an image folder the targets are computed for once, before training: "
               "not data.streaming, dreambooth or data.crop=random (or align.weight=0)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides (YAML-parsed values)."""
    raw = {} if path is None else _read_yaml(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_first_line(err)}); quote it, "
                              f"e.g. --set '{key.strip()}=\"{value}\"'") from None
        _set_dotted(raw, key.strip().split("."), parsed)
    return from_dict(cls, raw)


def _read_yaml(path: Path) -> dict:
    """The mapping in a YAML config file; every failure names the file (and the line, for syntax errors)."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a .yaml file (see configs/)")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as stream:  # YAML's error marks then name the file and line
            raw = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(raw).__name__}")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one section "
                                                        f"(the first would be ignored)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    """Recursively build dataclass ``cls`` from ``raw``; unknown keys and wrong types are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'{hint}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {name: _coerce(hints[name], raw[name], prefix + name) for name in names if name in raw}
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - dataclass signature mismatch is a bug
        raise ConfigError(str(err)) from err


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples as lists) for YAML/JSON dumps and logging."""
    def plain(x):
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        raw = raw.setdefault(key, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
    raw[keys[-1]] = value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``hint``; convert lists to tuples and ints to floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item_types = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(item_types) != len(value):
            raise ConfigError(f"{key} must have {len(item_types)} items, got {value!r}")
        return tuple(_coerce(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:  # YAML reads 1e-4 as a string, and 1 as an int
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if number is not None:
            return number
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint)
                       and not (hint is int and isinstance(value, bool))):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be of type {name}, got {value!r}")

