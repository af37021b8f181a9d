"""Sampler efficiency: the shapes judge's accuracy of a trained model against steps, per sampler.

    ldm demo --out demo                                  # once: a trained shapes pipeline (10-20 min)
    python bench/samplers.py --model demo/pipeline       # DDPM, DDIM, DPM-Solver++, UniPC x 5/10/20/50 steps
    python bench/samplers.py --model demo/pipeline --num 100 --samplers dpm++,unipc --steps 5,10,20

For every (sampler, steps): ``ldm.evaluation.pipeline.judge_pipeline`` on ``--num`` held-out
single-shape prompts (the same prompts and seeds for every cell), guidance ``--guidance``; the
accuracy (prompted colour and shape both found) and the seconds spent sampling (judging excluded).
A model trained elsewhere (any folder this project saves) works too. Without a trained model the
numbers would mean nothing, so the script stops with an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, apply_common_args, print_table  # noqa: E402

SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": "DPM-Solver++", "unipc": "UniPC"}


class TimedPipe:
    """A pipeline whose calls are timed; everything else is the pipeline's own."""

    def __init__(self, pipe):
        self.pipe, self.seconds = pipe, 0.0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.pipe(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="demo/pipeline", help="a trained pipeline folder (default: demo/pipeline)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated, from {', '.join(SAMPLERS)}")
    parser.add_argument("--steps", default="5,10,20,50", help="comma-separated step counts")
    parser.add_argument("--num", type=int, default=48, help="held-out prompts per cell (issue 4 uses 100)")
    parser.add_argument("--guidance", type=float, default=5.0)
    add_common_args(parser)
    return parser.parse_args(argv)


def check_trained(model: str) -> Path:
    """The model folder, or exit non-zero saying how to get one."""
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        sys.exit(f"no trained pipeline at {folder}: the sampler comparison needs a trained model. Train one with "
                 f"`ldm demo --out demo` (10-20 minutes on 2 cores) and pass --model demo/pipeline, or pass any "
                 f"pipeline folder this project saved.")
    if not (folder / "training.json").is_file():
        print(f"note: {folder} has no training.json; make sure it is a trained model, or the accuracies mean nothing")
    return folder


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    folder = check_trained(args.model)
    apply_common_args(args)
    from ldm.evaluation.pipeline import judge_pipeline
    from ldm.sampling import load_pipeline, make_scheduler

    pipe = load_pipeline(folder, device="cpu")
    schedule = pipe.scheduler.config
    results = []
    for name in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            pipe.scheduler = make_scheduler(name, schedule)
            timed = TimedPipe(pipe)
            metrics = judge_pipeline(timed, num=args.num, seed=args.seed, steps=steps, guidance=args.guidance)
            results.append({"sampler": name, "steps": steps, "accuracy": metrics["accuracy"],
                            "colour": metrics["colour_accuracy"], "kind": metrics["kind_accuracy"],
                            "seconds": timed.seconds})
            print(f"{SAMPLERS[name]:>12} {steps:3d} steps: accuracy {metrics['accuracy']:.2f} "
                  f"({timed.seconds:.1f} s sampling)", flush=True)
    print(f"\n{folder}: judge accuracy on {args.num} held-out prompts, guidance {args.guidance}")
    print_table(["sampler", "steps", "accuracy", "colour found", "shape right", "sampling s", "ms / image"],
                [[SAMPLERS[r["sampler"]], str(r["steps"]), f"{r['accuracy']:.2f}", f"{r['colour']:.2f}",
                  f"{r['kind']:.2f}", r["seconds"], f"{r['seconds'] / args.num * 1e3:.0f}"] for r in results])
    return results


if __name__ == "__main__":
    main()
