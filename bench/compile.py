"""Do ``torch.compile`` or channels_last pay for the U-Net? Compile time apart, steady-state speed against eager.

    python bench/compile.py                      # the training step (shapes U-Net, batch 64)
    python bench/compile.py --what sample        # the guided sampling forward (batch 1 -> U-Net batch 2)

train   forward + backward of the shapes U-Net on 8x8x4 latents (``--batch-size``), as the trainer runs it;
sample  the U-Net forward of one guided sampling step at ``--sample-batch`` images (no grad).
Options: eager (the default), channels_last (weights and inputs), torch.compile (inductor). The first
call of the compiled U-Net compiles (reported as compile time, including that call; with a fresh
inductor cache unless ``--warm-cache``); then the options alternate for ``--repeats`` turns and the
medians are compared. Inductor needs a C++ compiler on CPU. The project leaves both off by default
unless this shows they pay.
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


def workload(what: str, args, unet, memory_format=torch.contiguous_format):
    """A no-argument call of ``unet`` for ``what`` ("train" or "sample") on fixed inputs."""
    g = torch.Generator().manual_seed(args.seed)
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    batch = args.batch_size if what == "train" else 2 * args.sample_batch  # guidance doubles the sampling batch
    x = torch.randn(batch, 4, side, side, generator=g).contiguous(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,), generator=g) if what == "train" else torch.tensor(500)
    text = torch.randn(batch, 32, width, generator=g)

    def train():
        loss = (unet(x, t, encoder_hidden_states=text).sample - x).square().mean()
        loss.backward()
        for p in unet.parameters():
            p.grad = None

    @torch.no_grad()
    def sample():
        unet(x, t, encoder_hidden_states=text)

    return train if what == "train" else sample


def measure(what: str, args, base) -> list[list]:
    """Rows: eager, channels_last and compiled U-Net calls, timed in turns; compile time apart."""
    mode = what == "train"
    cl = copy.deepcopy(base).train(mode).to(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(base).train(mode), mode=args.mode, dynamic=False)
    calls = {"eager": workload(what, args, copy.deepcopy(base).train(mode)),
             "channels_last": workload(what, args, cl, torch.channels_last),
             "torch.compile": workload(what, args, compiled)}
    start = time.perf_counter()
    calls["torch.compile"]()
    compile_s = time.perf_counter() - start
    timings = interleaved(calls, args.repeats, warmup=1)
    rows = []
    for name in calls:
        gain = timings.median("eager") - timings.median(name)
        repay = "-" if name != "torch.compile" else f"{compile_s / gain:.0f}" if gain > 0 else "never"
        rows.append([what, name, f"{compile_s:.0f} s" if name == "torch.compile" else "-", timings.spread(name),
                     f"{timings.ratio('eager', name):.2f}x", f"{timings.ratio('eager', name, 'cpu'):.2f}x", repay])
    return rows


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
    rows = [row for what in (["train", "sample"] if args.what == "both" else [args.what])
            for row in measure(what, args, base)]
    print(f"\nU-Net execution options (torch.compile mode {args.mode or 'default'}, "
          f"{'warm' if args.warm_cache else 'cold'} inductor cache), shapes U-Net; medians of {args.repeats} turns")
    print_table(["workload", "option", "compile (1st call)", "per call", "speed-up wall", "speed-up cpu",
                 "calls to repay compile"], rows)
    return rows


if __name__ == "__main__":
    main()
