"""Does ``torch.compile`` pay for the U-Net? Compile time apart, then steady-state speed against eager.

    python bench/compile.py                      # the training step (shapes U-Net, batch 64)
    python bench/compile.py --what sample        # the guided sampling forward (batch 1 -> U-Net batch 2)

train   forward + backward of the shapes U-Net on 8x8x4 latents (``--batch-size``), as the trainer runs it;
sample  the U-Net forward of one guided sampling step at ``--sample-batch`` images (no grad).
The first call of the compiled U-Net compiles (reported as compile time, including that call; with a
fresh inductor cache unless ``--warm-cache``); then
eager and compiled calls alternate for ``--repeats`` turns and the medians are compared. Inductor
needs a C++ compiler on CPU. The project leaves compile off by default unless this shows it pays.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--warm-cache" not in sys.argv:  # a cold compile, as a user's first run pays it (set before torch loads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")

import torch  # noqa: E402

from bench.common import (add_common_args, apply_common_args, interleaved, print_table,  # noqa: E402
                          shapes_components)


def workloads(args, unet) -> dict:
    """{what: (model mode, callable(model))} for the U-Net calls being compared."""
    g = torch.Generator().manual_seed(args.seed)
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    x = torch.randn(args.batch_size, 4, side, side, generator=g)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g)
    text = torch.randn(args.batch_size, 32, width, generator=g)
    xs = torch.randn(2 * args.sample_batch, 4, side, side, generator=g)
    texts = torch.randn(2 * args.sample_batch, 32, width, generator=g)

    def train(model):
        loss = (model(x, t, encoder_hidden_states=text).sample - x).square().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    @torch.no_grad()
    def sample(model):
        model(xs, torch.tensor(500), encoder_hidden_states=texts)

    return {"train": (True, train), "sample": (False, sample)}


def measure(what: str, args, base) -> list:
    training, call = workloads(args, base)[what]
    eager = copy.deepcopy(base).train(training)
    compiled = torch.compile(copy.deepcopy(base).train(training), mode=args.mode, dynamic=False)
    start = time.perf_counter()
    call(compiled)
    compile_s = time.perf_counter() - start
    timings = interleaved({"eager": lambda: call(eager), "compiled": lambda: call(compiled)}, args.repeats, warmup=1)
    return [what, f"{compile_s:.0f} s", timings.spread("eager"), timings.spread("compiled"),
            f"{timings.ratio('eager', 'compiled'):.2f}x", f"{timings.ratio('eager', 'compiled', 'cpu'):.2f}x",
            f"{compile_s / max(timings.median('eager') - timings.median('compiled'), 1e-9):.0f}"
            if timings.median("eager") > timings.median("compiled") else "never"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--what", choices=["train", "sample", "both"], default="train")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=1, help="images per guided sampling step")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune...)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's on-disk cache (compile time then shows a rerun, not a first run)")
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> list[list]:
    args = parse_args(argv)
    apply_common_args(args)
    base = shapes_components(args.seed).unet
    rows = [measure(what, args, base) for what in (["train", "sample"] if args.what == "both" else [args.what])]
    print(f"\ntorch.compile (mode {args.mode or 'default'}, {'warm' if args.warm_cache else 'cold'} inductor cache) of "
          f"the shapes U-Net; medians of {args.repeats} interleaved calls")
    print_table(["workload", "compile (1st call)", "eager", "compiled", "speed-up wall", "speed-up cpu",
                 "calls to repay compile"], rows)
    return rows


if __name__ == "__main__":
    main()
