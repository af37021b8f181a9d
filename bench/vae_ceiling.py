"""The stage-1 ceiling: how many held-out real shapes images stay recognisable after an encode–decode
round trip. No U-Net trained on a VAE's latents can score above its round trip.

    python bench/vae_ceiling.py demo/vae/final [demo/vae/checkpoint-1000 ...]
    python bench/vae_ceiling.py demo/pipeline/vae --heldout runs/ft/data/heldout   # real data of your own

Each argument is a saved VAE folder or a stage-1 checkpoint (its EMA weights, or with --raw its raw ones). Prints the
project judge's and the real-image classifier's accuracy on round trips of 500 single-shape images; with
--heldout, the data's own judge (digit classifier or class judge, as `ldm eval pipeline` picks it: fitted
on the real images of held-out half A, ceiling on half B) on round trips of half A's images. That is the
ceiling of any fine-tune of a U-Net on this VAE's latents for that data.
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


@torch.no_grad()
def heldout_round_trip(vae, folder: str, num: int = 1000) -> dict:
    """The data's own judge on round trips of held-out half A (``ldm eval pipeline``'s halves and judges)."""
    from ldm.config import DataConfig
    from ldm.data.images import ImageCaptionDataset
    from ldm.evaluation.pipeline import classifier_reading, data_kind, heldout_halves, to_uint8

    size = vae.config.sample_size
    dataset = ImageCaptionDataset(DataConfig(path=folder, resolution=size))
    real_a, real_b = heldout_halves(dataset, num, seed=0)
    x = real_a["pixel_values"]
    x_hat = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(100)]).clamp(-1, 1)
    kind = data_kind(list(real_a["caption"]) + list(real_b["caption"]))
    if kind not in ("digits", "classes"):
        raise SystemExit(f"{folder}: its captions are neither digits nor a few classes; no judge to read them")
    read = classifier_reading(kind, to_uint8(x_hat), real_a, real_b, size)
    return {"judge": read["classifier_accuracy"], "ceiling": read["classifier_real_accuracy"],
            "psnr": float(10 * torch.log10(4 / (x_hat - x).square().mean())), "kind": kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vaes", nargs="+")
    parser.add_argument("--weights", default="outputs/shapes_classifier.safetensors")
    parser.add_argument("--raw", action="store_true", help="a checkpoint's raw weights instead of its EMA")
    parser.add_argument("--heldout", help="an imagefolder of held-out digits or class-captioned images")
    args = parser.parse_args()
    if args.heldout:
        for path in args.vaes:
            r = heldout_round_trip(load_vae(path, args.raw), args.heldout)
            print(f"{path}: round trips of {args.heldout} read right by its {r['kind']} judge {r['judge']:.3f} "
                  f"(real images {r['ceiling']:.3f}), PSNR {r['psnr']:.2f} dB")
        return
    classifier = load_or_train(args.weights)
    for path in args.vaes:
        r = round_trip_accuracy(load_vae(path, args.raw), classifier)
        print(f"{path}: round-trip judge {r['judge']:.3f}, classifier {r['classifier']:.3f}, PSNR {r['psnr']:.2f} dB")


if __name__ == "__main__":
    main()
