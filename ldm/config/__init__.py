"""Configuration: YAML -> validated frozen dataclasses, with ``--set a.b=value`` overrides.

One dataclass per concern, one stage dataclass per training stage. The dataclass fields are the
schema: an unknown or misspelled key is an error that names the key and lists the valid ones,
a value of the wrong type is an error that names the key and the expected type.

    cfg = load_config(VAEStageConfig, "configs/vae/shapes.yaml", ["train.max_steps=100"])

The package, one module per concern (every name is re-exported here, so ``from ldm.config import X`` works):
    checks.py        ConfigError and the validators the sections use
    loader.py        load_config, from_dict, to_dict, save_config (YAML + overrides -> dataclass)
    common.py        DataConfig, TrainConfig: the sections every stage accepts
    vae.py           stage 1: VAEModelConfig, VAELossConfig, VAEStageConfig
    text_encoder.py  stage 0: CLIPModelConfig, TextEncoderStageConfig
    unet.py          stage 2: UNetModelConfig, DiffusionConfig, ValidationConfig, EMAConfig, LoRAConfig,
                     AlignConfig, DreamBoothConfig, CacheConfig, PushConfig, UNetStageConfig
"""

from ldm.config.checks import ConfigError
from ldm.config.common import DataConfig, TrainConfig
from ldm.config.loader import _set_dotted, from_dict, load_config, save_config, to_dict
from ldm.config.text_encoder import CLIPModelConfig, TextEncoderStageConfig
from ldm.config.unet import (LORA_TARGET_SETS, AlignConfig, CacheConfig, DiffusionConfig, DreamBoothConfig, EMAConfig,
                             LoRAConfig, PushConfig, UNetModelConfig, UNetStageConfig, ValidationConfig)
from ldm.config.vae import VAELossConfig, VAEModelConfig, VAEStageConfig

__all__ = ["ConfigError", "DataConfig", "TrainConfig", "from_dict", "load_config", "save_config", "to_dict",
           "_set_dotted", "CLIPModelConfig", "TextEncoderStageConfig", "LORA_TARGET_SETS", "AlignConfig",
           "CacheConfig", "DiffusionConfig", "DreamBoothConfig", "EMAConfig", "LoRAConfig", "PushConfig",
           "UNetModelConfig", "UNetStageConfig", "ValidationConfig", "VAELossConfig", "VAEModelConfig",
           "VAEStageConfig"]
