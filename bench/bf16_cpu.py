"""bf16 autocast vs fp32 for one shapes-sized U-Net training step on this CPU (forward, backward, AdamW).

    python bench/bf16_cpu.py [--batch 64] [--repeats 12]

The two modes alternate step by step after 3 warm-up steps each; the medians and their ratio are printed.
On a CPU without bf16 units autocast is much slower; with AVX512-BF16 it may or may not pay.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel


def shapes_unet() -> UNet2DConditionModel:
    """configs/unet/shapes.yaml's U-Net: blocks (64, 128), cross-attention to 128-wide text, 8x8x4 latents."""
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
                                attention_head_dim=4, norm_num_groups=32, cross_attention_dim=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = shapes_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x, text = torch.randn(args.batch, 4, 8, 8), torch.randn(args.batch, 24, 128)
    t = torch.randint(0, 1000, (args.batch,))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(x, t, text).sample
        (out.float() - x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for _ in range(3):
        step(False), step(True)
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"batch {args.batch}, {torch.get_num_threads()} threads: fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s "
          f"per step; bf16 / fp32 = {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
