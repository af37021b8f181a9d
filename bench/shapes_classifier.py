"""An independent judge for the shapes data: a small CNN trained on real (rendered) shapes images.

The project's judge (``ldm.evaluation.judge``) fits templates and is lenient with blobs; this
classifier learns (colour, kind) from real single-shape images only, so it checks the judge. It
must reach >= 0.98 on held-out real images before its verdicts on generated images count.

    python bench/shapes_classifier.py --model demo/pipeline          # real accuracy, then the pipeline's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn

from ldm.data.shapes import COLOURS, KINDS, render, single_shape_scenes

TRAIN_SEED, HELDOUT_SEED = 20_000, 30_000  # disjoint from the training data (0) and the judge's prompts (10_000)
CLASSES = [(c, k) for c in COLOURS for k in KINDS]


def label(colour: str, kind: str) -> int:
    return CLASSES.index((colour, kind))


def real_images(num: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) in [0, 1] and (N,) labels of rendered single-shape scenes."""
    scenes = single_shape_scenes(num, seed, size)
    pixels = np.stack([np.asarray(render(s, size)) for s in scenes])
    labels = [label(s.shapes[0].colour, s.shapes[0].kind) for s in scenes]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, torch.tensor(labels)


def build_classifier() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.Flatten(), nn.Linear(64 * 16, 128),
                         nn.ReLU(), nn.Linear(128, len(CLASSES)))


def train_classifier(num: int = 8000, steps: int = 1500, seed: int = 0, size: int = 32) -> nn.Module:
    """Adam on real images, with light blur/noise so slightly soft generated edges are read fairly."""
    torch.manual_seed(seed)
    x, y = real_images(num, TRAIN_SEED + seed, size)
    model = build_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, num, (128,), generator=generator)
        batch = augment(x[idx], generator)
        loss = nn.functional.cross_entropy(model(batch * 2 - 1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random 3x3 box blur on half the images and Gaussian pixel noise (σ ≤ 0.04)."""
    blurred = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5
    x = torch.where(pick, 0.5 * x + 0.5 * blurred, x)
    return (x + 0.04 * torch.rand(len(x), 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)).clamp(0, 1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class indices of (N, 3, H, W) images in [0, 1]."""
    return torch.cat([model(chunk * 2 - 1).argmax(1) for chunk in images.split(256)])


def load_or_train(path: str | Path | None = None) -> nn.Module:
    """The classifier, trained once and kept as safetensors at ``path`` (if given)."""
    from safetensors.torch import load_file, save_file

    model = build_classifier()
    if path and Path(path).exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_classifier()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def real_accuracy(model: nn.Module, num: int = 1000) -> float:
    x, y = real_images(num, HELDOUT_SEED)
    return float((predict(model, x) == y).float().mean())


def pipeline_accuracy(model: nn.Module, pipe, num: int = 100, guidance: float = 5.0, steps: int = 20,
                      seed: int = 0) -> float:
    """Accuracy on the judge's held-out prompts (the same prompts and generators as ``judge_pipeline``)."""
    from ldm.evaluation.pipeline import HELD_OUT_SEED

    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scenes = single_shape_scenes(num, HELD_OUT_SEED + seed, size)
    correct = 0
    for start in range(0, num, 25):
        chunk = scenes[start:start + 25]
        generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        images = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="pt").images
        labels = torch.tensor([label(s.shapes[0].colour, s.shapes[0].kind) for s in chunk])
        correct += int((predict(model, images.float()) == labels).sum())
    return correct / num


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a shapes pipeline folder to judge (optional)")
    parser.add_argument("--weights", default="outputs/shapes_classifier.safetensors")
    parser.add_argument("--num", type=int, default=100)
    args = parser.parse_args()
    classifier = load_or_train(args.weights)
    print(f"classifier accuracy on 1000 held-out real images: {real_accuracy(classifier):.3f}")
    if args.model:
        from ldm.sampling import load_pipeline

        pipe = load_pipeline(args.model, scheduler="dpm++")
        for guidance in (5.0, 1.0):
            print(f"generated, guidance {guidance}: {pipeline_accuracy(classifier, pipe, args.num, guidance):.3f}")


if __name__ == "__main__":
    main()
