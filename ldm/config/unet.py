"""Stage 2's config: the U-Net (``model.*``), diffusion, validation, EMA, LoRA, alignment, DreamBooth, cache,
push, and the stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ldm.config.checks import ConfigError, _at_least, _check, _check_output_dir, _divides, _number
from ldm.config.common import DataConfig, TrainConfig
from ldm.locations import LocationError, check_repo_id, check_revision

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
