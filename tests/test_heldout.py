"""Held-out validation loss: fixed timesteps and noise, hand-computable, deterministic, encoded once."""

import pytest
import torch

from ldm.config import DiffusionConfig, UNetModelConfig, UNetStageConfig, load_config
from ldm.data.split import heldout_data_config
from ldm.evaluation.heldout import encode_heldout, fixed_timesteps, heldout_loss
from ldm.losses import diffusion as D
from ldm.models.unet import build_noise_scheduler, build_unet, load_components


class Zero(torch.nn.Module):
    """A 'U-Net' that predicts 0 (with `channels` output channels)."""

    def __init__(self, channels=4):
        super().__init__()
        self.channels, self.w = channels, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states):
        out = torch.zeros(x.shape[0], self.channels, *x.shape[2:]) * self.w
        return type("Out", (), {"sample": out})()


def _data(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 3, 32, generator=g)


def test_fixed_timesteps_are_the_midpoints_of_k_equal_bins():
    assert fixed_timesteps(1000, 4).tolist() == [125, 375, 625, 875]
    assert fixed_timesteps(1000, 1).tolist() == [500]
    with pytest.raises(ValueError, match="must be in"):
        fixed_timesteps(10, 11)


def test_heldout_loss_matches_hand_computations():
    latents, text = _data()
    alphas = build_noise_scheduler(DiffusionConfig(), learned_variance=False).alphas_cumprod
    # x0-prediction by a zero model: the loss is mean(z²) whatever the noise and timesteps
    plain = heldout_loss(Zero(), latents, text, alphas, "sample", num_timesteps=4, seed=3)
    assert plain == pytest.approx(latents.pow(2).mean().item(), rel=1e-6)
    # ... and with Min-SNR weights w_k = min(SNR_k, γ), mean_k(w_k)·mean(z²)
    w = D.snr(alphas[fixed_timesteps(1000, 4)]).clamp(max=5.0)
    weighted = heldout_loss(Zero(), latents, text, alphas, "sample", num_timesteps=4, seed=3, min_snr_gamma=5.0)
    assert weighted == pytest.approx(w.double().mean().item() * latents.pow(2).mean().item(), rel=1e-5)
    # ε-prediction by a zero model: the loss is the mean square of the fixed noise, drawn once from the seed
    noise = torch.randn((4, *latents.shape), generator=torch.Generator().manual_seed(3))
    eps = heldout_loss(Zero(), latents, text, alphas, "epsilon", num_timesteps=4, seed=3, batch_size=2)
    assert eps == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    # a learned-variance output (2C channels) is scored on its first C channels
    assert heldout_loss(Zero(8), latents, text, alphas, "sample", num_timesteps=4) == pytest.approx(plain, rel=1e-6)


def test_heldout_loss_is_deterministic_and_leaves_rngs_and_mode_alone():
    torch.manual_seed(0)
    unet = build_unet(UNetModelConfig(block_out_channels=(16, 32), cross_attention=(False, True), layers_per_block=1,
                                      norm_num_groups=8, attention_heads=2), 4, 4, 32).train()
    latents, text = _data()
    alphas = build_noise_scheduler(DiffusionConfig(), learned_variance=False).alphas_cumprod
    rng = torch.get_rng_state()
    first = heldout_loss(unet, latents, text, alphas, "epsilon", num_timesteps=3, seed=0)
    second = heldout_loss(unet, latents, text, alphas, "epsilon", num_timesteps=3, seed=0)
    assert first == second and unet.training and torch.equal(torch.get_rng_state(), rng)
    assert heldout_loss(unet, latents, text, alphas, "epsilon", num_timesteps=3, seed=0, batch_size=2) == \
        pytest.approx(first, rel=1e-5)  # the batch split changes float rounding only
    assert heldout_loss(unet, latents, text, alphas, "epsilon", num_timesteps=3, seed=1) != first  # other noise
    with torch.no_grad():
        unet.conv_out.bias += 0.1
    assert heldout_loss(unet, latents, text, alphas, "epsilon", num_timesteps=3, seed=0) != first  # other weights


def test_heldout_set_is_the_posterior_mean_with_full_captions(unet_overrides, shapes16):
    cfg = load_config(UNetStageConfig, None, list(unet_overrides) + ["data.random_flip=true"])
    parts = load_components(cfg)
    data = heldout_data_config(cfg.data, str(shapes16), 6)
    assert not data.random_flip and data.crop == "center" and data.max_samples == 6
    latents, text = encode_heldout(data, parts.vae, parts.text_encoder, parts.tokenizer, batch_size=4)
    again, _ = encode_heldout(data, parts.vae, parts.text_encoder, parts.tokenizer, batch_size=4)
    assert latents.shape == (6, 4, 4, 4) and text.shape[0] == 6 and torch.equal(latents, again)  # no sampling
