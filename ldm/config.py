"""Configuration: YAML -> validated frozen dataclasses, with ``--set a.b=value`` overrides.

One dataclass per concern, one stage dataclass per training stage. The dataclass fields are the
schema: an unknown or misspelled key is an error that names the key and lists the valid ones,
a value of the wrong type is an error that names the key and the expected type.

    cfg = load_config(VAEStageConfig, "configs/vae/shapes.yaml", ["train.max_steps=100"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says what to fix."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


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
        _check(self.resolution >= 8, "data.resolution", "must be >= 8")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.max_samples is None or self.max_samples > 0, "data.max_samples", "must be > 0")


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
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
        _check(self.ema_decay is None or 0 < self.ema_decay < 1, "train.ema_decay", "must be in (0, 1) or null")
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
               "train.checkpoints_total_limit", "must be >= 1 or null")


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
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        _check(not bad, "model.block_out_channels", f"{bad} not divisible by model.norm_num_groups")


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


@dataclass(frozen=True)
class VAEStageConfig:
    output_dir: str = "outputs/vae"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    model: VAEModelConfig = VAEModelConfig()
    loss: VAELossConfig = VAELossConfig()
    calibration_samples: int = 512  # images used to calibrate scaling_factor after training


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
        _check(self.eval_samples >= 0, "eval_samples", "must be >= 0")
        _check(self.eval_every >= 1, "eval_every", "must be >= 1")
        _check(all(len(group) >= 2 for group in self.hard_negatives), "hard_negatives",
               "every group needs at least 2 words to swap between")


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

    def __post_init__(self):
        _check(len(self.cross_attention) == len(self.block_out_channels), "model.cross_attention",
               "needs one entry per level of model.block_out_channels")


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule, parameterisation and loss weighting."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = 5.0  # None disables Min-SNR weighting
    offset_noise: float = 0.0
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    vlb_weight: float = 0.001  # lambda of L_hybrid when model.learned_variance

    def __post_init__(self):
        _check(0 <= self.caption_dropout < 1, "diffusion.caption_dropout", "must be in [0, 1)")
        _check(self.min_snr_gamma is None or self.min_snr_gamma > 0, "diffusion.min_snr_gamma",
               "must be > 0 or null")
        _check(not (self.zero_terminal_snr and self.prediction_type == "epsilon"), "diffusion.zero_terminal_snr",
               "needs diffusion.prediction_type v_prediction or sample: at zero terminal SNR an epsilon model "
               "cannot recover x0 at the last step (Lin et al. 2023)")
        _check(not (self.zero_terminal_snr and self.prediction_type == "sample" and self.min_snr_gamma),
               "diffusion.min_snr_gamma", "with diffusion.zero_terminal_snr and diffusion.prediction_type sample "
               "weighs the terminal step min(SNR, γ) = 0, so it is never trained: use prediction_type "
               "v_prediction (its min-SNR weight stays 1 there) or min_snr_gamma: null")


@dataclass(frozen=True)
class ValidationConfig:
    """Fixed prompts and seeds rendered by the shipping pipeline every ``every`` steps."""

    prompts: tuple[str, ...] = ("a large red circle in the center on a gray background",)
    every: int = 500
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the U-Net attention projections (rank 0 = full fine-tune)."""

    rank: int = 0
    alpha: float | None = None  # None = rank
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    train_text_encoder: bool = False


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    dir: str | None = None  # None = <output_dir>/cache


@dataclass(frozen=True)
class PushConfig:
    repo_id: str | None = None  # push <output_dir>/final here when training ends
    private: bool = False
    checkpoints_branch: str | None = None  # also push each checkpoint to this branch


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
    lora: LoRAConfig = LoRAConfig()
    cache: CacheConfig = CacheConfig()
    push: PushConfig = PushConfig()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides (YAML-parsed values)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_dotted(raw, key.strip().split("."), yaml.safe_load(value))
    return from_dict(cls, raw)


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
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint)
                       and not (hint is int and isinstance(value, bool))):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be of type {name}, got {value!r}")

