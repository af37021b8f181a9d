"""Fréchet distance, KID and CLIP score of generated images, in a named CLIP feature space.

The metrics are pure functions of feature arrays [N, E] (computed in float64 numpy):

    FD   = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)              Heusel et al. 2017 (FID), eq. 6
    KID  = MMD²ᵤ(X, Y) with k(x, y) = (xᵀy / d + 1)³, averaged over random subsets   Bińkowski et al. 2018
    CLIP = 100 · max(cos(E_I, E_C), 0) per image-caption pair   Hessel et al. 2021 (as torchmetrics)

The feature space is the image tower of a CLIP (``FeatureSpace``): the one stage 0 trained with the
pipeline (its ``open_clip/`` folder), or an open_clip model the user names with local weights. The
name of the space travels with every report: numbers from two spaces cannot be compared.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """μ = mean of the rows [E], Σ = their unbiased covariance [E, E] (features [N, E], N ≥ 2)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features of shape [N >= 2, E], got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """A^½ = V diag(√max(λ, 0)) Vᵀ for a symmetric positive semi-definite A = V diag(λ) Vᵀ (eigh)."""
    a = np.asarray(matrix, dtype=np.float64)
    eigenvalues, vectors = np.linalg.eigh((a + a.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ₁Σ₂)^½) = Tr((Σ₁^½ Σ₂ Σ₁^½)^½) = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½).

    Σ₁Σ₂ is not symmetric, but it is similar to the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same
    eigenvalues, all ≥ 0), whose eigenvalues ``eigvalsh`` finds stably; no complex parts to drop.
    """
    root = sqrtm_psd(sigma1)
    inner = root @ np.asarray(sigma2, dtype=np.float64) @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FD = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr((Σ₁Σ₂)^½): the squared 2-Wasserstein distance of
    N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982; FID, Heusel et al. 2017). Clipped at 0 (rounding)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shapes differ: μ {mu1.shape} vs {mu2.shape}, Σ {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def frechet_distance_features(x: np.ndarray, y: np.ndarray) -> float:
    """FD between Gaussians fitted to features x [N, E] and y [M, E] (``feature_statistics``)."""
    return frechet_distance(*feature_statistics(x), *feature_statistics(y))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy / d + 1)³ for all rows: [N, d] x [M, d] -> [N, M] (the KID kernel)."""
    return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """MMD²ᵤ = 1/(m(m−1)) Σ_{i≠j} k(xᵢ,xⱼ) + 1/(n(n−1)) Σ_{i≠j} k(yᵢ,yⱼ) − 2/(mn) Σ_{i,j} k(xᵢ,yⱼ)
    (Gretton et al. 2012, eq. 3), x [m, d], y [n, d], m, n ≥ 2, polynomial kernel."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2 * k_xy.mean())


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID = mean (and std) over ``num_subsets`` of MMD²ᵤ(x_S, y_S'), S, S' random subsets of
    min(subset_size, N, M) rows drawn without replacement with a seeded generator (Bińkowski et al. 2018)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """CLIPScore(I, C) = 100 · max(cos(E_I, E_C), 0) for each row pair [N, E] -> [N] (Hessel et al. 2021;
    torchmetrics' ``CLIPScore`` reports the mean)."""
    a, b = np.asarray(image_features, np.float64), np.asarray(text_features, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return 100.0 * np.clip(cos, 0, None)


# --------------------------------------------------------------------------------------------
# The feature space: a CLIP's image (and text) tower
# --------------------------------------------------------------------------------------------
@dataclass
class FeatureSpace:
    """An open_clip model that maps images in [-1, 1] and captions to its projected embeddings [N, E]."""

    model: torch.nn.Module
    tokenizer: object  # open_clip tokenizer: list[str] -> [N, L] ids
    name: str  # what the report says, e.g. "stage-0 CLIP image tower (open_clip/ of the pipeline), 128-d at 32 px"

    @torch.no_grad()
    def images(self, pixels: torch.Tensor, batch_size: int = 128) -> np.ndarray:
        """pixels [N, 3, H, W] in [-1, 1] -> image embeddings [N, E] (resized and normalised as the model wants)."""
        cfg = self.model.visual.preprocess_cfg
        size = tuple(cfg["size"]) if isinstance(cfg["size"], (list, tuple)) else (cfg["size"],) * 2
        mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        device, out = next(self.model.parameters()).device, []
        for chunk in pixels.split(batch_size):
            x = (chunk.float().cpu().clamp(-1, 1) + 1) / 2  # [0, 1]
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            out.append(self.model.encode_image(((x - mean) / std).to(device)).float().cpu())
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def texts(self, captions: list[str], batch_size: int = 256) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = [self.model.encode_text(self.tokenizer(captions[i:i + batch_size]).to(device)).float().cpu()
               for i in range(0, len(captions), batch_size)]
        return torch.cat(out).double().numpy()


def find_stage0_clip(model: str | Path) -> Path | None:
    """The ``open_clip/`` folder of the CLIP stage 0 trained for this pipeline, if there is one:
    ``<model>/open_clip`` (stage 2 copies it there), else beside the text encoder the pipeline's
    ``training.json`` names, else that of the base pipeline of a LoRA folder."""
    from ldm.models.text import OPEN_CLIP_CONFIG

    model = Path(model)
    candidates = [model / "open_clip"]
    summary_path = model / "training.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        config = summary.get("config", {})
        candidates += [Path(p) / "open_clip" for p in (config.get("text_encoder"), summary.get("base_model")) if p]
    return next((c for c in candidates if (c / OPEN_CLIP_CONFIG).is_file()), None)


def load_feature_space(model: str | Path | None = None, clip: str | None = None,
                       device: str | torch.device = "cpu") -> FeatureSpace | None:
    """The named CLIP (``clip``), else the pipeline's stage-0 CLIP, else None (the report says so).

    ``clip``: ``MODEL_NAME:PRETRAINED`` (an open_clip architecture and a local weights file, e.g.
    ``ViT-B-32:/models/vit_b_32.safetensors``; nothing is downloaded when offline), an open_clip
    ``local-dir:DIR`` / ``hf-hub:ORG/REPO`` name, or a folder written by ``save_open_clip``.
    """
    import open_clip

    if clip:
        if (Path(clip) / "open_clip_config.json").is_file():
            name, pretrained, label = f"local-dir:{clip}", None, f"CLIP image tower ({_short(clip)})"
        elif clip.startswith(("local-dir:", "hf-hub:")):
            name, pretrained, label = clip, None, f"open_clip {clip}"
        else:
            name, _, pretrained = clip.partition(":")
            if pretrained and not Path(pretrained).exists() and ("/" in pretrained or "." in pretrained):
                raise FileNotFoundError(f"--clip {clip}: weights file {pretrained} does not exist")
            label = f"open_clip {name}" + (f" ({Path(pretrained).name})" if pretrained else " (random weights)")
            if not pretrained:
                logger.warning("--clip %s names no weights (MODEL_NAME:PRETRAINED_PATH): its features are random", clip)
    else:
        folder = find_stage0_clip(model) if model else None
        if folder is None:
            return None
        inside = folder == Path(model) / "open_clip"
        name, pretrained = f"local-dir:{folder}", None
        label = f"stage-0 CLIP image tower ({'open_clip/ of the pipeline' if inside else _short(folder)})"
    net = open_clip.create_model(name, pretrained=pretrained or None, device=device).eval()
    size = net.visual.preprocess_cfg["size"]
    label += f", {net.visual.output_dim}-d at {size[0] if isinstance(size, (list, tuple)) else size} px"
    return FeatureSpace(net, open_clip.get_tokenizer(name), label)


def _short(path) -> str:
    """The last three parts of a path: names the folder without publishing the machine's layout."""
    path = Path(path)
    return "/".join(path.parts[len(path.anchor and [path.anchor]):][-3:])
