"""Moving averages of the weights: the classic EMA, and the power-function EMA with post-hoc reconstruction.

Power-function EMA and post-hoc EMA follow Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models" (EDM2), §3 and App. C. Symbols:

    t        optimizer steps taken; θ_t is the iterate after update t (t = 1, 2, ...)
    γ        exponent of the averaging profile p_t(τ) = (γ + 1) τ^γ / t^(γ+1) on 0 < τ ≤ t   (eq. 121)
    σ_rel    the profile's standard deviation relative to t; the length of the average  (eq. 123)
    θ̂_t     the average: θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t, β_t = (1 − 1/t)^(γ+1)         (eq. 127)

Unrolled, that update weighs θ_τ by (τ^(γ+1) − (τ − 1)^(γ+1)) / t^(γ+1) = ∫_{τ−1}^{τ} p_t: the discrete
average *is* the continuous profile applied to the path that holds θ_τ on (τ − 1, τ]. So the closed-form
inner products of profiles (eq. 151) are exact for snapshots, and any σ_rel can be rebuilt after training
as a least-squares combination of snapshots of two tracked σ_rel values (App. C.3, Algorithm 3).

Files: the trainer keeps each tracked average's state in its checkpoints (``ema-unet-phema``), and
every ``ema.snapshot_every`` steps writes ``<output_dir>/ema-snapshots/step-<t>-sigma-<σ_rel>.safetensors``
(fp32, metadata: step, gamma, sigma_rel). Snapshots outlive checkpoint rotation.
``ldm ema --model OUT --sigma-rel X`` writes ``OUT/posthoc-ema-<X>``: ``OUT/final`` with the rebuilt U-Net.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
SNAPSHOTS = "ema-snapshots"  # folder under a stage's output_dir
MAX_SIGMA_REL = math.sqrt(1 / 12)  # σ_rel at γ = 0 (a uniform average); larger values need γ < 0


# --------------------------------------------------------------------------------------------
# Classic EMA
# --------------------------------------------------------------------------------------------
class EMA:
    """θ_ema ← β_t θ_ema + (1 − β_t) θ, with β_t = min(β, (1 + t) / (10 + t)) (warm-up as in diffusers)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        beta = min(self.decay, (1 + step) / (10 + step))
        params = [p.detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1.0 - beta)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in zip(self.names, self.shadow):
            params[name].copy_(value)

    @contextlib.contextmanager
    def applied_to(self, model: torch.nn.Module):
        """Inside: ``model`` holds the EMA weights; its own weights are restored on exit."""
        params = dict(model.named_parameters())
        backup = [params[n].detach().clone() for n in self.names]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in zip(self.names, backup):
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...")
        self.shadow = [state[n].float().clone() for n in self.names]

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self


# --------------------------------------------------------------------------------------------
# Power-function EMA: the math (pure functions)
# --------------------------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3)))  (EDM2, eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ = the largest root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0  (EDM2, eq. 126 and Algorithm 2).

    That cubic is eq. 123 squared and multiplied out. With u = σ_rel⁻² ≥ 12, γ = y − 7/3 turns it into
    y³ + p y + q = 0 with p = −u − 1/3 < 0, q = 4u/3 + 2/27, which has three real roots; the largest is
    Viète's y = 2√(−p/3) cos(⅓ arccos((3q / 2p) √(−3/p))).
    """
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}); got {sigma_rel}")
    u = sigma_rel ** -2
    p, q = -u - 1 / 3, 4 * u / 3 + 2 / 27
    cosine = max(-1.0, min(1.0, 3 * q / (2 * p) * math.sqrt(-3 / p)))
    return 2 * math.sqrt(-p / 3) * math.cos(math.acos(cosine) / 3) - 7 / 3


def power_ema_beta(t: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ + 1)  (EDM2, eq. 127 with one step per unit of time); β_1 = 0."""
    if t < 1:
        raise ValueError(f"the power-function EMA counts steps from t = 1; got t = {t}")
    return (1 - 1 / t) ** (gamma + 1)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """⟨p_a, p_b⟩ = (γa + 1)(γb + 1) t_min^(γa+γb+1) / ((γa + γb + 1) t_a^(γa+1) t_b^(γb+1))  (EDM2, eq. 151).

    ∫_0^{min(t_a, t_b)} p_a(τ) p_b(τ) dτ for the profiles of eq. 121; array arguments broadcast. Written
    with ratios ≤ 1, (t_min / t_a)^(γa+1) (t_min / t_b)^(γb+1) / t_min, so large t and γ do not overflow.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    t_min = np.minimum(t_a, t_b)
    ratio = (t_min / t_a) ** (gamma_a + 1) * (t_min / t_b) ** (gamma_b + 1) / t_min
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * ratio


def posthoc_coefficients(t_in, gamma_in, t_out: float, gamma_out) -> tuple[np.ndarray, np.ndarray]:
    """x = argmin ‖Σ_i x_i p_i − p_out‖² = A⁻¹ b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_out⟩, then x / Σx  (EDM2, Alg. 3).

    Inputs: the snapshots' steps and exponents (n,), the output step and exponents (m,). Returns the
    coefficients (n, m), each column summing to 1 (the rebuilt average keeps the weights' scale), and the
    fit's relative error ‖Σ x_i p_i − p_out‖ / ‖p_out‖ per output (m,): how well the snapshots span it.
    """
    t_in, gamma_in = np.broadcast_arrays(np.asarray(t_in, np.float64), np.asarray(gamma_in, np.float64))
    gamma_out = np.atleast_1d(np.asarray(gamma_out, np.float64))
    A = profile_dot(t_in[:, None], gamma_in[:, None], t_in[None, :], gamma_in[None, :])  # (n, n)
    b = profile_dot(t_in[:, None], gamma_in[:, None], t_out, gamma_out[None, :])  # (n, m)
    x = np.linalg.lstsq(A, b, rcond=None)[0]  # = solve(A, b); least squares stays finite if A is singular
    x = x / x.sum(axis=0, keepdims=True)
    out_norm = profile_dot(t_out, gamma_out, t_out, gamma_out)  # (m,)
    residual = np.einsum("im,ij,jm->m", x, A, x) - 2 * np.einsum("im,im->m", x, b) + out_norm
    return x, np.sqrt(np.maximum(residual, 0) / out_norm)


# --------------------------------------------------------------------------------------------
# Power-function EMA: tracking and snapshots during training
# --------------------------------------------------------------------------------------------
class PowerEMA:
    """Power-function EMAs of a model's trainable weights for several σ_rel (EDM2, §3.1), and their snapshots.

    Call ``update(model, t)`` once per optimizer step, skipped steps included (θ_t = θ_{t−1} then), so
    that t counts time as the profiles do.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: tuple[float, ...], folder: str | Path):
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.folder = Path(folder)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadows = [[p.detach().float().clone() for p in model.parameters() if p.requires_grad]
                        for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, t: int) -> None:
        params = [p.detach().float() for p in model.parameters() if p.requires_grad]
        for gamma, shadow in zip(self.gammas, self.shadows):
            torch._foreach_lerp_(shadow, params, 1.0 - power_ema_beta(t, gamma))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{s!r}/{n}": v for s, shadow in zip(self.sigma_rels, self.shadows) for n, v in zip(self.names, shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in (f"{s!r}/{n}" for s in self.sigma_rels for n in self.names) if k not in state]
        if missing:
            saved = sorted({k.split("/", 1)[0] for k in state})
            raise KeyError(f"the checkpoint's power-function EMAs track sigma_rel {saved}, this run "
                           f"ema.posthoc_sigma_rels={list(self.sigma_rels)} (first missing: {missing[0]}); keep "
                           f"the same values to resume, or start a new output_dir")
        self.shadows = [[state[f"{s!r}/{n}"].float().clone() for n in self.names] for s in self.sigma_rels]

    def to(self, device) -> "PowerEMA":
        self.shadows = [[v.to(device) for v in shadow] for shadow in self.shadows]
        return self

    def save_snapshots(self, step: int) -> list[Path]:
        """Write each tracked average at ``step`` (atomically: temporary file, fsync, rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for sigma_rel, gamma, shadow in zip(self.sigma_rels, self.gammas, self.shadows):
            path = self.folder / f"step-{step:09d}-sigma-{sigma_rel:.4f}.safetensors"
            tmp = path.with_name(f".tmp-{path.name}")
            save_file({n: v.detach().cpu().contiguous() for n, v in zip(self.names, shadow)}, str(tmp),
                      metadata={"step": str(step), "gamma": repr(gamma), "sigma_rel": repr(sigma_rel)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            paths.append(path)
        return paths

    def drop_snapshots_after(self, step: int) -> None:
        """Delete snapshots newer than ``step``: a killed run's future, which this run recomputes."""
        stale = [s for s in list_snapshots(self.folder) if s.step > step]
        for snap in stale:
            snap.path.unlink()
        if stale:
            logger.info("removed %d EMA snapshot(s) newer than step %d from %s", len(stale), step, self.folder)


# --------------------------------------------------------------------------------------------
# Post-hoc reconstruction
# --------------------------------------------------------------------------------------------
class Snapshot(NamedTuple):
    path: Path
    step: int
    gamma: float
    sigma_rel: float


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in ``folder``, read from their metadata, ordered by (step, γ)."""
    found = []
    for path in sorted(Path(folder).glob("step-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        found.append(Snapshot(path, int(meta["step"]), float(meta["gamma"]), float(meta["sigma_rel"])))
    return sorted(found, key=lambda s: (s.step, s.gamma))


def reconstruct(folder: str | Path, sigma_rels: list[float], step: int | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], int, np.ndarray]:
    """θ̂(σ_rel) = Σ_i x_i θ̂_i over the snapshots up to ``step`` (default: the last), for each σ_rel.

    Returns the weights per σ_rel (fp32, accumulated in fp64), the step and the fits' relative errors.
    One pass over the snapshot files, however many σ_rel are asked for.
    """
    snaps = [s for s in list_snapshots(folder) if step is None or s.step <= step]
    if not snaps:
        raise FileNotFoundError(f"no EMA snapshots{'' if step is None else f' up to step {step}'} in {folder}: "
                                f"train with ema.posthoc_sigma_rels set (e.g. [0.05, 0.10])")
    t_out = max(s.step for s in snaps)
    if step is not None and t_out != step:
        raise ValueError(f"no snapshot at step {step} in {folder}; the nearest earlier one is at step {t_out}")
    coef, error = posthoc_coefficients([s.step for s in snaps], [s.gamma for s in snaps], t_out,
                                       [sigma_rel_to_gamma(s) for s in sigma_rels])
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    for i, snap in enumerate(tqdm(snaps, desc="post-hoc EMA", leave=False)):
        weights = load_file(str(snap.path))
        for j, acc in enumerate(sums):
            for name, value in weights.items():
                if name in acc:
                    acc[name].add_(value.double(), alpha=float(coef[i, j]))
                else:
                    acc[name] = value.double() * float(coef[i, j])
    for s, e in zip(sigma_rels, error):
        logger.info("sigma_rel %.4f at step %d from %d snapshots: profile fit error %.2e", s, t_out, len(snaps), e)
    return [{k: v.float() for k, v in acc.items()} for acc in sums], t_out, error


def is_posthoc_folder(folder: Path) -> bool:
    """True for a folder ``write_posthoc_pipeline`` wrote: a pipeline whose training.json records ``posthoc_ema``."""
    try:
        return (folder / "model_index.json").is_file() and "posthoc_ema" in json.loads(
            (folder / "training.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_posthoc_args(model_dir: str | Path, sigma_rel: float | None = None, out: str | Path | None = None,
                       data: str | None = None) -> Path | None:
    """Every check of ``ldm ema`` that needs no weights; returns the folder it will write (None without ``sigma_rel``).

    ``out`` is new, empty or an earlier ``ldm ema`` output (never someone's files), and outside the run's
    ``final/`` and ``ema-snapshots/``, which it reads.
    """
    from ldm.locations import check_apart, check_ours_or_new, local_or_hub

    model_dir = Path(model_dir).expanduser()
    local_or_hub(str(model_dir), "--model")  # a missing folder is said as such
    final = model_dir / "final"
    if not (final / "unet").is_dir():
        raise FileNotFoundError(f"--model {model_dir}: {final}/unet not found; --model must be a finished stage-2 "
                                f"output_dir (full U-Net; LoRA runs have no post-hoc EMA)")
    if not any((model_dir / SNAPSHOTS).glob("step-*.safetensors")):
        raise FileNotFoundError(f"--model {model_dir}: no EMA snapshots in {model_dir / SNAPSHOTS}; train with "
                                f"ema.posthoc_sigma_rels set (e.g. [0.05, 0.10])")
    if data is not None:
        local_or_hub(data, "--data")
    if sigma_rel is None:
        return None
    out = Path(out).expanduser() if out else model_dir / f"posthoc-ema-{sigma_rel:.3f}"
    for source in (final, model_dir / SNAPSHOTS):
        check_apart(out, "--out", source, f"the run's {source.name}/")
    return check_ours_or_new(out, "--out", is_posthoc_folder, None, "ldm ema")


def write_posthoc_pipeline(model_dir: str | Path, sigma_rel: float, out: str | Path | None = None) -> Path:
    """``<model_dir>/final`` with its U-Net replaced by the post-hoc EMA of ``sigma_rel``, at ``out``.

    ``out`` (default ``<model_dir>/posthoc-ema-<σ_rel>``) is replaced only when an earlier call wrote it."""
    from diffusers import UNet2DConditionModel

    from ldm.checkpoint import atomic_folder

    out = check_posthoc_args(model_dir, sigma_rel, out)
    model_dir, final = Path(model_dir).expanduser(), Path(model_dir).expanduser() / "final"
    (weights,), step, error = reconstruct(model_dir / SNAPSHOTS, [sigma_rel])
    with atomic_folder(out) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        unet = UNet2DConditionModel.from_pretrained(final / "unet")
        load_into(unet, weights)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        summary_path = tmp / "training.json"  # its posthoc_ema record marks the folder as this function's
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary["posthoc_ema"] = {"sigma_rel": sigma_rel, "step": step, "profile_fit_error": float(error[0])}
        summary_path.write_text(json.dumps(summary, indent=1))
    logger.info("post-hoc EMA sigma_rel=%g (step %d) written to %s", sigma_rel, step, out)
    return out


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (a subset of the model's parameters, by name) into ``model``."""
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"EMA weights do not fit this model: {unknown[:3]}... are not among its parameters")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def sweep_sigma_rel(model_dir: str | Path, sigma_rels: list[float], data: str | None = None,
                    num: int | None = None, device: str | None = None) -> list[dict]:
    """Held-out validation loss of the post-hoc EMA for each σ_rel, and of the shipped ``final`` weights.

    ``data``/``num`` default to the run's ``validation.data``/``validation.loss_samples``. Returns rows
    ``{"sigma_rel": σ or None (final), "val_loss": L, "profile_fit_error": e}``, final first.
    """
    from diffusers import DDPMScheduler

    from ldm.config import UNetStageConfig, from_dict
    from ldm.data.split import heldout_data_config
    from ldm.evaluation.heldout import encode_heldout, heldout_loss
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    final = Path(model_dir) / "final"
    cfg = from_dict(UNetStageConfig, json.loads((final / "training.json").read_text())["config"])
    data = data or cfg.validation.data
    if not data:
        from ldm.errors import UserError

        raise UserError(f"no held-out data for --sweep: pass --data DIR_OR_NAME ({final} was trained without "
                        f"validation.data)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentDiffusionPipeline.from_pretrained(final).to(device)
    v = cfg.validation
    latents, text = encode_heldout(heldout_data_config(cfg.data, data, num or v.loss_samples), pipe.vae,
                                   pipe.text_encoder, pipe.tokenizer)
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss() -> float:
        return heldout_loss(pipe.unet, latents, text, schedule.alphas_cumprod, schedule.config.prediction_type,
                            num_timesteps=v.loss_timesteps, seed=v.seed)

    rows = [{"sigma_rel": None, "val_loss": loss(), "profile_fit_error": None}]
    weights, _, error = reconstruct(Path(model_dir) / SNAPSHOTS, list(sigma_rels))
    for sigma_rel, w, e in zip(sigma_rels, weights, error):
        load_into(pipe.unet, w)
        rows.append({"sigma_rel": sigma_rel, "val_loss": loss(), "profile_fit_error": float(e)})
    return rows
