"""Peak memory of one stage-2 training step, with and without gradient checkpointing.

    python bench/memory.py                                # shapes U-Net on 32x32x4 latents, batch 16
    python bench/memory.py --latent-size 16 --batch-size 64

Each variant runs in a fresh Python process (so no allocator cache or earlier peak carries over)
that builds the U-Net, its AdamW optimizer and a batch, then takes ONE step (forward, backward,
optimizer step). Measured:
  CPU   peak resident set size during the step (``getrusage(RUSAGE_SELF).ru_maxrss``) minus the
        resident size just before it: activations + gradients + optimizer state + allocator slack.
        (tracemalloc does not see torch's allocations, and torch keeps no CPU allocator statistics.)
  CUDA  ``torch.cuda.max_memory_allocated`` minus the allocation before the step, when a GPU exists.
The U-Net is the shapes config's width on larger latents, so activations dominate its 17 MB of
weights. Also printed: the step time, since checkpointing recomputes the forward pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, print_environment, print_table  # noqa: E402

MIB = 2**20


def resident_bytes() -> int:
    """Current resident set size (Linux /proc), in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def one_step(args) -> dict:
    """In the child: build, then measure one training step. Returns the numbers as a dict."""
    import torch

    from bench.common import shapes_configs
    from ldm.models.unet import build_unet

    if args.threads:
        torch.set_num_threads(args.threads)
    _, text_cfg, unet_cfg = shapes_configs()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = build_unet(unet_cfg.model, args.latent_size, 4, text_cfg.model.text_width).to(device).train()
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=g).to(device)
    text = torch.randn(args.batch_size, text_cfg.model.text_context_length, text_cfg.model.text_width,
                       generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    before = resident_bytes()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    start, cpu = time.perf_counter(), time.process_time()
    loss = (unet(x, t, encoder_hidden_states=text).sample - x).square().mean()
    loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"checkpointing": args.checkpointing, "seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before": before,
           "step_peak": peak_rss - before, "params": sum(p.numel() for p in unet.parameters())}
    if device == "cuda":
        out["cuda_step_peak"] = torch.cuda.max_memory_allocated() - allocated
    return out


def run_child(args, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--latent-size", str(args.latent_size), "--batch-size",
               str(args.batch_size), "--seed", str(args.seed), "--threads", str(args.threads)]
    command += ["--checkpointing"] if checkpointing else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (32 = 128 px images at f=4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_common_args(parser)
    parser.set_defaults(repeats=2)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(one_step(args)))
        return []
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print_environment()
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.repeats):  # interleaved: off, on, on, off, ...
        for checkpointing in (False, True) if r % 2 == 0 else (True, False):
            runs[checkpointing].append(run_child(args, checkpointing))
    rows = []
    for checkpointing, results in runs.items():
        peak = statistics.median(r["step_peak"] for r in results)
        rows.append(["on" if checkpointing else "off", f"{peak / MIB:.0f} MiB",
                     f"{statistics.median(r['rss_before'] for r in results) / MIB:.0f} MiB",
                     statistics.median(r["seconds"] for r in results),
                     statistics.median(r["cpu_seconds"] for r in results)]
                    + ([f"{statistics.median(r['cuda_step_peak'] for r in results) / MIB:.0f} MiB"]
                       if "cuda_step_peak" in results[0] else []))
    saved = 1 - statistics.median(r["step_peak"] for r in runs[True]) / statistics.median(
        r["step_peak"] for r in runs[False])
    slower = statistics.median(r["cpu_seconds"] for r in runs[True]) / statistics.median(
        r["cpu_seconds"] for r in runs[False])
    params = runs[False][0]["params"] / 1e6
    print(f"\none training step, shapes-width U-Net ({params:.1f}M parameters) on {args.batch_size} x 4x{args.latent_size}"
          f"x{args.latent_size} latents, fresh process per run, medians of {args.repeats}")
    print_table(["gradient checkpointing", "step peak above resident", "resident before", "step s", "step cpu s"]
                + (["CUDA step peak"] if len(rows[0]) > 5 else []), rows)
    print(f"checkpointing saves {saved:.0%} of the step's peak memory and costs {slower:.2f}x the step's CPU time")
    return rows


if __name__ == "__main__":
    main()
