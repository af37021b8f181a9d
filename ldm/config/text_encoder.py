"""Stage 0's config: the CLIP towers (``model.*``) and the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ldm.config.checks import _at_least, _check, _check_map_style, _check_output_dir
from ldm.config.common import DataConfig, TrainConfig

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
