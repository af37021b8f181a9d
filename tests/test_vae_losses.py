"""Stage-1 loss pieces and image metrics against hand computations (pure functions, no training)."""

import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.evaluation.vae import psnr, ssim
from ldm.losses import vae as L
from ldm.models.discriminator import PatchDiscriminator


def test_gaussian_kl_of_known_gaussians():
    # one example, two dims: N(1, 0.5) and N(-2, 2) against N(0, 1):
    # ½[(1 + 0.5 − 1 − log 0.5) + (4 + 2 − 1 − log 2)] = ½ (0.5 + 5) = 2.75 (the logs cancel)
    mean = torch.tensor([[1.0, -2.0]])
    logvar = torch.log(torch.tensor([[0.5, 2.0]]))
    assert L.gaussian_kl(mean, logvar).item() == pytest.approx(2.75, abs=1e-6)
    assert L.gaussian_kl(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)).tolist() == [0.0, 0.0, 0.0]
    # and it is the KL that diffusers' posterior computes, summed per example
    moments = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussianDistribution(moments)
    torch.testing.assert_close(L.gaussian_kl(posterior.mean, posterior.logvar), posterior.kl())


def test_reconstruction_nll_and_its_optimal_variance():
    x = torch.zeros(2, 1, 1, 2)
    x_hat = torch.tensor([[[[0.5, -1.0]]], [[[0.25, 0.25]]]])
    r = L.reconstruction_error(x, x_hat, "l1")
    s = torch.tensor(math.log(2.0), requires_grad=True)
    # Σ (r / 2 + log 2) / B = (2.0 / 2 + 4 log 2) / 2
    nll = L.reconstruction_nll(r, s)
    assert nll.item() == pytest.approx((2.0 / 2 + 4 * math.log(2.0)) / 2, abs=1e-6)
    assert L.reconstruction_error(x, x_hat, "l2").sum().item() == pytest.approx(0.25 + 1 + 2 * 0.0625)
    # the learned variance is optimal at e^s = mean(r): the gradient in s vanishes there
    s_opt = torch.tensor(math.log(r.mean().item()), requires_grad=True)
    (grad,) = torch.autograd.grad(L.reconstruction_nll(r, s_opt), s_opt)
    assert abs(grad.item()) < 1e-5
    with pytest.raises(ValueError, match="l1.*l2"):
        L.reconstruction_error(x, x_hat, "l3")


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_normalized_nll_is_a_density(kind):
    # exp(−nll) integrates to 1 over x for any x̂ and s
    xs = torch.linspace(-40, 40, 400_001, dtype=torch.float64)
    for s in (-1.0, 0.0, 0.7):
        density = torch.exp(-L.normalized_nll(xs, torch.full_like(xs, 0.3), s, kind))
        assert torch.trapezoid(density, xs).item() == pytest.approx(1.0, abs=1e-4)


def test_discriminator_and_generator_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.2])
    # hinge: ½ (mean(relu(1 − [2, .5])) + mean(relu(1 + [−3, .2]))) = ½ (0.25 + 0.6)
    assert L.discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.425)
    sp = lambda v: math.log1p(math.exp(v))  # softplus
    expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-3.0) + sp(0.2)) / 2)
    assert L.discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(expected, rel=1e-6)
    assert L.generator_loss(fake, "hinge").item() == pytest.approx(1.4)
    assert L.generator_loss(fake, "non_saturating").item() == pytest.approx((sp(3.0) + sp(-0.2)) / 2, rel=1e-6)
    # a perfect discriminator has zero hinge loss; −log σ agrees with its definition
    assert L.hinge_d_loss(torch.tensor([1.5]), torch.tensor([-1.0])).item() == 0.0
    assert L.generator_loss(torch.tensor([0.0]), "non_saturating").item() == pytest.approx(math.log(2.0))


def test_adaptive_weight_matches_manual_autograd():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=gen, requires_grad=True)  # the "last layer" G_L
    x, t = torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)
    out = x @ w.T
    rec = (out - t).abs().sum()
    gan = -(out * torch.linspace(0.1, 1.0, 3)).mean()
    grad_rec, grad_gan = L.last_layer_grads(rec, gan, w)
    # by hand: ∂|out − t|/∂W = sign(out − t)ᵀ x; ∂(−mean(out·c))/∂W = −(c/15)ᵀ Σ_n x_n
    torch.testing.assert_close(grad_rec, torch.sign(out - t).detach().T @ x)
    torch.testing.assert_close(grad_gan, -(torch.linspace(0.1, 1.0, 3) / 15)[:, None] * x.sum(0)[None, :])
    weight = L.adaptive_weight(grad_rec, grad_gan, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * grad_rec.norm().item() / (grad_gan.norm().item() + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    (rec + gan).backward()  # the graph survived for the real backward pass
    # clamped to 10⁴ · disc_weight when the GAN gradient vanishes
    assert L.adaptive_weight(torch.ones(4), torch.zeros(4), 0.5).item() == pytest.approx(0.5e4)


def test_patch_discriminator_is_per_example():
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, channels=8, layers=2)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    a, b = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    both = disc(torch.cat([a, b]))
    assert both.shape == (5, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6 patch logits
    torch.testing.assert_close(both[:2], disc(a))  # what shares a batch does not matter


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x, x + 0.1).tolist() == pytest.approx([20.0, 20.0])  # 10 log10(1 / 0.01)
    assert psnr(x, x + 0.01)[0].item() == pytest.approx(40.0)


def test_ssim_known_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=gen)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    # constant images a, b: σ terms vanish, SSIM = (2ab + C1) / (a² + b² + C1) with C1 = 0.01²
    a, b, c1 = 0.3, 0.5, 0.01**2
    full = lambda v: torch.full((1, 1, 16, 16), v, dtype=torch.float64)
    value = ssim(full(a), full(b)).item()
    assert value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    z = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))  # symmetric
    assert (ssim(x, z) < ssim(x, y)).all() and (ssim(x, y) < 1).all()  # more noise, lower SSIM


def test_lpips_fails_clearly_without_weights_or_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="loss.lpips_weights"):
        L.load_lpips(tmp_path / "missing.pth")
    weights = tmp_path / "lpips.pth"
    torch.save({}, weights)
    monkeypatch.setitem(__import__("sys").modules, "lpips", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install lpips"):
        L.load_lpips(weights)


def test_lpips_loads_local_weights_frozen_with_input_gradients(tmp_path, monkeypatch):
    import sys
    import types

    class FakeLPIPS(torch.nn.Module):  # the lpips.LPIPS interface: (x, x̂) -> (B, 1, 1, 1)
        def __init__(self, net, pretrained, pnet_rand, verbose):
            super().__init__()
            assert (net, pretrained, pnet_rand) == ("vgg", False, True)  # nothing downloaded
            self.conv = torch.nn.Conv2d(3, 2, 3)

        def forward(self, a, b):
            return (self.conv(a) - self.conv(b)).square().mean((1, 2, 3), keepdim=True)

    torch.manual_seed(0)
    weights = FakeLPIPS("vgg", False, True, False).state_dict()
    torch.save(weights, tmp_path / "lpips.pth")
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    distance = L.load_lpips(tmp_path / "lpips.pth")
    x, x_hat = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8, requires_grad=True)
    d = distance(x, x_hat)
    assert d.shape == (2, 1, 1, 1)
    d.sum().backward()
    assert x_hat.grad.abs().sum() > 0  # a real gradient reaches the reconstruction
    expected = FakeLPIPS("vgg", False, True, False)
    expected.load_state_dict(weights)
    torch.testing.assert_close(d.detach(), expected(x, x_hat.detach()))  # the local weights were loaded


def test_stage_says_once_that_lpips_is_off(caplog):
    from ldm.config import VAELossConfig
    from train.vae import make_perceptual

    with caplog.at_level("INFO"):
        assert make_perceptual(VAELossConfig(), "cpu") is None
    assert len([r for r in caplog.records if "LPIPS" in r.getMessage()]) == 1
    assert "LPIPS is off" in caplog.text and "loss.lpips_weights is not set" in caplog.text
