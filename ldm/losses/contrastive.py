"""Stage 0's objective: CLIP's symmetric contrastive loss (+ NegCLIP's hard-negative term), equation first.

    L    = ½ [CE(τ · V Tᵀ, I) + CE(τ · T Vᵀ, I)]        (Radford et al. 2021, Fig. 3; open_clip ``ClipLoss``)
    L_hn = (1/B) Σ_{i with a negative} −log softmax(τ vᵢ·tᵢ, τ vᵢ·nᵢ)₀   (Yuksekgonul et al. 2023, NegCLIP)

V, T, N: [B, E] unit image, caption and negative-caption features; τ = exp(logit_scale), learnable.
"""

from __future__ import annotations

import torch


def contrastive_loss(model, loss_fn, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     negative_ids: torch.Tensor | None = None, has_negative: torch.Tensor | None = None) -> torch.Tensor:
    """L (+ L_hn): pixel_values [B, 3, H, W] in [-1, 1], input_ids [B, L] -> scalar CLIP loss.

    ``loss_fn`` is open_clip's ``ClipLoss`` (with several processes it gathers every process's features with
    gradients: the loss of the global batch). negative_ids [B, L]: each caption with one word swapped,
    encoded in the same forward pass; has_negative [B] marks the captions that had a word to swap.
    """
    texts = input_ids if negative_ids is None else torch.cat([input_ids, negative_ids])
    image_features, text_features, logit_scale = model(pixel_values, texts)  # [B, E], [B or 2B, E], τ
    batch = len(input_ids)
    loss = loss_fn(image_features, text_features[:batch], logit_scale)
    if negative_ids is not None:
        loss = loss + hard_negative_loss(image_features, text_features[:batch], text_features[batch:], logit_scale,
                                         has_negative)
    return loss


def hard_negative_loss(image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, logit_scale: torch.Tensor,
                       has_negative: torch.Tensor) -> torch.Tensor:
    """NegCLIP's extra term (Yuksekgonul et al. 2023), per image between its caption and its negative:

        ℓ_i = −log( exp(τ vᵢ·tᵢ) / (exp(τ vᵢ·tᵢ) + exp(τ vᵢ·nᵢ)) ),   L = (1/B) Σ_{i with a negative} ℓ_i

    Dividing by the whole local batch B (not by the count with a negative) keeps the mean over
    processes equal to the mean over the global batch. image, text, negative: [B, E]; has_negative: [B].
    """
    logits = logit_scale * torch.stack([(image * text).sum(-1), (image * negative).sum(-1)], dim=1)  # [B, 2]
    per_image = torch.nn.functional.cross_entropy(logits, torch.zeros(len(image), dtype=torch.long,
                                                                      device=image.device), reduction="none")
    return (per_image * has_negative.to(per_image.dtype)).sum() / len(image)
