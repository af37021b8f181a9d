"""Timestep sampling and loss weightings of stage 2, against hand computations."""

import dataclasses
import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.config import ConfigError, DiffusionConfig, UNetStageConfig, load_config
from ldm.losses import diffusion as D
from ldm.losses.denoising import loss_weight

ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def test_uniform_is_floor_of_u_times_t():
    u = torch.tensor([0.0, 0.5, 0.25, 0.9999])
    assert D.sample_timesteps(u, ALPHAS, "uniform").tolist() == [0, 500, 250, 999]


def test_logit_normal_matches_hand_computation():
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # Φ(1)
    u = torch.tensor([0.5, phi_1, 0.5])
    t = D.sample_timesteps(u[:2], ALPHAS, "logit_normal", loc=0.0, scale=1.0).tolist()
    assert t == [500, math.floor(1000 / (1 + math.exp(-1)))]  # sigmoid(0)·T, sigmoid(1)·T = 731
    shifted = D.sample_timesteps(u[2:], ALPHAS, "logit_normal", loc=0.5, scale=2.0).tolist()
    assert shifted == [math.floor(1000 / (1 + math.exp(-0.5)))]  # 622


def test_logit_normal_concentrates_in_the_middle():
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    t = D.sample_timesteps(u, ALPHAS, "logit_normal", 0.0, 1.0).double()
    middle = ((t >= 250) & (t < 750)).double().mean()
    assert 0.715 < middle < 0.742  # P(|N(0,1)| < logit(0.75) = 1.0986) = 0.728


def test_laplace_picks_the_step_with_the_nearest_log_snr():
    log_snr = (ALPHAS / (1 - ALPHAS)).double().log()
    u = torch.tensor([0.5, 0.1, 0.3, 0.7, 0.95, 0.999])
    loc, scale = -1.0, 2.0
    lam = [loc + scale * math.log(2 * x) if x < 0.5 else loc - scale * math.log(2 * (1 - x)) for x in u.tolist()]
    expected = [int((log_snr - v).abs().argmin()) for v in lam]
    assert D.sample_timesteps(u, ALPHAS, "laplace", loc, scale).tolist() == expected
    assert expected[0] == int((log_snr - loc).abs().argmin())  # the median of λ is the location


def test_laplace_median_and_clamping_at_the_ends():
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(1))
    t = D.sample_timesteps(u, ALPHAS, "laplace", 0.0, 1.0)
    at_zero = int((ALPHAS / (1 - ALPHAS)).log().abs().argmin())  # log SNR = 0
    assert abs(float((t >= at_zero).double().mean()) - 0.5) < 0.03
    extreme = D.sample_timesteps(torch.tensor([0.0, 1 - 1e-12]), ALPHAS, "laplace", 0.0, 50.0)
    assert extreme.tolist() == [999, 0]  # λ → −∞ gives the noisiest step, λ → +∞ the cleanest


def test_debiased_weight_matches_hand_computation():
    snr = torch.tensor([4.0, 0.25])
    assert D.debiased_weight(snr, "epsilon").tolist() == pytest.approx([0.5, 2.0])
    assert D.debiased_weight(snr, "v_prediction").tolist() == pytest.approx([2 / 5, 0.5 / 1.25])
    assert D.debiased_weight(snr, "sample").tolist() == pytest.approx([2.0, 0.5])
    assert torch.isfinite(D.debiased_weight(torch.tensor([0.0, math.inf]), "epsilon")).all()


def test_loss_weight_follows_the_config():
    snr = torch.tensor([1.0, 25.0])
    assert loss_weight(snr, DiffusionConfig(min_snr_gamma=5.0), "epsilon").tolist() == pytest.approx([1.0, 0.2])
    assert loss_weight(snr, DiffusionConfig(min_snr_gamma=None), "epsilon") is None
    assert loss_weight(snr, DiffusionConfig(loss_weighting="debiased"), "epsilon").tolist() == pytest.approx([1.0, 0.2])


@pytest.mark.parametrize("key,value", [("timestep_scale", 0), ("timestep_loc", float("nan")),
                                       ("timestep_sampling", "cosine"), ("loss_weighting", "snr"),
                                       ("immiscible_noise", "maybe")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"diffusion.{key}"):
        load_config(UNetStageConfig, None, [f"diffusion.{key}={value}"])


def test_immiscible_noise_is_the_minimum_distance_permutation():
    import itertools

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 3, 3, generator=g) + 0.5, torch.randn(5, 4, 3, 3, generator=g)
    matched = D.immiscible_noise(x0, noise)

    def cost(perm):
        return sum((x0[i] - noise[j]).norm().item() for i, j in enumerate(perm))

    best = min(itertools.permutations(range(5)), key=cost)  # all 120 assignments, by hand
    assert torch.equal(matched, noise[list(best)])
    assert cost(best) < cost(range(5))  # this draw is not already optimal: the test can fail
    assert sorted(map(tuple, matched.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))


def test_immiscible_noise_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        D.immiscible_noise(torch.zeros(2, 4, 8, 8), torch.zeros(3, 4, 8, 8))


def test_immiscible_noise_is_applied_to_the_training_noise(unet_overrides, monkeypatch):
    from ldm.data.images import ImageCaptionDataset, collate
    from ldm.models.text import encode_prompts
    from ldm.models.unet import load_components
    from train import unet as stage2

    cfg = load_config(UNetStageConfig, None, unet_overrides)
    parts = load_components(cfg)
    dataset = ImageCaptionDataset(cfg.data)
    batch = collate([dataset[(i, 100 + i)] for i in range(6)])
    empty = encode_prompts(parts.text_encoder, parts.tokenizer, [""])[0]

    def loss(immiscible):
        d = dataclasses.replace(cfg.diffusion, immiscible_noise=immiscible)
        return stage2.training_loss(parts.unet, batch, parts.vae, parts.text_encoder, parts.tokenizer, empty,
                                    parts.scheduler.alphas_cumprod, d, parts.scheduler.config)

    plain, matched = loss(False), loss(True)
    assert not torch.allclose(plain, matched)
    monkeypatch.setattr(D, "immiscible_noise", lambda x0, noise: noise)  # the identity matching
    assert torch.equal(loss(True), plain)
