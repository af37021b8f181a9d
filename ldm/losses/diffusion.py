"""Diffusion math for the latent U-Net: noising, targets, weightings, posteriors and the variational bound.

Pure functions on tensors, deterministic given their inputs (only `variational_bound_bpd` draws noise,
from the generator it is handed). Conventions follow diffusers' `DDPMScheduler`:

- timesteps are 0-based: index t in {0, ..., T-1} is step t+1 of the papers;
- ā_t = `scheduler.alphas_cumprod[t]`, ā_{-1} = 1, α_t = ā_t / ā_{t-1}, β_t = 1 - α_t. β is derived
  from ā rather than read from `scheduler.betas`: it is the β that `DDPMScheduler.step` uses, it agrees
  with `scheduler.betas` up to float rounding, and it stays consistent with the ā used for noising
  (including zero-terminal-SNR schedules, where ā_{T-1} = 0 and β_{T-1} = 1);
- per-sample schedule values are scalars or shape (B,) and broadcast over data of shape (B, C, H, W).

Sources: Ho et al. 2020 (DDPM); Nichol & Dhariwal 2021 (Improved DDPM, "IDDPM"); Salimans & Ho 2022
(v-prediction); Hang et al. 2023 (Min-SNR weighting); Guttenberg 2023 (offset noise); Lin et al. 2023
(zero-terminal SNR).
"""

import math
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
_LN2 = math.log(2.0)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """Scalar, (B,) or like-shaped schedule value -> broadcastable over `like` (B, C, H, W), wider dtype."""
    value = torch.as_tensor(value, device=like.device)
    value = value.to(torch.promote_types(value.dtype, like.dtype))
    if value.ndim == 1 and like.ndim > 1:
        return value.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)
    if value.ndim in (0, like.ndim):
        return value
    raise ValueError(
        f"schedule values must be a scalar, shape (B,) or shape {tuple(like.shape)}; got {tuple(value.shape)}"
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)  # (B, ...) -> (B,)


# ---------------------------------------------------------------- forward process and training targets


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """x_t = √ā_t·x0 + √(1−ā_t)·ε  (Ho et al. 2020, eq. 4); equals `DDPMScheduler.add_noise`."""
    a = _per_sample(alpha_bar_t, x0)  # (B, 1, 1, 1)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)  # (B, C, H, W)


def offset_noise(noise: torch.Tensor, offset_draw: torch.Tensor, strength: float) -> torch.Tensor:
    """ε' = ε + s·δ, δ ~ N(0, I) of shape (B, C, 1, 1) from the caller (Guttenberg 2023, "Diffusion with Offset Noise").

    Use ε' everywhere ε is used (noising and target). `offset_draw` is e.g.
    `torch.randn(B, C, 1, 1, generator=g)`; a per-(sample, channel) constant shifts the image mean, which
    plain ε almost never does, so the model learns to change overall brightness.
    """
    expected = (*noise.shape[:2], *([1] * (noise.ndim - 2)))  # (B, C, 1, 1)
    if tuple(offset_draw.shape) != expected:
        raise ValueError(f"offset_draw must have shape {expected} for noise {tuple(noise.shape)}; "
                         f"got {tuple(offset_draw.shape)}")
    return noise + strength * offset_draw.to(noise.dtype)  # (B, C, H, W)


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t, prediction_type: str) -> torch.Tensor:
    """target = ε | v = √ā_t·ε − √(1−ā_t)·x0 (Salimans & Ho 2022, §4) | x0; v equals `get_velocity`."""
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a = _per_sample(alpha_bar_t, x0)  # (B, 1, 1, 1)
    return (a.sqrt() * noise - (1 - a).sqrt() * x0).to(x0.dtype)  # (B, C, H, W)


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t, prediction_type: str) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ā)·ε̂)/√ā (Ho et al. 2020, eq. 15) | √ā·x_t − √(1−ā)·v̂ (Salimans & Ho 2022) | x̂0.

    Same as `DDPMScheduler.step(...).pred_original_sample` with clip_sample=False. An ε-model cannot give
    x0 where ā_t = 0 (the last step of a zero-terminal-SNR schedule); that raises instead of returning inf.
    """
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "sample":
        return model_output
    a = _per_sample(alpha_bar_t, x_t)  # (B, 1, 1, 1)
    if prediction_type == "v_prediction":
        return (a.sqrt() * x_t - (1 - a).sqrt() * model_output).to(x_t.dtype)
    if bool((a == 0).any()):
        raise ValueError("epsilon prediction cannot recover x0 where alpha_bar_t = 0 (zero-terminal-SNR "
                         "schedule); use prediction_type='v_prediction' (Lin et al. 2023, §3.2)")
    return ((x_t - (1 - a).sqrt() * model_output) / a.sqrt()).to(x_t.dtype)


# ---------------------------------------------------------------- loss weighting


def snr(alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ā_t / (1 − ā_t)  (Kingma et al. 2021, "Variational Diffusion Models", eq. 1); = `compute_snr`."""
    return alpha_bar_t / (1 - alpha_bar_t)  # (B,)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """w = min(SNR,γ)/SNR (ε) | min(SNR+1,γ)/(SNR+1) (v) | min(SNR,γ) (x0)  (Hang et al. 2023, Min-SNR-γ).

    w·‖target − output‖² = w_x0·‖x0 − x̂0‖² for x̂0 = predict_x0(output), with
      ε:  x0 − x̂0 = (ε̂ − ε)/√SNR          =>  ‖ε − ε̂‖² = SNR·‖x0 − x̂0‖²,      w_x0 = min(SNR, γ)
      v:  x0 − x̂0 = √(1−ā)(v̂ − v), 1/(1−ā) = SNR + 1  =>  ‖v − v̂‖² = (SNR+1)·‖x0 − x̂0‖²,  w_x0 = min(SNR+1, γ)
      x0: w_x0 = min(SNR, γ)
    For ε the ratio is written γ/max(SNR, γ): finite at SNR = 0 (limit 1).
    For v the paper's min(SNR,γ)/(SNR+1) is exactly 0 at SNR = 0, so with zero-terminal SNR the last step (the
    one that learns the mean image from pure noise, Lin et al. 2023) would never be trained (and 163 of 1000
    steps of a zero-SNR scaled_linear schedule would weigh < 0.01). Truncating the v-loss's own x0 weight SNR+1
    instead (diffusers' examples since PR #5238) keeps every step trained: w = 1 wherever SNR + 1 ≤ γ (the plain
    v-loss Lin et al. train with) and the same γ/(SNR+1) as the paper wherever SNR ≥ γ.
    For x0 the weight at SNR = 0 is exactly 0; ``DiffusionConfig`` refuses it with zero-terminal SNR.
    Shapes: (B,) -> (B,).
    """
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0 (the paper uses 5); got {gamma}")
    if prediction_type == "epsilon":
        return gamma / snr_t.clamp(min=gamma)  # min(SNR, γ) / SNR
    if prediction_type == "v_prediction":
        return (snr_t + 1).clamp(max=gamma) / (snr_t + 1)
    return snr_t.clamp(max=gamma)


def debiased_weight(snr_t: torch.Tensor, prediction_type: str, max_snr: float = 1000.0) -> torch.Tensor:
    """w = 1/√SNR on the ε-loss (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training", eq. 11).

    Expressed for each target like ``min_snr_weight``, through ‖ε − ε̂‖² = SNR·‖x0 − x̂0‖² and
    ‖v − v̂‖² = (SNR+1)·‖x0 − x̂0‖²: the x0-space weight is √SNR, so w = 1/√SNR (ε) | √SNR/(SNR+1) (v) |
    √SNR (x0). SNR is clamped to ``max_snr`` above and 1e-8 below (finite at the ends of any schedule,
    as sd-scripts' ``apply_debiased_estimation`` clamps it). Shapes: (B,) -> (B,).
    """
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    s = snr_t.clamp(1e-8, max_snr)
    if prediction_type == "epsilon":
        return s.rsqrt()
    if prediction_type == "v_prediction":
        return s.sqrt() / (s + 1)
    return s.sqrt()


TIMESTEP_SAMPLING = ("uniform", "logit_normal", "laplace")


def sample_timesteps(u: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str, loc: float = 0.0,
                     scale: float = 1.0) -> torch.Tensor:
    """t = F⁻¹(u): timesteps in {0, …, T−1} from uniform draws u ∈ [0, 1) by inverse-CDF sampling.

      uniform       t = ⌊u·T⌋
      logit_normal  t = ⌊σ(m + s·Φ⁻¹(u))·T⌋, the density π(t/T) ∝ exp(−(logit(t/T) − m)²/2s²) / (t/T·(1 − t/T))
                    of Esser et al. 2024 (SD3, §3.1 eq. 19) over the fraction of the schedule;
      laplace       λ = m − s·sgn(u − ½)·ln(1 − 2|u − ½|) ~ Laplace(m, s) on log SNR (Hang et al. 2024,
                    "Improved Noise Schedule for Diffusion Training", §3), then t = the step whose
                    log SNR(t) = log(ā_t/(1 − ā_t)) is nearest to λ.
    u: (B,) in [0, 1); alphas_cumprod: (T,) decreasing ā. Returns (B,) long on u's device. Non-uniform
    sampling reweights the loss over t by the sampling density, as in the papers (no importance weight).
    """
    _check("timestep sampling", kind, TIMESTEP_SAMPLING)
    num = alphas_cumprod.shape[0]
    u = u.double()
    if kind == "laplace":
        centred = u - 0.5
        lam = loc - scale * torch.sign(centred) * torch.log1p(-2 * centred.abs()).clamp(min=-1e6)  # (B,)
        log_snr = snr(alphas_cumprod.double().to(u.device)).log()  # (T,) decreasing in t
        t = torch.searchsorted(-log_snr, -lam).clamp(max=num - 1)  # first t with log SNR(t) <= λ
        below = (t - 1).clamp(min=0)
        nearer_prev = (log_snr[below] - lam).abs() < (log_snr[t] - lam).abs()
        return torch.where(nearer_prev, below, t).long()
    if kind == "logit_normal":
        u = torch.sigmoid(loc + scale * math.sqrt(2.0) * torch.special.erfinv(2 * u.clamp(1e-12, 1 - 1e-12) - 1))
    return (u * num).floor().clamp(0, num - 1).long()


def immiscible_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ε_π with π = argmin_π Σ_i ‖x0_i − ε_π(i)‖ over permutations π of the batch (Li et al. 2024, Alg. 1).

    Immiscible diffusion: the batch's noise samples are reassigned to its latents by a linear
    assignment (Hungarian method), so each latent is noised towards a nearby noise sample. Every ε_j
    is still an exact N(0, I) draw, used exactly once. The matching is over the micro-batch a process
    sees, so with this option a run's draws depend on the per-process batch size.
    x0, noise: (B, ...) of equal shape. Returns noise[π].
    """
    from scipy.optimize import linear_sum_assignment

    if x0.shape != noise.shape:
        raise ValueError(f"immiscible_noise: latents {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    distance = torch.cdist(x0.detach().flatten(1).double(), noise.flatten(1).double())  # (B, B)
    _, cols = linear_sum_assignment(distance.cpu().numpy())  # rows come back as 0..B-1: cols[i] = π(i)
    return noise[torch.as_tensor(cols, device=noise.device)]


def simple_loss(model_output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_simple = w·mean‖target − output‖² per sample (Ho et al. 2020, eq. 14; w e.g. min-SNR)."""
    dtype = torch.promote_types(model_output.dtype, torch.float32)  # half precision -> float32
    loss = _mean_flat((model_output.to(dtype) - target.to(dtype)) ** 2)  # (B,)
    return loss if weight is None else loss * weight


# ---------------------------------------------------------------- posterior and model distributions


def alphas_cumprod_prev(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ā_{t−1} for t = 0..T−1 with ā_{−1} = 1 (Ho et al. 2020, §2); (T,) -> (T,)."""
    return torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t, alpha_bar_prev):
    """μ̃ = √ā_{t−1}β_t/(1−ā_t)·x0 + √α_t(1−ā_{t−1})/(1−ā_t)·x_t, β̃_t = (1−ā_{t−1})β_t/(1−ā_t) (IDDPM eq. 10-12).

    Returns (mean (B, C, H, W), variance broadcastable (B, 1, 1, 1)). At t = 0 (ā_{−1} = 1) the mean is x0
    and the variance 0. With x0 = `predict_x0(...)` the mean is `DDPMScheduler.step`'s pred_prev_sample.
    """
    a_t, a_prev = _per_sample(alpha_bar_t, x_t), _per_sample(alpha_bar_prev, x_t)  # (B, 1, 1, 1)
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + (alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)) * x_t
    return mean.to(x_t.dtype), (1 - a_prev) / (1 - a_t) * beta_t


def posterior_log_variance_clipped(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log β̃_t, with β̃_0 = 0 replaced by β̃_1 (Nichol & Dhariwal 2021, eq. 10 and reference code); (T,) -> (T,)."""
    if alphas_cumprod.shape[0] < 2:
        raise ValueError("a schedule needs at least 2 timesteps")
    a_prev = alphas_cumprod_prev(alphas_cumprod)
    var = (1 - a_prev) / (1 - alphas_cumprod) * (1 - alphas_cumprod / a_prev)  # β̃_t, β̃_0 = 0
    return torch.cat([var[1:2], var[1:]]).log()


def model_log_variance(t: torch.Tensor, alphas_cumprod: torch.Tensor, variance_type: str,
                       var_output: torch.Tensor | None = None) -> torch.Tensor:
    """log σ²_t = log β̃_t | log β_t | v·log β_t + (1−v)·log β̃_t, v = (out+1)/2 (Nichol & Dhariwal 2021, eq. 15).

    The three cases are variance_type fixed_small | fixed_large | learned_range.

    t: (B,) long. Returns (B,) for the fixed types, var_output's shape (B, C, H, W) for learned_range
    (var_output = the model's second C channels, "learned_range" as in `DDPMScheduler`). At t = 0, where
    β̃_0 = 0, log β̃ is clipped to log β̃_1 and fixed_large also uses β̃_1, as in Improved DDPM; diffusers
    instead uses log(1e-20) (learned_range) and β_0 (fixed_large) there, which only its samplers see.
    """
    _check("variance_type", variance_type, VARIANCE_TYPES)
    log_small = posterior_log_variance_clipped(alphas_cumprod)  # (T,)
    log_beta = (1 - alphas_cumprod / alphas_cumprod_prev(alphas_cumprod)).log()  # (T,)
    if variance_type == "fixed_small":
        return log_small[t]
    if variance_type == "fixed_large":
        return torch.cat([log_small[:1], log_beta[1:]])[t]
    if var_output is None:
        raise ValueError("variance_type='learned_range' needs var_output (the model's second C output channels)")
    frac = (var_output + 1) / 2  # (B, C, H, W)
    return frac * _per_sample(log_beta[t], frac) + (1 - frac) * _per_sample(log_small[t], frac)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(μ1,σ1²) ‖ N(μ2,σ2²)) = ½(−1 + log σ2² − log σ1² + σ1²/σ2² + (μ1−μ2)²/σ2²); nats, elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x, mean, logvar) -> torch.Tensor:
    """log N(x; μ, σ²) = −½(log 2π + log σ² + (x−μ)²/σ²); nats, elementwise; a density, not a probability.

    Latents are continuous, so the decoder term L_0 uses this density instead of DDPM's discretised
    pixel likelihood. Densities can exceed 1: bits/dim of latents can be negative, and they are
    comparable only between models on the same VAE (same latent space and scaling_factor).
    """
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


# ---------------------------------------------------------------- variational bound


def _split_output(model_output: torch.Tensor, channels: int, variance_type: str):
    """(B, C or 2C, H, W) -> (mean part (B, C, H, W), var part (B, C, H, W) or None)."""
    _check("variance_type", variance_type, VARIANCE_TYPES)
    learned = variance_type == "learned_range"
    expected = channels * (2 if learned else 1)
    if model_output.shape[1] != expected:
        raise ValueError(f"variance_type={variance_type!r} needs a model output with {expected} channels for "
                         f"{channels}-channel latents; got {model_output.shape[1]} (set the U-Net's out_channels)")
    return tuple(model_output.split(channels, dim=1)) if learned else (model_output, None)


def vlb_terms(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              alphas_cumprod: torch.Tensor, prediction_type: str, variance_type: str) -> torch.Tensor:
    """L_t = KL(q(x_{t−1}|x_t,x0) ‖ p_θ(x_{t−1}|x_t)) (t > 0), −log N(x0; μ_θ, σ_0²) (t = 0); bits/dim (IDDPM eq. 4-6).

    model_output: (B, C, H, W), or (B, 2C, H, W) for learned_range; x0, x_t: (B, C, H, W); t: (B,) long.
    Returns (B,): each term averaged over the C·H·W dimensions and divided by ln 2 (bits per dimension).
    The t = 0 term is a continuous Gaussian NLL (see `gaussian_log_likelihood`), so it can be negative.
    """
    output, var_output = _split_output(model_output, x0.shape[1], variance_type)
    a_t, a_prev = alphas_cumprod[t], alphas_cumprod_prev(alphas_cumprod)[t]  # (B,)
    true_mean, _ = q_posterior(x0, x_t, a_t, a_prev)  # (B, C, H, W)
    true_logvar = _per_sample(posterior_log_variance_clipped(alphas_cumprod)[t], x0)  # (B, 1, 1, 1)
    x0_hat = predict_x0(output, x_t, a_t, prediction_type)
    model_mean, _ = q_posterior(x0_hat, x_t, a_t, a_prev)  # (B, C, H, W)
    model_logvar = _per_sample(model_log_variance(t, alphas_cumprod, variance_type, var_output), x0)
    kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar))  # (B,) nats/dim
    nll = -_mean_flat(gaussian_log_likelihood(x0, model_mean, model_logvar))  # (B,) nats/dim
    return torch.where(t == 0, nll, kl) / _LN2


def hybrid_loss(model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                alphas_cumprod: torch.Tensor, prediction_type: str, vlb_weight: float = 1e-3,
                simple_weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_hybrid = L_simple + λ·T·L_t, stop-gradient on μ_θ inside L_t (Nichol & Dhariwal 2021, eq. 16, §3.1).

    model_output: (B, 2C, H, W) from a learned_range U-Net evaluated at x_t = add_noise(x0, noise, ā_t);
    t: (B,) long, uniform. T·L_t is an unbiased estimate of L_vlb = Σ_t L_t, so with λ = 0.001 and
    T = 1000 this is the reference code's L_simple + L_t (its RESCALED_MSE scaling). The mean channels get
    gradient only from L_simple (optionally weighted by simple_weight (B,), e.g. min-SNR) and the
    variance channels only from L_vlb. Returns (B,).
    """
    output, var_output = _split_output(model_output, x0.shape[1], "learned_range")
    a_t = alphas_cumprod[t]  # (B,)
    x_t = add_noise(x0, noise, a_t)
    simple = simple_loss(output, diffusion_target(x0, noise, a_t, prediction_type), simple_weight)
    frozen = torch.cat([output.detach(), var_output], dim=1)  # stop-gradient on the mean
    vlb = vlb_terms(frozen, x0, x_t, t, alphas_cumprod, prediction_type, "learned_range")
    return simple + vlb_weight * alphas_cumprod.shape[0] * vlb


def prior_kl(x0: torch.Tensor, alpha_bar_T) -> torch.Tensor:
    """L_T = KL(N(√ā_T·x0, (1−ā_T)I) ‖ N(0, I)) in bits/dim (Ho et al. 2020, eq. 5); exactly 0 when ā_T = 0."""
    a = _per_sample(alpha_bar_T, x0)  # (B, 1, 1, 1)
    zero = x0.new_zeros(())
    return _mean_flat(normal_kl(a.sqrt() * x0, (1 - a).log(), zero, zero)) / _LN2  # (B,)


class VariationalBound(NamedTuple):
    total: torch.Tensor  # (B,) −ELBO in bits/dim: prior + terms.sum(1)
    prior: torch.Tensor  # (B,) L_T
    terms: torch.Tensor  # (B, T) L_t for t = 0..T−1 (t = 0: decoder NLL)


@torch.no_grad()
def variational_bound_bpd(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                          alphas_cumprod: torch.Tensor, prediction_type: str, variance_type: str,
                          generator: torch.Generator | None = None, timesteps_per_call: int = 8,
                          progress: bool = True) -> VariationalBound:
    """−log p(x0) ≤ L_T + Σ_{t=1}^{T−1} L_t + L_0 over all T steps, bits/dim (Ho et al. 2020, eq. 5; IDDPM §2).

    model_fn(x_t, t) gets x_t (K·B, C, H, W) and t (K·B,) for K = timesteps_per_call timesteps at once,
    laid out timestep-major (row k·B + b is sample b at timestep k of the chunk), so conditioning
    repeats as `cond.repeat(K, ...)`; it returns C channels (fixed_*) or 2C (learned_range). One x_t per
    (sample, timestep) is drawn from `generator` (on x0's device). Returns per-sample totals and terms.
    """
    batch, num_steps = x0.shape[0], alphas_cumprod.shape[0]
    alphas_cumprod = alphas_cumprod.to(x0.device)
    terms = []
    chunks = range(0, num_steps, timesteps_per_call)
    for start in tqdm(chunks, desc="variational bound", disable=not progress, leave=False):
        steps = torch.arange(start, min(start + timesteps_per_call, num_steps), device=x0.device)  # (K,)
        t = steps.repeat_interleave(batch)  # (K·B,) timestep-major
        x0_rows = x0.repeat(len(steps), *([1] * (x0.ndim - 1)))  # (K·B, C, H, W)
        noise = torch.randn(x0_rows.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = add_noise(x0_rows, noise, alphas_cumprod[t])
        out = model_fn(x_t, t)
        terms.append(vlb_terms(out, x0_rows, x_t, t, alphas_cumprod, prediction_type, variance_type)
                     .view(len(steps), batch))  # (K, B)
    terms = torch.cat(terms).T  # (B, T)
    prior = prior_kl(x0, alphas_cumprod[-1])
    return VariationalBound(total=prior + terms.sum(1), prior=prior, terms=terms)
