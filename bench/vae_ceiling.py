"""The stage-1 ceiling: how many held-out real shapes images stay recognisable after an encode–decode
round trip. No U-Net trained on a VAE's latents can score above its round trip.

    python bench/vae_ceiling.py demo/vae/final [demo/vae/checkpoint-1000 ...]

Each argument is a saved VAE folder or a stage-1 checkpoint (its EMA weights, or with --raw its raw ones). Prints the
project judge's and the real-image classifier's accuracy on round trips of 500 single-shape images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.shapes_classifier import HELDOUT_SEED, label, load_or_train, predict
from ldm.data.shapes import render, single_shape_scenes
from ldm.evaluation.judge import judge


def load_vae(path: str | Path, raw: bool = False):
    """AutoencoderKL from a final folder, or from a checkpoint's EMA (else raw) autoencoder weights."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "config.json").exists():
        return AutoencoderKL.from_pretrained(path).eval()
    final = path.parent / "final"
    if final.exists():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(final))
    else:  # a run still training: the architecture of the shapes config
        from bench.common import shapes_configs
        from ldm.models.vae import build_vae

        model_cfg = shapes_configs()[0]
        vae = build_vae(model_cfg.model, model_cfg.data.resolution)
    weights = path / "ema-autoencoder.safetensors"
    state = load_file(str(weights if weights.exists() and not raw else path / "model-autoencoder.safetensors"))
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")})
    return vae.eval()


@torch.no_grad()
def round_trip_accuracy(vae, classifier, num: int = 500, size: int = 32) -> dict:
    scenes = single_shape_scenes(num, HELDOUT_SEED + 1, size)
    pixels = torch.from_numpy(np.stack([np.asarray(render(s, size)) for s in scenes])).permute(0, 3, 1, 2).float()
    x = pixels / 127.5 - 1
    x_hat = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(100)])
    images = ((x_hat + 1) / 2).clamp(0, 1)
    labels = torch.tensor([label(s.shapes[0].colour, s.shapes[0].kind) for s in scenes])
    uint8 = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    judged = [judge(img, s.shapes[0].colour, s.shapes[0].kind).correct for img, s in zip(uint8, scenes)]
    return {"judge": float(np.mean(judged)), "classifier": float((predict(classifier, images) == labels).float().mean()),
            "psnr": float(10 * torch.log10(4 / (x_hat.clamp(-1, 1) - x).square().mean()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vaes", nargs="+")
    parser.add_argument("--weights", default="outputs/shapes_classifier.safetensors")
    parser.add_argument("--raw", action="store_true", help="a checkpoint's raw weights instead of its EMA")
    args = parser.parse_args()
    classifier = load_or_train(args.weights)
    for path in args.vaes:
        r = round_trip_accuracy(load_vae(path, args.raw), classifier)
        print(f"{path}: round-trip judge {r['judge']:.3f}, classifier {r['classifier']:.3f}, PSNR {r['psnr']:.2f} dB")


if __name__ == "__main__":
    main()
