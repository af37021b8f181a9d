"""Sections every stage accepts: ``data.*`` and ``train.*``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ldm.config.checks import _at_least, _check, _number

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
