"""Time to quality: held-out judge accuracy and validation loss against wall-clock training time,
our stage-2 trainer vs the diffusers example's approach, side by side in one run.

    python bench/time_to_quality.py --base demo            # demo/{vae,text_encoder}/final, demo/data/*

Both sides start from the same U-Net weights, train on the same data with the same batch, learning
rate, LR schedule, min-SNR and EMA, and are evaluated at the same points of their own training clock
(seconds spent training, evaluation excluded; ours includes building its latent cache):
  - judge accuracy: the shapes judge on 100 held-out single-shape prompts, guidance 5, DPM-Solver++
    20 steps, EMA weights (what ships);
  - validation loss: ``ldm.evaluation.heldout`` on held-out latents at fixed timesteps and noise.
The sides differ where the approaches differ:
  - ours: ``ldm.diffusion_batch.training_loss`` on the latent cache, caption dropout, the shapes config's
    timestep sampling and weighting;
  - example (``examples/text_to_image/train_text_to_image.py``, see bench/reference_trainer.py): PNG
    decode + VAE + text encoder inside every step, no caption dropout, uniform timesteps. It gets
    ``--baseline-steps`` x our steps (same schedule shape, stretched), so it can show whether it gets
    there at all within 3x our time.
Training runs in turns of ``--turn`` seconds (A, B, A, B, ...) so a slow spell of the machine hits both.
At the end, ours' power-function EMA snapshots give the validation loss for a sweep of σ_rel.
``--variant NAME:key=value,key=value`` adds more of ours with other stage-2 config values.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import add_common_args, apply_common_args, print_table, shapes_configs  # noqa: E402
from bench.reference_trainer import ReferenceStep  # noqa: E402
from bench.train_throughput import OursStep  # noqa: E402

THRESHOLDS = (0.8, 0.9)
SWEEP = [0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25]


class Side:
    """One training run: a step function, its own clock, and evaluation with its EMA weights."""

    def __init__(self, name: str, step, unet, ema_context, max_steps: int, setup_seconds: float = 0.0):
        self.name, self.step, self.unet, self.ema_context, self.max_steps = name, step, unet, ema_context, max_steps
        self.clock, self.steps, self.curve = setup_seconds, 0, []

    @property
    def done(self) -> bool:
        return self.steps >= self.max_steps

    def train_until(self, clock: float) -> None:
        while not self.done and self.clock < clock:
            start = time.perf_counter()
            self.step()
            self.clock += time.perf_counter() - start
            self.steps += 1


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    return name, [s for s in sets.split(",") if s]


def make_ours(name: str, parts, unet, cfg, overrides: list[str], workdir: Path, power_sigma_rels) -> Side:
    from ldm.config import UNetStageConfig, from_dict, to_dict, _set_dotted  # noqa: PLC2701
    import yaml

    raw = to_dict(cfg)
    for item in overrides:
        key, _, value = item.partition("=")
        _set_dotted(raw, key.split("."), yaml.safe_load(value))
    variant = from_dict(UNetStageConfig, raw)
    if variant.model != cfg.model:  # another architecture: built from the same seed
        from ldm.models.unet import build_unet

        torch.manual_seed(cfg.train.seed)
        unet = build_unet(variant.model, unet.config.sample_size, unet.config.in_channels,
                          unet.config.cross_attention_dim).train()
    cfg = variant
    start = time.perf_counter()
    ours = OursStep(parts, copy.deepcopy(unet), cfg, workdir / f"cache-{name}")
    setup = time.perf_counter() - start
    power = None
    if power_sigma_rels:
        from ldm.ema import PowerEMA

        power = PowerEMA(ours.unet, power_sigma_rels, workdir / f"snapshots-{name}")

    def step():
        ours()
        if power is not None:
            power.update(ours.unet, ours.state.step)
            if ours.state.step % 50 == 0 or ours.state.step == cfg.train.max_steps:
                power.save_snapshots(ours.state.step)

    side = Side(name, step, ours.unet, lambda: ours.ema.applied_to(ours.unet), cfg.train.max_steps, setup)
    side.snapshots = power.folder if power else None
    return side


def make_example(parts, unet, cfg, data_dir: Path, steps_factor: float) -> Side:
    train = cfg.train
    max_steps = int(train.max_steps * steps_factor)
    ref_parts = dataclasses.replace(parts, vae=copy.deepcopy(parts.vae), text_encoder=copy.deepcopy(parts.text_encoder))
    ref = ReferenceStep(ref_parts, copy.deepcopy(unet), data_dir, cfg.data.resolution, train.batch_size,
                        train.learning_rate, cfg.diffusion.min_snr_gamma, train.max_grad_norm, train.ema_decay,
                        cfg.data.random_flip, train.seed, lr_schedule=train.lr_schedule,
                        lr_warmup_steps=train.lr_warmup_steps, max_steps=max_steps)

    class Applied:
        def __enter__(self):
            ref.ema.store(ref.unet.parameters())
            ref.ema.copy_to(ref.unet.parameters())

        def __exit__(self, *exc):
            ref.ema.restore(ref.unet.parameters())

    return Side("diffusers example", ref, ref.unet, Applied, max_steps)


@torch.no_grad()
def evaluate(side: Side, parts, heldout, num: int, seed: int) -> dict:
    from diffusers import DDPMScheduler

    from ldm.evaluation.heldout import heldout_loss
    from ldm.evaluation.pipeline import judge_pipeline
    from ldm.models.unet import make_pipeline
    from ldm.sampling import make_scheduler

    latents, text = heldout
    schedule = parts.scheduler.config
    with side.ema_context():
        side.unet.eval()
        pipe = make_pipeline(parts, side.unet, make_scheduler("dpm++", schedule))
        judged = judge_pipeline(pipe, num=num, seed=seed, steps=20, guidance=5.0)
        val = heldout_loss(side.unet, latents, text, DDPMScheduler.from_config(schedule).alphas_cumprod,
                           schedule.prediction_type)
        side.unet.train()
    return {"seconds": round(side.clock, 1), "steps": side.steps, "judge": judged["accuracy"], "val_loss": val}


def time_to(curve: list[dict], threshold: float) -> float | None:
    return next((p["seconds"] for p in curve if p["judge"] >= threshold), None)


def run(args, seed: int, workdir: Path) -> list[Side]:
    from ldm.config import DataConfig
    from ldm.data.split import heldout_data_config
    from ldm.evaluation.heldout import encode_heldout
    from ldm.models.unet import build_unet, load_components

    _, _, cfg = shapes_configs()
    base = Path(args.base)
    data_dir = Path(args.data or base / "data" / "shapes")
    cfg = dataclasses.replace(cfg, vae=str(args.vae or base / "vae" / "final"),
                              text_encoder=str(args.text_encoder or base / "text_encoder" / "final"),
                              data=dataclasses.replace(cfg.data, path=str(data_dir)),
                              train=dataclasses.replace(cfg.train, seed=seed,
                                                        max_steps=args.steps or cfg.train.max_steps))
    parts = load_components(cfg)
    torch.manual_seed(seed)
    unet = build_unet(cfg.model, parts.unet.config.sample_size, parts.vae.config.latent_channels,
                      parts.text_encoder.config.hidden_size).train()
    heldout = encode_heldout(heldout_data_config(DataConfig(resolution=cfg.data.resolution),
                                                 str(args.heldout or base / "data" / "heldout"), 64),
                             parts.vae, parts.text_encoder, parts.tokenizer)
    sides = [make_ours("ours", parts, unet, cfg, args.set, workdir, tuple(args.sigma_rels))]
    sides += [make_ours(name, parts, unet, cfg, args.set + sets, workdir, tuple(args.sigma_rels))
              for name, sets in map(parse_variant, args.variant)]
    if args.baseline_steps > 0:
        sides.append(make_example(parts, unet, cfg, data_dir, args.baseline_steps))
    points = [args.eval_every * (i + 1) for i in range(10_000)]
    for side in sides:
        side.next_eval = 0
    while not all(s.done for s in sides):
        for side in sides:
            if side.done:
                continue
            target = min(side.clock + args.turn, points[side.next_eval])
            side.train_until(target)
            if side.clock >= points[side.next_eval] or side.done:
                side.curve.append(evaluate(side, parts, heldout, args.num, 0))
                side.next_eval += 1
                p = side.curve[-1]
                print(f"  [{side.name}] {p['seconds']:7.1f} s  step {p['steps']:5d}  judge {p['judge']:.2f}  "
                      f"val loss {p['val_loss']:.4f}", flush=True)
    return sides, parts, heldout


def sigma_rel_sweep(side: Side, parts, heldout, sigma_rels: list[float], num: int) -> list[list]:
    """[σ_rel, validation loss, judge accuracy] of the post-hoc EMA of each σ_rel at the end of training."""
    from ldm.ema import load_into, reconstruct

    weights, _, _ = reconstruct(side.snapshots, sigma_rels)
    unet = copy.deepcopy(side.unet)
    probe = Side(side.name, None, unet, contextlib.nullcontext, 0)
    rows = []
    for sigma_rel, w in zip(sigma_rels, weights):
        load_into(unet, w)
        point = evaluate(probe, parts, heldout, num, 0)
        rows.append([f"{sigma_rel:.3f}", f"{point['val_loss']:.4f}", f"{point['judge']:.2f}"])
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base", default="demo", help="a finished `ldm demo --out` folder")
    parser.add_argument("--vae"), parser.add_argument("--text-encoder"), parser.add_argument("--data")
    parser.add_argument("--heldout")
    parser.add_argument("--eval-every", type=float, default=30.0, help="seconds of training between evaluations")
    parser.add_argument("--turn", type=float, default=15.0, help="seconds of training per turn")
    parser.add_argument("--num", type=int, default=100, help="judge prompts per evaluation")
    parser.add_argument("--baseline-steps", type=float, default=2.5,
                        help="the example's steps as a multiple of ours (0 = no baseline)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-2 config value for all of ours (e.g. to try a config before making it the default)")
    parser.add_argument("--sigma-rels", type=float, nargs="*", default=[0.05, 0.10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, help="our training steps (default: the shapes config's)")
    parser.add_argument("--json", help="also write the curves here")
    add_common_args(parser)
    parser.set_defaults(threads=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_common_args(args)
    results = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="bench-ttq-") as tmp:
            print(f"seed {seed}")
            sides, parts, heldout = run(args, seed, Path(tmp))
            results[seed] = {s.name: s.curve for s in sides}
            for side in sides:
                if getattr(side, "snapshots", None):
                    print(f"post-hoc EMA of {side.name} at the end ({side.steps} steps), by sigma_rel")
                    print_table(["sigma_rel", "val loss", "judge"], sigma_rel_sweep(side, parts, heldout, SWEEP,
                                                                                    args.num))
    rows = []
    for seed, curves in results.items():
        for name, curve in curves.items():
            rows.append([str(seed), name, *[f"{t:.0f} s" if (t := time_to(curve, th)) is not None else "not reached"
                                            for th in THRESHOLDS], f"{max(p['judge'] for p in curve):.2f}",
                         f"{curve[-1]['val_loss']:.4f}", f"{curve[-1]['seconds']:.0f} s / {curve[-1]['steps']}"])
    print("\ntime to judge accuracy (training clock, evaluation excluded)")
    print_table(["seed", "side", "to 0.80", "to 0.90", "best judge", "final val loss", "end (time / steps)"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
