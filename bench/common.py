"""What every bench script shares: the machine and versions, side-by-side timing, and the models.

Timing is always interleaved: candidates run in turns (A B, B A, A B, ...) inside one process, so a
training job that another user starts half-way slows every candidate alike. Scripts report medians
over the repeats and the ratios of the medians.

Models are the shapes configs of ``configs/`` with random weights (speed does not depend on the
weights), or a trained pipeline folder when one is given.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, hardware, thread count, load and date: the header of every result."""
    import diffusers
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"date": datetime.datetime.now().isoformat(timespec="minutes"), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cpu": f"{cpu_model()} x {os.cpu_count()}", "device": device, "threads": torch.get_num_threads(),
            "load_1min_at_start": round(load, 2)}


def print_environment(env: dict | None = None) -> dict:
    env = env or environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    return env


def add_common_args(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; 0 = torch's choice). On a 2-core machine shared with other "
                             "jobs, 2 threads ran the training step 15x SLOWER than 1 (OpenMP threads wait on each "
                             "other while a core is taken)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per candidate (median taken)")
    parser.add_argument("--seed", type=int, default=0)


def apply_common_args(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return print_environment()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timings:
    """Seconds per call of each candidate: wall clock and this process's CPU time (all its threads).

    On a shared machine wall time also counts the time spent waiting for a core; CPU time counts
    only the work done, so its ratios stay steady while other jobs come and go.
    """

    def __init__(self, names):
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}

    def median(self, name: str, clock: str = "wall") -> float:
        return statistics.median(getattr(self, clock)[name])

    def ratio(self, a: str, b: str, clock: str = "wall") -> float:
        """median(a) / median(b)."""
        return self.median(a, clock) / self.median(b, clock)

    def spread(self, name: str, clock: str = "wall") -> str:
        """'median (min-max)' in milliseconds."""
        values = getattr(self, clock)[name]
        return f"{statistics.median(values) * 1e3:.1f} ms ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})"


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Timings:
    """Time every candidate ``repeats`` times in turns; the order flips each turn (A B, B A, ...)."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    timings = Timings(names)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            sync()
            timings.wall[name].append(time.perf_counter() - wall)
            timings.cpu[name].append(time.process_time() - cpu)
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[c if isinstance(c, str) else f"{c:.3g}" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def shapes_configs():
    """The (VAE, text encoder, U-Net) stage configs of the shapes domain."""
    from ldm.config import TextEncoderStageConfig, UNetStageConfig, VAEStageConfig, load_config

    return (load_config(VAEStageConfig, CONFIGS / "vae" / "shapes.yaml"),
            load_config(TextEncoderStageConfig, CONFIGS / "text_encoder" / "shapes.yaml"),
            load_config(UNetStageConfig, CONFIGS / "unet" / "shapes.yaml"))


def shapes_components(seed: int = 0, vae_levels: tuple[int, ...] | None = None, unet_overrides: dict | None = None):
    """``ldm.models.unet.Components`` of the shapes configs with random weights (eval-mode VAE/text encoder).

    vae_levels replaces the VAE's block_out_channels (one more level = twice the downsampling factor);
    unet_overrides replaces fields of the U-Net model config.
    """
    from ldm.models.text import open_clip_config, openclip_to_clip_text
    from ldm.models.unet import Components, build_noise_scheduler, build_unet, vae_scale_factor
    from ldm.models.vae import build_vae

    vae_cfg, text_cfg, unet_cfg = shapes_configs()
    torch.manual_seed(seed)
    vae_model = vae_cfg.model if vae_levels is None else dataclasses.replace(vae_cfg.model,
                                                                             block_out_channels=vae_levels)
    resolution = unet_cfg.data.resolution
    vae = build_vae(vae_model, resolution).eval().requires_grad_(False)
    text_encoder, tokenizer = openclip_to_clip_text(open_clip_config(text_cfg.model, text_cfg.data.resolution))
    model = dataclasses.replace(unet_cfg.model, **(unet_overrides or {}))
    unet = build_unet(model, resolution // vae_scale_factor(vae), vae.config.latent_channels,
                      text_encoder.config.hidden_size)
    scheduler = build_noise_scheduler(unet_cfg.diffusion, model.learned_variance)
    return Components(vae, text_encoder.eval(), tokenizer, unet, scheduler)


def load_folder_components(folder: str | Path):
    """The components of a saved pipeline folder (as stage 2 fine-tuning loads them)."""
    from ldm.models.unet import load_components

    _, _, unet_cfg = shapes_configs()
    return load_components(dataclasses.replace(unet_cfg, pretrained=str(folder)))


def save_pipeline_folder(parts, folder: str | Path, scheduler=None) -> Path:
    """A ``LatentDiffusionPipeline`` folder (DPM-Solver++ by default, as stage 2 saves it)."""
    from diffusers import DPMSolverMultistepScheduler

    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    scheduler = scheduler or DPMSolverMultistepScheduler.from_config(parts.scheduler.config,
                                                                     algorithm_type="dpmsolver++")
    pipe = LatentDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_shapes(folder: str | Path, num: int, size: int, seed: int = 0) -> Path:
    """The built-in shapes data as PNGs + metadata.jsonl."""
    from ldm.data.shapes import write_shapes_dataset

    return write_shapes_dataset(folder, num=num, size=size, seed=seed)
