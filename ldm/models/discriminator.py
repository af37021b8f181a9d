"""PatchGAN discriminator (Isola et al. 2017, pix2pix §3.2.2; the ``NLayerDiscriminator`` of
Esser et al. 2021 / Rombach et al. 2022).

It classifies overlapping patches rather than whole images: the output is a (B, 1, h, w) map of
logits, one per receptive field (70x70 pixels with ``layers=3``; 34x34 with ``layers=2``).

GroupNorm replaces pix2pix's BatchNorm. BatchNorm's statistics are taken over the batch, so its
output for one image depends on which other images share its process's batch: a run with 2
processes x batch B would differ from 1 process x batch 2B, and the real and fake halves would
leak statistics into each other. GroupNorm normalises each example on its own, so the result
does not depend on how a batch is split, and resume and multi-process training stay exact.
"""

from __future__ import annotations

import math

from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """conv(4, s2) + LeakyReLU, then ``layers - 1`` x [conv(4, s2) + GN + LeakyReLU], conv(4, s1) + GN +
    LeakyReLU, conv(4, s1) -> 1 channel of patch logits. Channels double per layer, capped at 8x."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"loss.disc_layers must be >= 1 (got {layers})")
        blocks = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            out = channels * min(2 ** n, 8)
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), _group_norm(out), nn.LeakyReLU(0.2, True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, x):
        """(B, C, H, W) in [-1, 1] -> (B, 1, h, w) logits."""
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """pix2pix initialisation: conv ~ N(0, 0.02), norm scale ~ N(1, 0.02), bias 0 (global torch RNG)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
