"""The latent-diffusion autoencoder objective as small pure functions (plus the LPIPS loader).

    L_AE = NLL(x, x̂; s) + β·KL(q(z|x) ‖ N(0, I)) + λ·L_G(D(x̂))        (autoencoder, step 1)
    L_D  = hinge or non-saturating loss on D(x), D(x̂)                (discriminator, step 2)

Conventions follow ``LPIPSWithDiscriminator`` of Rombach et al. 2022 (taming-transformers /
latent-diffusion): the NLL and the KL are *summed* over an example's dimensions and averaged over
the batch, so ``loss.kl_weight`` (β) means what it means there (1e-6 for SD's f=8 VAE); the GAN
losses are means over the patch logits. Images are (B, 3, H, W) in [-1, 1]; posterior moments
are (B, C, h, w).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Likelihood and prior terms
# --------------------------------------------------------------------------------------------
def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """r = |x − x̂| (l1) or (x − x̂)² (l2), elementwise (B, 3, H, W)."""
    if kind == "l1":
        return (x - x_hat).abs()
    if kind == "l2":
        return (x - x_hat).square()
    raise ValueError(f"loss.reconstruction must be 'l1' or 'l2', got {kind!r}")


def reconstruction_nll(r: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """NLL = (1/B) Σ (r / e^s + s) over all elements (Rombach et al. 2022, ``LPIPSWithDiscriminator``).

    r (B, ...) is the per-element reconstruction error (plus the weighted LPIPS distance, which
    broadcasts over pixels); s is the learned scalar log-variance. Returns a scalar.
    """
    nll = r / torch.exp(logvar) + logvar  # (B, ...)
    return nll.sum() / r.shape[0]


def normalized_nll(x: torch.Tensor, x_hat: torch.Tensor, logvar: float | torch.Tensor,
                   kind: str = "l1") -> torch.Tensor:
    """−log p(x|x̂) per element in nats, of the density ∝ exp(−r / e^s) that the NLL above trains.

    l1: Laplace with scale b = e^s, −log p = |x − x̂| / b + log 2b.
    l2: Gaussian with variance e^s / 2, −log p = (x − x̂)² / e^s + ½ log(π e^s).
    Returns (B, ...) for data scaled to [-1, 1].
    """
    s = torch.as_tensor(logvar, dtype=x.dtype, device=x.device)
    r = reconstruction_error(x, x_hat, kind)
    if kind == "l1":
        return r / torch.exp(s) + s + math.log(2.0)
    return r / torch.exp(s) + 0.5 * (s + math.log(math.pi))


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, App. B); (B,)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


# --------------------------------------------------------------------------------------------
# Adversarial terms (logits: (B, 1, h, w) patch maps)
# --------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = ½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))]) (Lim & Ye 2017; Esser et al. 2021)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = ½ (E[−log σ(D(x))] + E[−log(1 − σ(D(x̂)))]) = ½ (E[softplus(−D(x))] + E[softplus(D(x̂))])
    (Goodfellow et al. 2014, eq. 1)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "non_saturating":
        return non_saturating_d_loss(logits_real, logits_fake)
    raise ValueError(f"loss.disc_loss must be 'hinge' or 'non_saturating', got {kind!r}")


def generator_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """hinge: L_G = −E[D(x̂)] (Lim & Ye 2017); non_saturating: L_G = E[softplus(−D(x̂))] = E[−log σ(D(x̂))]
    (Goodfellow et al. 2014, §3)."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"loss.disc_loss must be 'hinge' or 'non_saturating', got {kind!r}")


def adaptive_weight(grad_rec: torch.Tensor, grad_gan: torch.Tensor, disc_weight: float,
                    eps: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """λ = clamp(‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ), 0, 10⁴) · w_disc  (Esser et al. 2021, eq. 7).

    grad_rec, grad_gan: gradients of the reconstruction NLL and of L_G with respect to the
    decoder's last layer G_L; w_disc is ``loss.disc_weight``. Returns a detached scalar.
    """
    weight = torch.linalg.vector_norm(grad_rec) / (torch.linalg.vector_norm(grad_gan) + eps)
    return (weight.clamp(0.0, max_weight) * disc_weight).detach()


def last_layer_grads(rec_loss: torch.Tensor, gan_loss: torch.Tensor,
                     last_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_{G_L} L_rec, ∇_{G_L} L_GAN) by autograd, keeping the graph for the full backward pass."""
    grad_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    grad_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return grad_rec, grad_gan


# --------------------------------------------------------------------------------------------
# The composition (step 1 of a VAE training step)
# --------------------------------------------------------------------------------------------
def autoencoder_objective(x: torch.Tensor, x_hat: torch.Tensor, mean: torch.Tensor, logvar_q: torch.Tensor,
                          logvar: torch.Tensor, cfg, perceptual=None, logits_fake: torch.Tensor | None = None,
                          last_layer: torch.Tensor | None = None,
                          mean_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """L_AE = NLL(x, x̂; s) + β·KL(q ‖ N(0, I)) [+ λ·L_G(D(x̂))]  (module docstring; λ = ``adaptive_weight``).

    x, x_hat: (B, 3, H, W); mean, logvar_q: the posterior (B, C, h, w); logvar: the learned s (scalar).
    ``cfg`` is the ``loss.*`` section (reconstruction, perceptual_weight, kl_weight, disc_loss, disc_weight);
    r = reconstruction error (+ perceptual_weight · LPIPS when ``perceptual`` is given). With ``logits_fake``
    (D(x̂), the discriminator frozen) the GAN term is added, λ from the gradients at ``last_layer`` (the
    decoder's last weight), averaged by ``mean_over_processes`` (λ of the global batch) when given.
    Returns (L, detached terms for logging).
    """
    r = reconstruction_error(x.float(), x_hat.float(), cfg.reconstruction)  # (B, 3, H, W)
    if perceptual is not None:
        r = r + cfg.perceptual_weight * perceptual(x, x_hat)  # + (B, 1, 1, 1)
    nll = reconstruction_nll(r, logvar)
    kl = gaussian_kl(mean.float(), logvar_q.float()).mean()
    loss = nll + cfg.kl_weight * kl
    terms = {"nll": nll.detach(), "kl": kl.detach(), "rec_l1": (x - x_hat).abs().mean().detach()}
    if logits_fake is not None:
        g_loss = generator_loss(logits_fake, cfg.disc_loss)
        grad_rec, grad_gan = last_layer_grads(nll, g_loss, last_layer)
        if mean_over_processes is not None:
            grad_rec, grad_gan = mean_over_processes(grad_rec), mean_over_processes(grad_gan)
        weight = adaptive_weight(grad_rec, grad_gan, cfg.disc_weight)
        loss = loss + weight * g_loss
        terms |= {"g_loss": g_loss.detach(), "gan_weight": weight}
    return loss, terms | {"loss": loss.detach()}


# --------------------------------------------------------------------------------------------
# Perceptual term (optional: needs the `lpips` package and local weights)
# --------------------------------------------------------------------------------------------
def load_lpips(weights: str | Path, device=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A frozen VGG LPIPS (Zhang et al. 2018) from a *complete* local state dict: (x, x̂) -> (B, 1, 1, 1).

    ``lpips.LPIPS`` normally downloads its VGG backbone through torchvision, which is impossible
    offline; so the file must hold every tensor (backbone and linear heads), e.g. made where the
    Hub is reachable with ``torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.pth")``
    (or the same dict in a .safetensors file).
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"loss.lpips_weights={weights} does not exist; point it at a complete LPIPS "
                                f"VGG state dict, or set loss.lpips_weights=null to train without LPIPS")
    try:
        import lpips
    except ImportError as err:
        raise ImportError("loss.lpips_weights is set but the `lpips` package is not installed (it is not a "
                          "dependency of this project): pip install lpips, or set loss.lpips_weights=null") from err
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    net.load_state_dict(state)
    net = net.eval().requires_grad_(False).to(device)
    return lambda x, x_hat: net(x.float(), x_hat.float())
