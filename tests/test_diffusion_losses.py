"""ldm.losses.diffusion against diffusers' DDPMScheduler and against hand computations (float64 where exact)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch.distributions import Normal, kl_divergence

from ldm.losses import diffusion as D

LN2 = math.log(2.0)
F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scheduler(**kwargs) -> DDPMScheduler:
    kwargs.setdefault("clip_sample", False)  # the default True clamps x̂0 to [-1, 1]: wrong for latents
    return DDPMScheduler(**kwargs)


def _betas64(num_steps: int = 10):
    """Float64 linear schedule: betas and the ā built from them (independent of D's β = 1 − ā_t/ā_{t−1})."""
    betas = _scheduler(num_train_timesteps=num_steps).betas.to(F64)
    return betas, torch.cumprod(1 - betas, dim=0)


# ---------------------------------------------------------------- forward process and targets


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_add_noise_and_v_target_match_diffusers(beta_schedule, zero_snr):
    sched = _scheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    g = _gen()
    x0, noise = torch.randn(5, 4, 8, 8, generator=g, dtype=F64), torch.randn(5, 4, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 500, 998, 999])
    a = sched.alphas_cumprod[t]
    torch.testing.assert_close(D.add_noise(x0, noise, a), sched.add_noise(x0, noise, t), rtol=0, atol=1e-15)
    torch.testing.assert_close(D.diffusion_target(x0, noise, a, "v_prediction"), sched.get_velocity(x0, noise, t),
                               rtol=0, atol=1e-15)
    assert D.diffusion_target(x0, noise, a, "epsilon") is noise
    assert D.diffusion_target(x0, noise, a, "sample") is x0


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_predict_x0_inverts_the_target(prediction_type):
    g = _gen(1)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g, dtype=F64), torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    a = torch.tensor([1e-4, 0.01, 0.3, 0.5, 0.9, 0.9999], dtype=F64)
    x_t = D.add_noise(x0, noise, a)
    target = D.diffusion_target(x0, noise, a, prediction_type)
    torch.testing.assert_close(D.predict_x0(target, x_t, a, prediction_type), x0)


def test_unknown_types_and_bad_shapes_raise():
    x = torch.zeros(2, 4, 2, 2)
    ac = _scheduler(num_train_timesteps=10).alphas_cumprod
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        D.diffusion_target(x, x, ac[:2], "eps")
    with pytest.raises(ValueError, match="prediction_type"):
        D.predict_x0(x, x, ac[:2], "velocity")
    with pytest.raises(ValueError, match="prediction_type"):
        D.min_snr_weight(torch.ones(2), 5.0, "noise")
    with pytest.raises(ValueError, match="fixed_small, fixed_large, learned_range"):
        D.vlb_terms(x, x, x, torch.tensor([1, 2]), ac, "epsilon", "learned")
    with pytest.raises(ValueError, match="8 channels"):  # learned_range needs 2C outputs
        D.vlb_terms(x, x, x, torch.tensor([1, 2]), ac, "epsilon", "learned_range")
    with pytest.raises(ValueError, match="shape"):
        D.add_noise(x, x, torch.ones(2, 4))


def test_epsilon_prediction_cannot_recover_x0_at_zero_snr():
    x = torch.ones(2, 4, 2, 2)
    with pytest.raises(ValueError, match="v_prediction"):
        D.predict_x0(x, x, torch.tensor([0.5, 0.0]), "epsilon")
    torch.testing.assert_close(D.predict_x0(x, x, torch.tensor([0.5, 0.0]), "v_prediction")[1], -x[1])


def test_offset_noise_adds_a_per_channel_constant():
    noise, draw = torch.randn(2, 3, 4, 4, generator=_gen()), torch.randn(2, 3, 1, 1, generator=_gen(1))
    out = D.offset_noise(noise, draw, 0.1)
    torch.testing.assert_close(out - noise, (0.1 * draw).expand(2, 3, 4, 4))
    torch.testing.assert_close(D.offset_noise(noise, draw, 0.0), noise)
    with pytest.raises(ValueError, match=r"\(2, 3, 1, 1\)"):
        D.offset_noise(noise, torch.randn(2, 3), 0.1)


# ---------------------------------------------------------------- min-SNR weighting


def test_snr_matches_diffusers_compute_snr():
    sched = _scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(D.snr(sched.alphas_cumprod[t]), compute_snr(sched, t))


def test_min_snr_weight_hand_values_and_zero_snr():
    s = torch.tensor([0.0, 1.0, 5.0, 10.0, 100.0], dtype=F64)
    expected = {
        "epsilon": [1.0, 1.0, 1.0, 0.5, 0.05],  # min(s,5)/s, limit 1 at s = 0
        "v_prediction": [1.0, 1.0, 5 / 6, 5 / 11, 5 / 101],  # min(s+1,5)/(s+1): 1 (not 0) at s = 0
        "sample": [0.0, 1.0, 5.0, 5.0, 5.0],  # min(s,5)
    }
    for prediction_type, values in expected.items():
        w = D.min_snr_weight(s, 5.0, prediction_type)
        torch.testing.assert_close(w, torch.tensor(values, dtype=F64))
        assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match="gamma"):
        D.min_snr_weight(s, 0.0, "epsilon")


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_min_snr_weight_gives_min_snr_times_x0_error(prediction_type):
    """w·mean‖target − output‖² = min(SNR, γ)·mean‖x0 − x̂0‖² with x̂0 derived from the perturbed output."""
    g, shape, gamma = _gen(2), (8, 4, 6, 6), 5.0
    x0, noise = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    a = torch.tensor([1e-6, 1e-3, 0.05, 0.3, 0.7, 0.83, 0.95, 0.9999], dtype=F64)
    x_t = D.add_noise(x0, noise, a)
    target = D.diffusion_target(x0, noise, a, prediction_type)
    output = target + 0.1 * torch.randn(shape, generator=g, dtype=F64)  # an imperfect model
    x0_hat = D.predict_x0(output, x_t, a, prediction_type)
    lhs = D.simple_loss(output, target, D.min_snr_weight(D.snr(a), gamma, prediction_type))
    x0_weight = D.snr(a) + 1 if prediction_type == "v_prediction" else D.snr(a)  # v truncates its own SNR + 1
    rhs = x0_weight.clamp(max=gamma) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=0)


def test_min_snr_v_weight_trains_the_zero_terminal_snr_step():
    """Zero-terminal SNR + v: the paper's min(SNR,γ)/(SNR+1) is 0 at t = T−1 (and < 0.01 on 163 steps);
    ours is 1 there, positive everywhere, and equals the paper's wherever SNR ≥ γ."""
    sched = _scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    snr, gamma = D.snr(sched.alphas_cumprod.to(F64)), 5.0
    assert snr[-1] == 0
    paper = snr.clamp(max=gamma) / (snr + 1)
    assert paper[-1] == 0 and int((paper < 0.01).sum()) == 163
    w = D.min_snr_weight(snr, gamma, "v_prediction")
    assert w[-1] == 1 and bool((w > 0).all())
    low = snr + 1 <= gamma
    assert low.sum() > 100 and torch.equal(w[low], torch.ones_like(w[low]))  # the plain v-loss at low SNR
    high = snr >= gamma
    torch.testing.assert_close(w[high], paper[high], rtol=1e-12, atol=0)
    assert int((w < 0.01).sum()) == int((paper[high] < 0.01).sum()) == 2  # only the highest-SNR steps


def test_config_refuses_min_snr_with_zero_terminal_snr_for_x0_prediction():
    """x0 prediction: min(SNR, γ) is 0 at the zero-SNR step, so the config refuses that combination."""
    from ldm.config import ConfigError, DiffusionConfig

    assert D.min_snr_weight(torch.zeros(1, dtype=F64), 5.0, "sample").item() == 0
    with pytest.raises(ConfigError, match="diffusion.min_snr_gamma.*diffusion.zero_terminal_snr"):
        DiffusionConfig(prediction_type="sample", zero_terminal_snr=True, min_snr_gamma=5.0)
    DiffusionConfig(prediction_type="sample", zero_terminal_snr=True, min_snr_gamma=None)
    DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True, min_snr_gamma=5.0)
    DiffusionConfig(prediction_type="sample", zero_terminal_snr=False, min_snr_gamma=5.0)


# ---------------------------------------------------------------- posterior and variances vs DDPMScheduler


@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                      ("sample", False), ("v_prediction", True)])
@pytest.mark.parametrize("t", [0, 1, 37, 999])
def test_posterior_mean_and_x0_match_ddpm_step(prediction_type, zero_snr, t):
    sched = _scheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    ac = sched.alphas_cumprod
    g = _gen(3)
    x_t, output = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    step = sched.step(output, t, x_t, generator=_gen(7))
    z = torch.randn(x_t.shape, generator=_gen(7))  # the variance noise step drew, redrawn
    mean_ref = step.prev_sample - (sched._get_variance(t).sqrt() * z if t > 0 else 0)
    x0_hat = D.predict_x0(output, x_t, ac[t], prediction_type)
    mean, variance = D.q_posterior(x0_hat, x_t, ac[t], D.alphas_cumprod_prev(ac)[t])
    torch.testing.assert_close(x0_hat, step.pred_original_sample)
    torch.testing.assert_close(mean, mean_ref)
    if t > 0:
        torch.testing.assert_close(variance.flatten(), sched._get_variance(t).flatten())


def test_posterior_matches_hand_formula_and_clipping():
    betas, ac = _betas64()
    ac_prev = torch.cat([torch.ones(1, dtype=F64), ac[:-1]])
    var = betas * (1 - ac_prev) / (1 - ac)  # β̃_t, Improved DDPM eq. 10
    clipped = D.posterior_log_variance_clipped(ac)
    assert clipped[0] == pytest.approx(math.log(var[1].item()), rel=1e-10)
    torch.testing.assert_close(clipped[1:], var[1:].log())
    x0, x_t, t = torch.randn(3, 2, 2, 2, dtype=F64), torch.randn(3, 2, 2, 2, dtype=F64), torch.tensor([0, 4, 9])
    mean, variance = D.q_posterior(x0, x_t, ac[t], ac_prev[t])
    c1 = (ac_prev.sqrt() * betas / (1 - ac))[t].view(-1, 1, 1, 1)
    c2 = ((1 - betas).sqrt() * (1 - ac_prev) / (1 - ac))[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, c1 * x0 + c2 * x_t)
    torch.testing.assert_close(mean[0], x0[0])  # t = 0: the posterior collapses onto x0
    torch.testing.assert_close(variance.flatten(), var[t])


@pytest.mark.parametrize("zero_snr", [False, True])
def test_model_variances_match_diffusers_get_variance(zero_snr):
    sched = _scheduler(num_train_timesteps=50, rescale_betas_zero_snr=zero_snr)
    ac = sched.alphas_cumprod
    v = torch.linspace(-1.5, 1.5, 7)  # learned_range outputs, beyond [-1, 1] too
    for t in range(1, 50):  # diffusers differs at t = 0 by design (see model_log_variance)
        tt = torch.tensor([t])
        torch.testing.assert_close(D.model_log_variance(tt, ac, "fixed_small").exp(), sched._get_variance(t).view(1))
        torch.testing.assert_close(D.model_log_variance(tt, ac, "fixed_large").exp(),
                                   sched._get_variance(t, variance_type="fixed_large").view(1))
        torch.testing.assert_close(D.model_log_variance(tt, ac, "learned_range", v.view(1, 7)).flatten(),
                                   sched._get_variance(t, v, "learned_range"))
    with pytest.raises(ValueError, match="var_output"):
        D.model_log_variance(torch.tensor([1]), ac, "learned_range")


# ---------------------------------------------------------------- Gaussian KL, likelihood, vlb terms


def test_normal_kl_and_log_likelihood_match_torch_distributions():
    g = _gen(4)
    m1, m2, lv1, lv2, x = (torch.randn(50, generator=g, dtype=F64) for _ in range(5))
    p, q = Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(D.normal_kl(m1, lv1, m2, lv2), kl_divergence(p, q))
    torch.testing.assert_close(D.gaussian_log_likelihood(x, m1, lv1), p.log_prob(x))
    assert (D.gaussian_log_likelihood(m1, m1, torch.full_like(m1, -6.0)) > 0).all()  # densities exceed 1


def test_vlb_terms_against_hand_computation():
    betas, ac = _betas64()
    x0, x_t = torch.tensor([0.7, -0.2], dtype=F64), torch.tensor([0.4, 1.3], dtype=F64)
    eps_hat, var_out, steps = torch.tensor([0.25, -0.6], dtype=F64), torch.tensor([0.3, -0.4], dtype=F64), [4, 0]
    expected = []
    for i, t in enumerate(steps):
        a, a_prev, beta = ac[t].item(), (ac[t - 1].item() if t > 0 else 1.0), betas[t].item()
        post_var = lambda s: betas[s].item() * (1 - ac[s - 1].item()) / (1 - ac[s].item())  # noqa: E731
        c1, c2 = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        x0_hat = (x_t[i].item() - math.sqrt(1 - a) * eps_hat[i].item()) / math.sqrt(a)
        frac = (var_out[i].item() + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * math.log(post_var(max(t, 1)))
        model = Normal(torch.tensor(c1 * x0_hat + c2 * x_t[i].item(), dtype=F64), math.exp(0.5 * log_var))
        if t > 0:
            true = Normal(torch.tensor(c1 * x0[i].item() + c2 * x_t[i].item(), dtype=F64), math.sqrt(post_var(t)))
            expected.append(kl_divergence(true, model).item() / LN2)
        else:
            expected.append(-model.log_prob(x0[i]).item() / LN2)
    output = torch.stack([eps_hat, var_out], dim=1).view(2, 2, 1, 1)  # (B, 2C, 1, 1)
    got = D.vlb_terms(output, x0.view(2, 1, 1, 1), x_t.view(2, 1, 1, 1), torch.tensor(steps), ac,
                      "epsilon", "learned_range")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-12)


def test_hybrid_loss_value_and_stop_gradient_on_the_mean():
    sched = _scheduler(num_train_timesteps=100)
    ac, g = sched.alphas_cumprod.to(F64), _gen(5)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 17, 99])
    output = torch.randn(3, 4, 4, 4, generator=g, dtype=F64, requires_grad=True)  # (B, 2C, H, W)
    x_t = D.add_noise(x0, noise, ac[t])
    simple = D.simple_loss(output[:, :2], noise)
    vlb = D.vlb_terms(output, x0, x_t, t, ac, "epsilon", "learned_range")
    loss = D.hybrid_loss(output, x0, noise, t, ac, "epsilon")
    torch.testing.assert_close(loss, simple + 1e-3 * 100 * vlb)
    # Without L_simple's gradient, only the variance channels may receive gradient from L_vlb.
    D.hybrid_loss(output, x0, noise, t, ac, "epsilon", simple_weight=torch.zeros(3, dtype=F64)).sum().backward()
    assert (output.grad[:, :2] == 0).all()
    assert (output.grad[:, 2:].abs().sum(dim=(1, 2, 3)) > 0).all()
    (mean_grad,) = torch.autograd.grad(vlb.sum(), output)  # the undetached bound does reach the mean
    assert mean_grad[:, :2].abs().sum() > 0
    with pytest.raises(ValueError, match="4 channels"):
        D.hybrid_loss(output[:, :2], x0, noise, t, ac, "epsilon")


# ---------------------------------------------------------------- prior and the full bound


def test_prior_kl_against_hand_formula_and_zero_snr():
    x0 = torch.randn(2, 3, 4, 4, generator=_gen(6), dtype=F64)
    a = 0.05
    m, s2 = math.sqrt(a) * x0, 1 - a
    expected = (0.5 * (s2 + m**2 - 1 - math.log(s2))).mean(dim=(1, 2, 3)) / LN2  # KL(N(m, s2) ‖ N(0, 1))
    torch.testing.assert_close(D.prior_kl(x0, torch.tensor(a, dtype=F64)), expected)
    assert (D.prior_kl(x0, torch.tensor(0.0, dtype=F64)) == 0).all()


def _oracle(x0: torch.Tensor, ac: torch.Tensor, prediction_type: str, var_out: float | None, shift: float = 0.0):
    """model_fn that knows x0 per sample: returns the exact ε / v / x0 (plus `shift`) for x_t."""
    def model_fn(x_t, t):
        x0_rows = x0.repeat(x_t.shape[0] // x0.shape[0], 1, 1, 1)  # timestep-major layout
        a = ac[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0_rows) / (1 - a).sqrt()
        out = D.diffusion_target(x0_rows, eps, ac[t], prediction_type) + shift
        return out if var_out is None else torch.cat([out, torch.full_like(out, var_out)], dim=1)
    return model_fn


def _hand_bound(x0, betas, ac, variance_type, var_out):
    """With the exact posterior mean only variances differ: Σ_t ½(−1 + log σ² − log β̃ + β̃/σ²) + NLL + prior."""
    post = [float("nan")] + [(betas[t] * (1 - ac[t - 1]) / (1 - ac[t])).item() for t in range(1, len(ac))]
    frac = None if var_out is None else (var_out + 1) / 2

    def log_sigma2(t):
        small, large = math.log(post[max(t, 1)]), math.log(post[1] if t == 0 else betas[t].item())
        return {"fixed_small": small, "fixed_large": large}.get(variance_type) if frac is None else \
            frac * math.log(betas[t].item()) + (1 - frac) * small

    kls = [0.5 * (-1 + log_sigma2(t) - math.log(post[t]) + post[t] / math.exp(log_sigma2(t)))
           for t in range(1, len(ac))]
    nll = 0.5 * (math.log(2 * math.pi) + log_sigma2(0))  # model mean = x0 exactly at t = 0
    a_T = ac[-1].item()
    prior = (0.5 * ((1 - a_T) + a_T * x0**2 - 1 - math.log(1 - a_T))).mean(dim=(1, 2, 3))
    return (prior + (nll + sum(kls))) / LN2, torch.tensor([nll] + kls, dtype=F64) / LN2


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type,var_out", [("fixed_small", None), ("fixed_large", None),
                                                   ("learned_range", 0.3)])
def test_variational_bound_of_an_oracle_matches_hand_sum(prediction_type, variance_type, var_out):
    betas, ac = _betas64()
    x0 = torch.randn(3, 2, 4, 4, generator=_gen(8), dtype=F64)
    bound = D.variational_bound_bpd(_oracle(x0, ac, prediction_type, var_out), x0, ac, prediction_type,
                                    variance_type, generator=_gen(9), timesteps_per_call=4, progress=False)
    total, terms = _hand_bound(x0, betas, ac, variance_type, var_out)
    assert bound.terms.shape == (3, 10)
    torch.testing.assert_close(bound.terms, terms.expand(3, 10), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(bound.total, total, rtol=1e-8, atol=1e-10)
    if variance_type == "fixed_small":  # exact mean and variance: every KL vanishes
        assert bound.terms[:, 1:].abs().max() < 1e-9


def test_variational_bound_worse_model_is_larger_and_seeded():
    _, ac = _betas64()
    x0 = torch.randn(3, 2, 4, 4, generator=_gen(8), dtype=F64)
    run = lambda shift, seed, k: D.variational_bound_bpd(  # noqa: E731
        _oracle(x0, ac, "epsilon", None, shift), x0, ac, "epsilon", "fixed_small",
        generator=_gen(seed), timesteps_per_call=k, progress=False).total
    torch.testing.assert_close(run(0.0, 0, 1), run(0.0, 1, 10))  # oracle: independent of noise and chunking
    worse = run(0.3, 0, 3)
    assert (worse > run(0.0, 0, 3) + 1e-3).all()
    assert torch.equal(worse, run(0.3, 0, 3))  # same generator seed, same bound
    assert not torch.equal(worse, run(0.3, 1, 3))  # the noise is really drawn from the generator


def test_variational_bound_with_zero_terminal_snr():
    ac = _scheduler(num_train_timesteps=10, rescale_betas_zero_snr=True).alphas_cumprod.to(F64)
    assert ac[-1] == 0
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=F64), ac[:-1]])
    x0 = torch.randn(2, 2, 4, 4, generator=_gen(10), dtype=F64)
    bound = D.variational_bound_bpd(_oracle(x0, ac, "v_prediction", None), x0, ac, "v_prediction",
                                    "fixed_large", generator=_gen(0), progress=False)
    assert (bound.prior == 0).all() and torch.isfinite(bound.total).all()
    torch.testing.assert_close(bound.total, _hand_bound(x0, betas, ac, "fixed_large", None)[0])
    with pytest.raises(ValueError, match="v_prediction"):
        D.variational_bound_bpd(_oracle(x0, ac, "epsilon", None), x0, ac, "epsilon", "fixed_small", progress=False)
