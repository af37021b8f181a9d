"""Latent against pixel space: the same U-Net trained and sampled on pixels and on f=4 / f=8 latents.

    python bench/latent_vs_pixel.py                       # 32 px: 32x32x3 vs 8x8x4 vs 4x4x4
    python bench/latent_vs_pixel.py --resolutions 64 --repeats 1 --warmup 0   # 64 px (~2 min), the trend

One U-Net width for every space (the shapes config: channels, levels, attention, text width); only
its input/output channels and sample size follow the space. Per space and resolution:
  train   one step (forward, backward, AdamW) on a batch of clean inputs + text states, as our trainer
          runs it on cached latents (the VAE encode is then paid once, not per step; its cost per
          batch is printed apart);
  sample  a ``--steps``-step DPM-Solver++ run with classifier-free guidance (the U-Net sees 2x the
          batch), plus the VAE decode for the latent spaces.
The spaces are timed in turns inside one process; medians and ratios pixel/latent are printed.
The latent-diffusion paper (Rombach et al. 2022, Fig. 6/7) reports >= 2.7x at 256 px.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import add_common_args, apply_common_args, interleaved, print_table, shapes_configs  # noqa: E402

SPACES = {"pixel": None, "f=4": (32, 64, 64), "f=8": (32, 64, 64, 64)}  # VAE levels of the shapes VAE (+1 for f=8)


def build_space(name: str, resolution: int, seed: int):
    """(U-Net, VAE or None, (channels, side)) for one space at one image resolution."""
    from ldm.models.unet import build_unet
    from ldm.models.vae import build_vae

    vae_cfg, text_cfg, unet_cfg = shapes_configs()
    torch.manual_seed(seed)
    vae = None
    if SPACES[name] is not None:
        model = dataclasses.replace(vae_cfg.model, block_out_channels=SPACES[name])
        vae = build_vae(model, resolution).eval().requires_grad_(False)
    factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    channels = 3 if vae is None else vae.config.latent_channels
    side = resolution // factor
    unet = build_unet(unet_cfg.model, side, channels, text_cfg.model.text_width)
    return unet, vae, (channels, side)


class Space:
    """Callables timing one training step and one guided sampling run in a space."""

    def __init__(self, name: str, resolution: int, args):
        from diffusers import DPMSolverMultistepScheduler

        from ldm.models.unet import build_noise_scheduler

        self.name, self.resolution = name, resolution
        self.unet, self.vae, (channels, side) = build_space(name, resolution, args.seed)
        _, text_cfg, unet_cfg = shapes_configs()
        g = torch.Generator().manual_seed(args.seed)
        width, tokens = text_cfg.model.text_width, text_cfg.model.text_context_length
        self.x0 = torch.randn(args.batch_size, channels, side, side, generator=g)
        self.text = torch.randn(args.batch_size, tokens, width, generator=g)
        self.pixels = torch.randn(args.batch_size, 3, resolution, resolution, generator=g)
        self.noise_schedule = build_noise_scheduler(unet_cfg.diffusion, learned_variance=False)
        self.sampler = DPMSolverMultistepScheduler.from_config(self.noise_schedule.config, algorithm_type="dpmsolver++")
        self.sample_shape = (args.sample_batch, channels, side, side)
        self.sample_text = torch.randn(2 * args.sample_batch, tokens, width, generator=g)
        self.steps, self.guidance = args.steps, args.guidance
        self.train_unet = copy.deepcopy(self.unet).train()
        self.optimizer = torch.optim.AdamW(self.train_unet.parameters(), lr=1e-4)

    def train_step(self) -> None:
        t = torch.randint(0, 1000, (len(self.x0),))
        noise = torch.randn_like(self.x0)
        x_t = self.noise_schedule.add_noise(self.x0, noise, t)
        loss = (self.train_unet(x_t, t, encoder_hidden_states=self.text).sample - noise).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(self) -> torch.Tensor:
        self.sampler.set_timesteps(self.steps)
        x = torch.randn(self.sample_shape, generator=torch.Generator().manual_seed(0)) * self.sampler.init_noise_sigma
        for t in self.sampler.timesteps:
            uncond, cond = self.unet(torch.cat([x, x]), t, encoder_hidden_states=self.sample_text).sample.chunk(2)
            x = self.sampler.step(uncond + self.guidance * (cond - uncond), t, x).prev_sample
        return x if self.vae is None else self.vae.decode(x).sample

    @torch.no_grad()
    def encode(self) -> None:
        if self.vae is not None:
            self.vae.encode(self.pixels).latent_dist.sample()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--resolutions", default="32", help="comma-separated image sides, e.g. 32,64")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=4, help="images per sampling run")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed turns first (0 for slow 64 px runs)")
    add_common_args(parser)
    parser.set_defaults(repeats=3)
    return parser.parse_args(argv)


def measure(resolution: int, args) -> list[list]:
    spaces = {name: Space(name, resolution, args) for name in SPACES}
    train = interleaved({n: s.train_step for n, s in spaces.items()}, args.repeats, args.warmup)
    sample = interleaved({n: s.sample for n, s in spaces.items()}, args.repeats, args.warmup)
    encode = interleaved({n: s.encode for n, s in spaces.items() if s.vae is not None}, args.repeats, warmup=1)
    rows = []
    for name, space in spaces.items():
        _, c, h, w = space.sample_shape
        latent = name != "pixel"
        rows.append([f"{resolution} px", name, f"{c}x{h}x{w}", train.median(name), sample.median(name),
                     f"{train.ratio('pixel', name):.1f}x" if latent else "1", f"{sample.ratio('pixel', name):.1f}x"
                     if latent else "1", f"{encode.median(name) * 1e3:.0f} ms" if latent else "-"])
    return rows


def main(argv=None) -> list[list]:
    args = parse_args(argv)
    apply_common_args(args)
    rows = [row for r in args.resolutions.split(",") for row in measure(int(r), args)]
    print(f"\nsame U-Net width (shapes config), train batch {args.batch_size}, sampling {args.sample_batch} images x "
          f"{args.steps} DPM-Solver++ steps with guidance; medians of {args.repeats} interleaved turns")
    print_table(["resolution", "space", "U-Net input", "train s/step", "sample s", "train pixel/this",
                 "sample pixel/this", "VAE encode/batch"], rows)
    return rows


if __name__ == "__main__":
    main()
