"""Accelerate plumbing shared by every training stage.

The stage scripts in ``train/`` keep the training step visible; everything they share lives
here: the Accelerator, per-example random streams, the non-finite guard, the LR schedule, exact
checkpoints (see ``ldm.checkpoint``; they also hold the EMAs of ``ldm.ema``) and image grids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler

from ldm import checkpoint as ckpt
from ldm.config import TrainConfig, to_dict
from ldm.locations import check_writable

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------
# Accelerator and logging
# --------------------------------------------------------------------------------------------
def make_accelerator(output_dir: str, train: TrainConfig, config=None) -> Accelerator:
    """An Accelerator for ``train.mixed_precision`` with TensorBoard logs in ``<output_dir>/logs``."""
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 (works on CPU) or no")
    if train.resume != "never":
        ckpt.check_stage_folders(output_dir)
    check_writable(output_dir, "output_dir")
    project = ProjectConfiguration(project_dir=output_dir, logging_dir=str(Path(output_dir) / "logs"))
    # Stages may run one after another in one process (ldm demo, tests) with other precisions:
    # forget the previous stage's settings but keep the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=train.mixed_precision, log_with="tensorboard",
                              project_config=project)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(f"launched as {world} processes but accelerate initialised a single one; on CPU set "
                           f"ACCELERATE_USE_CPU=1 (torchrun) so the processes train together")
    setup_logging(accelerator)
    if accelerator.is_main_process:
        ckpt.lock_output_dir(output_dir)
    if train.resume == "never" and accelerator.is_main_process:  # before the logs of this run are opened
        ckpt.set_aside_previous_run(output_dir)
    accelerator.wait_for_everyone()
    if config is not None:
        accelerator.init_trackers("ldm", config=_flat_scalars(to_dict(config)))
    return accelerator


def setup_logging(accelerator: Accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:  # leave handlers an application (or pytest) installed alone
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(level)
    for noisy in ("diffusers", "transformers", "datasets", "accelerate", "PIL", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_batch_geometry(accelerator: Accelerator, train: TrainConfig) -> int:
    """Log and return the effective batch: per device x processes x accumulation steps."""
    effective = train.batch_size * accelerator.num_processes * train.grad_accum_steps
    logger.info("effective batch %d = %d per device x %d process(es) x %d accumulation step(s); lr %g",
                effective, train.batch_size, accelerator.num_processes, train.grad_accum_steps, train.learning_rate)
    return effective


def _flat_scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flat_scalars(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------
class ExampleRNG:
    """One random stream per example, seeded by its ``example_seed`` (see ``ldm.data.sampler``).

    Draw k of example i depends on nothing but i's seed and k, so results do not depend on the
    batch split across processes, on accumulation, or on where a run was resumed.
    """

    def __init__(self, seeds: torch.Tensor, salt: int = 0x5EED):
        self.generators = [torch.Generator().manual_seed((int(s) ^ salt) & (2**63 - 1)) for s in seeds]

    def randn(self, shape: tuple[int, ...], device=None) -> torch.Tensor:
        """(B, *shape) standard normal."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device)

    def rand(self, device=None) -> torch.Tensor:
        """(B,) uniform in [0, 1)."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(device)

    def randint(self, high: int, device=None) -> torch.Tensor:
        """(B,) integers in [0, high)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators]).to(device)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed the global RNGs (dropout and the like) from (seed, step, rank) at every step."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]
    torch.manual_seed(int(state))


# --------------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------------
def make_optimizer(params, train: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW(lr = ``lr`` or train.learning_rate, β = (train.adam_beta1, train.adam_beta2), train.weight_decay):
    every stage's optimizer (Loshchilov & Hutter 2019). ``params``: parameters or groups; a group's own
    ``lr``/``weight_decay`` override these defaults (stage 0 decays matrices only, stage 2 gives LoRA's text
    encoder its own rate)."""
    return torch.optim.AdamW(params, lr=train.learning_rate if lr is None else lr,
                             betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.weight_decay)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    """LR warm-up then constant / cosine / linear decay over ``train.max_steps`` optimizer steps."""
    name = {"constant": "constant_with_warmup"}.get(train.lr_schedule, train.lr_schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=train.lr_warmup_steps,
                         num_training_steps=train.max_steps)


@contextlib.contextmanager
def gradient_sync(accelerator: Accelerator, models: list, sync: bool):
    """Inside: backward passes all-reduce gradients only when ``sync`` (the last micro-batch)."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield


def grad_norm_and_clip(accelerator: Accelerator, params, max_norm: float | None) -> torch.Tensor:
    """Total gradient norm (after unscaling), clipping to ``max_norm`` when set."""
    params = [p for p in params if p.grad is not None]
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    # DeepSpeed clips inside its engine and returns None: the loss alone then guards against NaN
    return torch.zeros((), device=accelerator.device) if norm is None else norm


@dataclass
class TrainerState:
    """Bookkeeping saved in every checkpoint (``trainer.json``)."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    batches: int = 0  # global micro-batches consumed: the data position
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    data_digest: str = ""  # running hash of the example seeds seen, to prove identical data order
    world_size: int = 1
    batch_size: int = 0
    grad_accum_steps: int = 1
    extra: dict = field(default_factory=dict)

    def see(self, seeds: torch.Tensor) -> None:
        self.data_digest = hashlib.sha256((self.data_digest + ",".join(map(str, seeds.tolist()))).encode()).hexdigest()


def finite_or_skip(state: TrainerState, finite: bool, limit: int, what: str = "loss or gradient") -> bool:
    """Count a non-finite step; raise after ``limit`` in a row. Returns whether to apply the update."""
    if finite:
        state.consecutive_skips = 0
        return True
    state.skipped += 1
    state.consecutive_skips += 1
    logger.warning("step %d: non-finite %s, update skipped (%d in a row, %d in total)",
                   state.step, what, state.consecutive_skips, state.skipped)
    if state.consecutive_skips >= limit:
        raise NonFiniteTrainingError(
            f"{state.consecutive_skips} consecutive steps had a non-finite {what} (limit "
            f"train.max_nonfinite_steps={limit}). Check: the learning rate (lower it or add warm-up), "
            f"fp16 overflow (try bf16), corrupt inputs or latents, and the loss weights; then resume "
            f"from the last checkpoint.")
    return False


def apply_update(accelerator: Accelerator, state: "TrainerState", opt, scheduler, params, loss: torch.Tensor,
                 train: TrainConfig, what: str = "") -> torch.Tensor | None:
    """Clip, then step the optimizer and its LR schedule unless the step is non-finite.

    Returns the gradient norm, or None when the update was skipped. Under fp16 a non-finite
    gradient is the grad scaler's overflow signal: the optimizer still steps (the scaler skips
    it and lowers its scale) and nothing is counted; a non-finite loss always counts.
    """
    norm = grad_norm_and_clip(accelerator, params, train.max_grad_norm)
    overflow_ok = accelerator.mixed_precision == "fp16"
    finite = bool(torch.isfinite(loss)) and (overflow_ok or bool(torch.isfinite(norm)))
    applied = finite_or_skip(state, finite, train.max_nonfinite_steps, f"{what} loss or gradient".lstrip())
    if applied:
        opt.step()
        scheduler.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach() if applied else None


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores everything a stage trains, atomically and without pickle.

    Under FSDP or DeepSpeed the weights and optimizer states are sharded across processes; they are
    then written by ``accelerator.save_state`` (safetensors weights; optimizer shards read back with
    ``weights_only=True``) into ``accelerate/`` inside the same atomic checkpoint folder.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str, train: TrainConfig, models: dict,
                 optimizers: dict, schedulers: dict, emas: dict | None = None):
        self.accelerator, self.output_dir, self.train = accelerator, Path(output_dir), train
        self.models, self.optimizers, self.schedulers, self.emas = models, optimizers, schedulers, emas or {}
        self.sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.sharded and self.emas and accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("train.ema_decay or ema.posthoc_sigma_rels with FSDP: the EMA would average "
                             "parameter shards; use DDP or DeepSpeed ZeRO-2 (configs/accelerate/), or set "
                             "train.ema_decay=null and ema.posthoc_sigma_rels=[]")

    def save(self, state: TrainerState) -> Path:
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{state.step}"
        tmp = self.output_dir / f".tmp-checkpoint-{state.step}"
        model_states = {} if self.sharded else {n: acc.get_state_dict(m) for n, m in self.models.items()}
        if acc.is_main_process:
            ckpt.fresh_folder(tmp)
        acc.wait_for_everyone()
        if self.sharded:
            acc.save_state(str(tmp / "accelerate"), safe_serialization=True)  # collective
        tensors, other = ckpt.rng_state()
        ckpt.save_state_dict(tmp / f"rng-{acc.process_index}.safetensors", tensors)
        ckpt.save_json(tmp / f"rng-{acc.process_index}.json", other)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._write_main(tmp, state, model_states)
            ckpt.commit_checkpoint(tmp, final)
            ckpt.rotate_checkpoints(self.output_dir, self.train.checkpoints_total_limit)
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _write_main(self, tmp: Path, state: TrainerState, model_states: dict) -> None:
        for name, sd in model_states.items():
            ckpt.save_state_dict(tmp / f"model-{name}.safetensors", sd)
        for name, ema in self.emas.items():
            ckpt.save_state_dict(tmp / f"ema-{name}.safetensors", ema.state_dict())
        for name, opt in ({} if self.sharded else self.optimizers).items():
            ckpt.save_optimizer(tmp, name, opt.optimizer if hasattr(opt, "optimizer") else opt)
        scalars = {n: s.state_dict() for n, s in self.schedulers.items()}
        if self.accelerator.scaler is not None:
            scalars["grad_scaler"] = {k: (v.item() if torch.is_tensor(v) else v)
                                      for k, v in self.accelerator.scaler.state_dict().items()}
        ckpt.save_json(tmp / "schedulers.json", scalars)
        ckpt.save_json(tmp / "trainer.json", asdict(state))

    def resume(self, state: TrainerState) -> Path | None:
        """Load the checkpoint chosen by ``train.resume`` into the models and ``state``."""
        folder = ckpt.find_checkpoint(self.output_dir, self.train.resume)
        if folder is None:
            return None
        acc = self.accelerator
        saved = TrainerState(**ckpt.load_json(folder / "trainer.json"))
        self._check_geometry(saved, folder)
        if self.sharded:
            acc.load_state(str(folder / "accelerate"))
        else:
            for name, model in self.models.items():
                ckpt.check_architecture(folder, name, acc.unwrap_model(model))
            for name, model in self.models.items():
                acc.unwrap_model(model).load_state_dict(ckpt.load_state_dict(folder / f"model-{name}.safetensors"))
            for name, opt in self.optimizers.items():
                ckpt.load_optimizer(folder, name, opt.optimizer if hasattr(opt, "optimizer") else opt)
        for name, ema in self.emas.items():
            path = folder / f"ema-{name}.safetensors"
            if not path.exists():
                raise FileNotFoundError(f"cannot resume {folder}: it has no {path.name} (that EMA was off when it "
                                        f"was saved); keep the EMA settings of that run, or start a new output_dir")
            ema.load_state_dict(ckpt.load_state_dict(path))
        scalars = ckpt.load_json(folder / "schedulers.json")
        for name, sched in self.schedulers.items():
            sched.load_state_dict(scalars[name])
        if acc.scaler is not None and "grad_scaler" in scalars:
            acc.scaler.load_state_dict(scalars["grad_scaler"])
        rng = folder / f"rng-{acc.process_index}.safetensors"
        if rng.exists():
            ckpt.set_rng_state(ckpt.load_state_dict(rng), ckpt.load_json(rng.with_suffix(".json")))
        for key, value in asdict(saved).items():
            setattr(state, key, value)
        logger.info("resumed from %s at step %d", folder, state.step)
        return folder

    def _check_geometry(self, saved: TrainerState, folder: Path) -> None:
        acc, train = self.accelerator, self.train
        now = (train.batch_size * acc.num_processes, train.grad_accum_steps)
        then = (saved.batch_size * saved.world_size, saved.grad_accum_steps)
        if now != then:
            raise ValueError(
                f"cannot resume {folder}: it was trained with {saved.world_size} process(es) x batch "
                f"{saved.batch_size} x {saved.grad_accum_steps} accumulation step(s), this run has "
                f"{acc.num_processes} x {train.batch_size} x {train.grad_accum_steps}. Keep processes x "
                f"train.batch_size and train.grad_accum_steps equal to continue the same data order exactly, "
                f"or start a new output_dir (or --resume never, which moves this run to "
                f"{self.output_dir / ckpt.PREVIOUS}/).")


def new_state(accelerator: Accelerator, train: TrainConfig) -> TrainerState:
    return TrainerState(world_size=accelerator.num_processes, batch_size=train.batch_size,
                        grad_accum_steps=train.grad_accum_steps)


def write_summary(folder: Path, stage: str, cfg, state: TrainerState, accelerator: Accelerator, seconds: float,
                  previous: list = (), base_model: str | None = None, extra: dict | None = None) -> Path:
    """``training.json``: the summaries of the folders this stage started from, then this stage's own.

    The model card (``ldm.hub``) is written from it; it holds no secrets (paths and numbers only).
    """
    stages: list[dict] = []
    for source in dict.fromkeys(previous):  # unique, in order
        path = Path(source) / "training.json"
        if path.exists():
            stages += [s for s in json.loads(path.read_text())["stages"] if s not in stages]
    train, data = cfg.train, cfg.data
    stages.append({"stage": stage, "steps": state.step, "skipped_steps": state.skipped,
                   "effective_batch": train.batch_size * accelerator.num_processes * train.grad_accum_steps,
                   "learning_rate": train.learning_rate, "resolution": data.resolution, "data": data.path,
                   "mixed_precision": train.mixed_precision, "minutes": round(seconds / 60, 1), **(extra or {})})
    hub_data = [] if Path(data.path).exists() else [data.path]
    summary = {"stages": stages, "base_model": base_model, "datasets": hub_data, "config": to_dict(cfg)}
    (Path(folder) / "training.json").write_text(json.dumps(summary, indent=1))
    return Path(folder) / "training.json"
