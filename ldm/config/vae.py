"""Stage 1's config: the KL-VAE (``model.*``), its objective (``loss.*``) and the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ldm.config.checks import _at_least, _check, _check_map_style, _check_output_dir, _divides, _number
from ldm.config.common import DataConfig, TrainConfig

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
