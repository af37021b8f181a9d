"""Sampling speed: ``LatentDiffusionPipeline`` against stock ``StableDiffusionPipeline`` on the same folder.

    python bench/sampling.py                          # random shapes-config pipeline, DPM-Solver++ 20 steps
    python bench/sampling.py --model demo/pipeline --scheduler ddim --steps 50
    git show REV:pipelines/pipeline_latent_diffusion.py > /tmp/old.py
    python bench/sampling.py --baseline /tmp/old.py        # also time an older version of our pipeline

Both pipelines load the same saved folder (written to a temp dir from the shapes configs with
random weights unless ``--model`` is given) and share its modules in memory, get the same scheduler,
seed, steps, guidance and output type, and are called in turns (ours, stock, stock, ours, ...). Reported: median latency of
one prompt (batch 1) and images/s for 8 prompts (batch 8), with the ratio ours/stock. The first
calls (warm-up) are not timed. Both outputs are compared, so a speed-up can never come from
doing different work: the script fails if they differ by more than 1e-4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (add_common_args, apply_common_args, interleaved, print_table,  # noqa: E402
                          save_pipeline_folder, shapes_components)

PROMPTS = ["a large red circle in the center on a gray background",
           "a small blue square in the top left on a white background",
           "a large green triangle in the bottom right on a black background",
           "a large yellow cross in the center on a gray background",
           "a small purple circle in the bottom left on a gray background",
           "a large orange square in the middle right on a white background",
           "a small red triangle in the top center on a black background",
           "a large blue cross in the bottom center on a white background"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default=None, help="a saved pipeline folder (default: random shapes pipeline)")
    parser.add_argument("--scheduler", default="dpm++", help="ddpm | ddim | euler | dpm++ | unipc")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batches", default="1,8", help="comma-separated prompt batch sizes")
    parser.add_argument("--output-type", default="pil", choices=["pil", "np", "pt", "latent"])
    parser.add_argument("--channels-last", action="store_true",
                        help="U-Net and VAE of every pipeline in channels_last memory format (a user-side option)")
    parser.add_argument("--baseline", default=None,
                        help="another pipeline_latent_diffusion.py (e.g. an older revision) timed as a third candidate")
    add_common_args(parser)
    parser.set_defaults(repeats=15)
    return parser.parse_args(argv)


def load_pipelines(folder: Path, scheduler: str, baseline: str | None = None, channels_last: bool = False) -> dict:
    """{"ours", "stock"[, "baseline"]} from ``folder``, each with its own ``scheduler`` sampler.

    The pipelines share the module objects (the stock and baseline pipelines get ours passed to their
    ``from_pretrained``): the same weights at the same addresses, so the ratio measures the pipelines'
    code, not where the allocator happened to put two copies of the U-Net (worth ~1% either way here).
    """
    from diffusers import StableDiffusionPipeline

    from ldm.sampling import make_scheduler
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder)
    if channels_last:
        ours.unet.to(memory_format=torch.channels_last)
        ours.vae.to(memory_format=torch.channels_last)
    shared = {name: getattr(ours, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
    pipes = {"ours": ours,
             "stock": StableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False, **shared)}
    if baseline:
        pipes["baseline"] = load_pipeline_class(baseline).from_pretrained(folder, **shared)
    for pipe in pipes.values():
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    return pipes


def load_pipeline_class(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_pipeline_latent_diffusion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LatentDiffusionPipeline


def caller(pipe, prompts: list[str], args):
    """A no-argument call of ``pipe`` on ``prompts`` with fixed per-image seeds; returns the images."""
    def call():
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators,
                    output_type=args.output_type).images
    return call


def max_difference(a, b) -> float:
    import numpy as np

    if isinstance(a, list):  # PIL images
        a, b = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in a]), \
            np.stack([np.asarray(i, dtype=np.float32) / 255 for i in b])
    return float(abs(torch.as_tensor(a).float() - torch.as_tensor(b).float()).max())


def measure(pipes: dict, batch: int, args) -> dict:
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    calls = {name: caller(pipe, prompts, args) for name, pipe in pipes.items()}
    reference = calls["stock"]()
    difference = max(max_difference(call(), reference) for name, call in calls.items() if name != "stock")
    tolerance = 1 / 255 + 1e-6 if args.output_type == "pil" else 1e-4  # PIL rounds to 8 bits
    if difference > tolerance:
        raise SystemExit(f"outputs differ by {difference:.2e} at batch {batch}: the pipelines did different work")
    timings = interleaved(calls, args.repeats, warmup=1)
    return {"batch": batch, "timings": timings, "difference": difference}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    apply_common_args(args)
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        folder = Path(args.model) if args.model else save_pipeline_folder(shapes_components(args.seed), tmp)
        pipes = load_pipelines(folder, args.scheduler, args.baseline, args.channels_last)
        results = [measure(pipes, int(b), args) for b in args.batches.split(",")]
    source = args.model or "random shapes-config pipeline"
    print(f"\nsampling {source}: {args.scheduler}, {args.steps} steps, guidance {args.guidance}, output {args.output_type}"
          f"{', channels_last' if args.channels_last else ''}; medians of {args.repeats} interleaved calls")
    names = list(pipes)
    others = [n for n in names if n != "stock"]
    print_table(["batch"] + [f"{n} latency" for n in names] + [f"{n} img/s" for n in names]
                + [f"{n} / stock {clock}" for clock in ("wall", "cpu") for n in others] + ["max |diff| to stock"],
                [[str(r["batch"])] + [r["timings"].spread(n) for n in names]
                 + [r["batch"] / r["timings"].median(n) for n in names]
                 + [f"{r['timings'].ratio(n, 'stock', clock):.3f}" for clock in ("wall", "cpu") for n in others]
                 + [f"{r['difference']:.1e}"] for r in results])
    return results


if __name__ == "__main__":
    main()
