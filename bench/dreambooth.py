"""DreamBooth on the demo pipeline: does the identifier prompt learn a concept the base model never saw, and
does the class prompt keep working?

    python bench/dreambooth.py --base demo/pipeline --out runs/dreambooth/bench [--set lora.rank=0 ...]

Concept: a red *ring* (hollow circle, ``ldm.data.shapes`` kind "ring"), which the demo data never shows.
  instance images   5 rendered red rings, large, in the centre, on gray (32 px)
  instance prompt   "a large red sks circle in the center on a gray background"
  class prompt      "a large red circle in the center on a gray background"   (prior preservation)
Detector (stated): the project's shapes judge with a ring template added to its kinds, i.e. the largest
red region's best-IoU template among {circle, square, triangle, cross, ring} is the ring. It is validated
first on real rings vs real red circles, rendered and after the base VAE's encode–decode round trip.
Measured before and after ``ldm train unet --config configs/unet/dreambooth.yaml``:
  concept rate      fraction of N images of the instance prompt the detector calls a red ring
  class accuracy    the judge's accuracy (red + circle) on N images of the class prompt, and the real-image
                    CNN's (bench/shapes_classifier.py) when its weights are given; its ring rate (leakage)
  held-out judge    the demo's judge on its 100 held-out single-shape prompts (what the model knew overall)
Results go to OUT/results.json and OUT/samples.png (rows: instance prompt before/after, class prompt
before/after).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CONFIGS, print_environment  # noqa: E402  (sets the offline environment)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.data.shapes import KINDS, render, sample_scene  # noqa: E402
from ldm.evaluation.judge import judge  # noqa: E402

INSTANCE = "a large red sks circle in the center on a gray background"
CLASS = "a large red circle in the center on a gray background"
READABLE = KINDS + ("ring",)


def centre_scenes(kind: str, num: int, seed: int) -> list:
    """``num`` single-shape scenes of the prompts' layout: a large red ``kind`` in the centre on gray."""
    rng, scenes = random.Random(f"dreambooth-{kind}-{seed}"), []
    while len(scenes) < num:
        scene = sample_scene(rng, 32, colours=("red",), two_shape_prob=0.0, kinds=(kind,))
        shape = scene.shapes[0]
        if shape.size == "large" and shape.position == "center" and scene.background == "gray":
            scenes.append(scene)
    return scenes


def is_ring(image: np.ndarray) -> bool:
    """The detector: the judge reads the largest red region as a ring (uint8 (H, W, 3) image)."""
    return judge(image, "red", "ring", kinds=READABLE).correct


def round_trip(vae, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def validate_detector(vae, num: int = 200) -> dict:
    """Detector accuracy on real rings (positives) and real red circles (negatives), rendered and round-tripped."""
    rings = np.stack([np.asarray(render(s, 32)) for s in centre_scenes("ring", num, 1)])
    circles = np.stack([np.asarray(render(s, 32)) for s in centre_scenes("circle", num, 1)])
    out = {}
    for name, (pos, neg) in {"rendered": (rings, circles),
                             "vae_round_trip": (round_trip(vae, rings), round_trip(vae, circles))}.items():
        tp, fp = np.mean([is_ring(x) for x in pos]), np.mean([is_ring(x) for x in neg])
        out[name] = {"rings_detected": tp, "circles_detected": fp, "accuracy": (tp + 1 - fp) / 2}
    return out


def generate(pipe, prompt: str, num: int, seed: int = 1_000) -> np.ndarray:
    """``num`` uint8 images of ``prompt``, image i from its own generator seeded seed + i (DPM-Solver++ 20, g 5)."""
    images = []
    for first in range(0, num, 25):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(first, min(first + 25, num))]
        out = pipe(prompt, num_images_per_prompt=len(gens), num_inference_steps=20, guidance_scale=5.0,
                   generator=gens, output_type="np").images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images)


def measure(pipe, num: int, classifier) -> tuple[dict, np.ndarray, np.ndarray]:
    from ldm.evaluation.pipeline import judge_pipeline

    instance, klass = generate(pipe, INSTANCE, num), generate(pipe, CLASS, num)
    row = {"concept_rate": float(np.mean([is_ring(x) for x in instance])),
           "class_judge_accuracy": float(np.mean([judge(x, "red", "circle").correct for x in klass])),
           "class_ring_rate": float(np.mean([is_ring(x) for x in klass])),
           "heldout_judge_accuracy": judge_pipeline(pipe, num=100)["accuracy"]}
    if classifier is not None:
        from bench.shapes_classifier import label, predict

        pixels = torch.from_numpy(klass).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            hits = predict(classifier, pixels) == label("red", "circle")
            row["class_classifier_accuracy"] = float(hits.float().mean())
    return row, instance, klass


def write_instances(folder: Path, num: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(centre_scenes("ring", num, 0)):
        render(scene, 32).save(folder / f"ring{i}.png")
    return folder


def measure_before(base, num: int, classifier, saved: Path | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """``measure`` of the base model, read from ``saved`` (a .npz) when an earlier run wrote it, else made
    (and written there)."""
    if saved is not None and saved.exists():
        data = np.load(saved)
        return json.loads(str(data["row"])), data["instance"], data["class"]
    row, instance, klass = measure(base, num, classifier)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        np.savez(saved, row=json.dumps(row), instance=instance, **{"class": klass})
    return row, instance, klass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the shapes pipeline folder to fine-tune")
    parser.add_argument("--out", required=True, help="folder for instance images, the run and results")
    parser.add_argument("--classifier", help="real-image CNN weights (bench/shapes_classifier.py), optional")
    parser.add_argument("--num", type=int, default=100, help="images per prompt for each measurement")
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="stage-2 config override, e.g. lora.rank=0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", help="a .npz keeping the base model's measurement (written once, then read)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = print_environment()

    from ldm.config import UNetStageConfig, load_config
    from ldm.dreambooth import prepare_class_images
    from ldm.models.unet import load_components
    from ldm.sampling import load_pipeline
    from ldm.grid import to_pil_grid
    from ldm.stages import STAGES

    out = Path(args.out)
    classifier = None
    if args.classifier:
        from bench.shapes_classifier import load_or_train

        classifier = load_or_train(args.classifier)
    base = load_pipeline(args.base, device="cpu")
    detector = validate_detector(base.vae)
    print("detector:", json.dumps(detector))
    before, inst0, cls0 = measure_before(base, args.num, classifier, Path(args.before) if args.before else None)
    print("before:", json.dumps(before))

    cfg = load_config(UNetStageConfig, CONFIGS / "unet" / "dreambooth.yaml",
                      [f"pretrained={args.base}", f"output_dir={out / 'run'}", "train.resume=never",
                       f"dreambooth.instance_data={write_instances(out / 'instance', args.instances)}",
                       f"dreambooth.class_data={out / 'class_images'}", *args.set])  # kept apart: reused by later runs
    start = time.time()
    prepare_class_images(cfg, load_components(cfg), "cpu")
    class_seconds = time.time() - start
    start = time.time()
    final = STAGES["unet"].main(cfg)
    train_seconds = time.time() - start
    after, inst1, cls1 = measure(load_pipeline(final, device="cpu"), args.num, classifier)
    print("after:", json.dumps(after))

    results = {"environment": env, "base": args.base, "overrides": args.set, "instance_prompt": INSTANCE,
               "class_prompt": CLASS, "num_images": args.num, "detector_validation": detector, "before": before,
               "after": after, "class_image_minutes": round(class_seconds / 60, 2),
               "train_minutes": round(train_seconds / 60, 2), "steps": cfg.train.max_steps,
               "lora_rank": cfg.lora.rank, "num_class_images": cfg.dreambooth.num_class_images}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = [torch.from_numpy(x[:16]).permute(0, 3, 1, 2).float() / 127.5 - 1 for x in (inst0, inst1, cls0, cls1)]
    to_pil_grid(torch.cat(rows), nrow=16).save(out / "samples.png")
    print(json.dumps({k: results[k] for k in ("before", "after", "class_image_minutes", "train_minutes")}))


if __name__ == "__main__":
    main()
