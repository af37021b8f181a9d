"""Fine-tuning sweep: which LoRA targets, rank, learning rate and steps teach a pipeline a new kind of image.

Each run is the README's fine-tuning command, `ldm train unet --config configs/unet/finetune.yaml
--set pretrained=BASE --set data.path=TRAIN ...` plus a recipe's overrides, in a fresh process; its wall
clock is the minutes column. Each result is read by the data's own judge on held-out captions, as
`ldm eval pipeline` does (the digit classifier or the class judge, fitted with real images of held-out
half A and checked on half B; images generated for A's captions, 20 DPM-Solver++ steps, guidance 5).

    python bench/lora_sweep.py --base demo/pipeline --out runs/lora --recipes shipped all-r16 --seeds 0 1 2
    python bench/lora_sweep.py ... --data digits-inverted   # the same digits, light ink on dark paper
    python bench/lora_sweep.py ... --data textures          # crops of 8 real photographs (ldm data textures)

Data: `ldm data digits` / `ldm data textures`, split as `ldm train all` splits it (15% held out, seed 0).
Every result is appended to OUT/results.jsonl; the table at the end has every run. Run timings alone on
the machine; quality-only runs may share it at one thread each (OMP_NUM_THREADS=1 taskset -c N).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CONFIGS, print_table  # noqa: E402

DATASETS = ("digits", "digits-inverted", "textures")
ALL = "[attention,feed_forward,resnet,time_embedding]"
# name -> overrides of configs/unet/finetune.yaml (as shipped on the day of the run)
RECIPES = {
    "shipped": [],
    # diffusers examples/text_to_image/train_text_to_image_lora.py as its README runs it: rank 4 on
    # to_q/k/v/out, lr 1e-4, constant schedule without warmup, frozen text encoder, no min-SNR weighting, no EMA
    "diffusers": ["lora.rank=4", "lora.alpha=4", "lora.targets=[attention]", "lora.train_text_encoder=false",
                  "train.learning_rate=1e-4", "train.lr_schedule=constant", "train.lr_warmup_steps=0",
                  "diffusion.min_snr_gamma=null", "train.ema_decay=null"],
    "attn-r8-lr1e-3": ["lora.rank=8", "lora.targets=[attention]", "lora.train_text_encoder=false",
                       "train.learning_rate=1e-3"],
    "all-r16-lr1e-3": ["lora.rank=16", f"lora.targets={ALL}", "lora.train_text_encoder=false",
                       "train.learning_rate=1e-3"],
    "all-r16-lr2e-3": ["lora.rank=16", f"lora.targets={ALL}", "lora.train_text_encoder=false",
                       "train.learning_rate=2e-3"],
    "all-r16-te": ["lora.rank=16", f"lora.targets={ALL}", "lora.train_text_encoder=true",
                   "train.learning_rate=1e-3", "lora.text_encoder_learning_rate=5e-4"],
    "all-r32-lr1e-3": ["lora.rank=32", f"lora.targets={ALL}", "lora.train_text_encoder=false",
                       "train.learning_rate=1e-3"],
    "resnet-r16-lr1e-3": ["lora.rank=16", "lora.targets=[resnet]", "lora.train_text_encoder=false",
                          "train.learning_rate=1e-3"],
    "full-lr2e-4": ["lora.rank=0", "train.learning_rate=2e-4"],
    "full-lr5e-4": ["lora.rank=0", "train.learning_rate=5e-4"],
}


def prepare(out: Path, data: str) -> tuple[Path, Path]:
    """The real data named (``ldm data digits``; the same with the ink inverted, 255 − pixel, light on dark;
    ``ldm data textures``), split 85/15 with seed 0 as ``ldm train all`` splits it."""
    import numpy as np
    from PIL import Image

    from ldm.data.digits import write_digits_dataset
    from ldm.data.split import split_heldout
    from ldm.data.textures import write_textures_dataset

    source = out / data
    if not (source / "metadata.jsonl").is_file():
        (write_textures_dataset if data == "textures" else write_digits_dataset)(source)
        if data == "digits-inverted":
            for path in source.glob("*.png"):
                Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(path)
    return split_heldout(source, out / f"split-{data}")


def train(base: str, data: Path, folder: Path, seed: int, overrides: list[str], steps: int | None) -> float:
    """One `ldm train unet` run in a fresh process; returns its wall-clock minutes."""
    sets = [f"pretrained={base}", f"data.path={data}", f"output_dir={folder}", f"train.seed={seed}", *overrides]
    sets += [f"train.max_steps={steps}"] if steps else []
    command = [sys.executable, "-m", "ldm.cli", "train", "unet", "--config", str(CONFIGS / "unet" / "finetune.yaml")]
    for item in sets:
        command += ["--set", item]
    start = time.time()
    subprocess.run(command, check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return (time.time() - start) / 60


def judge(model: Path, heldout: Path, num: int) -> dict:
    """The data's own judge (digit classifier or class judge, as ``ldm eval pipeline`` picks it) on images
    generated for held-out half A's captions, fitted with A's real images; its ceiling on half B."""
    import torch

    from ldm.config import DataConfig
    from ldm.data.images import ImageCaptionDataset
    from ldm.evaluation.pipeline import classifier_reading, data_kind, generate, heldout_halves
    from ldm.models.unet import vae_scale_factor
    from ldm.sampling import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(model, scheduler="dpm++")
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
    dataset = ImageCaptionDataset(DataConfig(path=str(heldout), resolution=size))
    real_a, real_b = heldout_halves(dataset, num, seed=0)
    generated = generate(pipe, list(real_a["caption"]), steps=20, guidance=5.0, seed=0)
    kind = data_kind(list(real_a["caption"]) + list(real_b["caption"]))
    reading = classifier_reading(kind, generated, real_a, real_b, size)
    c = reading["classifier"]
    return {"accuracy": reading["classifier_accuracy"], "real_accuracy": reading["classifier_real_accuracy"],
            "per_class": c.get("per_digit_accuracy", c.get("per_class_accuracy", {}))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the pipeline folder to fine-tune (e.g. the demo's)")
    parser.add_argument("--out", default="runs/lora-sweep")
    parser.add_argument("--recipes", nargs="+", default=["shipped"], choices=sorted(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps for every run (default: the config's)")
    parser.add_argument("--data", default="digits", choices=DATASETS,
                        help="digits-inverted: the same digits, light ink on dark paper")
    parser.add_argument("--num", type=int, default=270, help="held-out pairs: num // 2 images are generated")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dir, heldout = prepare(out, args.data)
    rows = []
    for recipe in args.recipes:
        for seed in args.seeds:
            name = f"{args.data}-{recipe}-s{seed}" + (f"-{args.steps}" if args.steps else "")
            minutes = train(args.base, train_dir, out / name, seed, RECIPES[recipe], args.steps)
            reading = judge(out / name / "final", heldout, args.num)
            result = {"run": name, "recipe": recipe, "seed": seed, "data": args.data, "steps": args.steps,
                      "minutes": round(minutes, 2), "threads": os.environ.get("OMP_NUM_THREADS", "all"), **reading}
            with open(out / "results.jsonl", "a") as log:
                log.write(json.dumps(result) + "\n")
            rows.append([name, f"{minutes:.2f}", f"{reading['accuracy']:.2f}", f"{reading['real_accuracy']:.2f}"])
            print_table(["run", "minutes", "classifier", "real ceiling"], rows)


if __name__ == "__main__":
    main()
