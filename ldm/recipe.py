"""``ldm train all``: every stage on your own images with a preset; ``ldm demo`` is this chain on shapes.

    your folder ─► split (seeded) ─► OUT/data/train, OUT/data/heldout     (your folder is only read)
    OUT/data/train ─► stage 1 VAE ─────────┐   (side by side on a CPU)
                   ─► stage 0 CLIP ────────┤   (or a pretrained text encoder: --text-encoder PATH_OR_HUB_ID)
                   ─► stage 2 U-Net ◄──────┘ ─► OUT/pipeline ─► OUT/samples.png (held-out captions)
    OUT/data/heldout ─► metrics: FD, KID, CLIP score, bits/dim (+ judge / digit classifier) ─► OUT/metrics.json

Each stage reads its preset config (``configs/presets/<preset>/{vae,text_encoder,unet}.yaml``) with
``data.path``/``output_dir`` set and the user's ``--set <stage>.key=value`` overrides applied last.
Rerunning continues where it stopped: a stage whose ``final`` folder was made with the same config
is reused (``<output_dir>/recipe-stage.json`` records the config), any other stage resumes from the
latest checkpoint in its ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from ldm.checkpoint import atomic_folder
from ldm.config import ConfigError, DataConfig, load_config, to_dict
from ldm.distributed import usable_cores
from ldm.stages import STAGES

logger = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ("cpu", "gpu-256", "gpu-512")
MARKER = "recipe-stage.json"
MAX_HELDOUT = 1000  # a fractional --heldout takes at most this many pairs
GRID_PROMPTS, GRID_IMAGES = 10, 4  # the sample grid: held-out captions x images per caption


# --------------------------------------------------------------------------------------------
# Configs and overrides
# --------------------------------------------------------------------------------------------
def preset_configs(preset: str) -> dict[str, Path]:
    """``{stage: YAML path}`` of a preset in ``configs/presets/<preset>/``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return stage_configs(CONFIGS / "presets" / preset, {stage: f"{stage}.yaml" for stage in STAGES})


def stage_configs(folder: Path, names: dict[str, str]) -> dict[str, Path]:
    paths = {stage: folder / name for stage, name in names.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: the recipes read the configs/ folder of a source "
                                f"checkout (pip install -e .)")
    return paths


def split_overrides(items: list[str]) -> dict[str, list[str]]:
    """``["vae.train.max_steps=100", ...]`` -> ``{"vae": ["train.max_steps=100"], ...}``; "text-encoder." works too."""
    out: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for item in items:
        stage, dot, rest = item.partition(".")
        stage = stage.replace("-", "_")
        if not dot or stage not in STAGES or "=" not in rest:
            raise ConfigError(f"--set {item!r} must look like <stage>.key=value with <stage> one of "
                             f"{', '.join(STAGES)} (e.g. vae.train.max_steps=100)")
        out[stage].append(rest)
    return out


# --------------------------------------------------------------------------------------------
# The stage chain
# --------------------------------------------------------------------------------------------
def train_chain(out: Path, train_dir: Path, configs: dict[str, Path], overrides: dict[str, list[str]],
                text_encoder: str = "train") -> tuple[Path, str, Path]:
    """Stage 1 and stage 0 (side by side), then stage 2; returns (VAE folder, text encoder, OUT/pipeline).

    ``text_encoder``: "train" for stage 0, else a CLIPTextModel folder or Hub id used as it is.
    """

    def config(stage: str, extra: list[str] = ()):
        return load_config(STAGES[stage].config, configs[stage], [f"data.path={train_dir}",
                                                                  f"output_dir={out / stage}", *extra,
                                                                  *overrides.get(stage, [])])

    jobs = [(STAGES["vae"].main, config("vae"))] + \
        ([(STAGES["text_encoder"].main, config("text_encoder"))] if text_encoder == "train" else [])
    finals = run_once_side_by_side(*jobs)
    vae, text = finals[0], (finals[1] if text_encoder == "train" else text_encoder)
    unet_job = (STAGES["unet"].main, config("unet", [f"vae={vae}", f"text_encoder={text}"]))
    unet_final = run_once_side_by_side(unet_job)[0]
    pipeline = out / "pipeline"
    with atomic_folder(pipeline) as tmp:
        shutil.copytree(unet_final, tmp, dirs_exist_ok=True)
    return Path(vae), str(text), pipeline


def run_once_side_by_side(*jobs: tuple[Callable, object]) -> list[Path]:
    """Like ``run_side_by_side``, but a stage whose ``final`` was made with this same config is reused."""
    finals: list = [reusable(cfg) for _, cfg in jobs]
    todo = [i for i, final in enumerate(finals) if final is None]
    for i, final in zip(todo, run_side_by_side(*[jobs[i] for i in todo])):
        finals[i] = Path(final)
        (Path(jobs[i][1].output_dir) / MARKER).write_text(json.dumps({"config": to_dict(jobs[i][1])}, indent=1))
    return finals


def reusable(cfg) -> Path | None:
    """``<output_dir>/final`` when the recipe finished this stage with an equal config, else None."""
    final, marker = Path(cfg.output_dir) / "final", Path(cfg.output_dir) / MARKER
    if not (final.is_dir() and marker.is_file()):
        return None
    if json.loads(marker.read_text()).get("config") != json.loads(json.dumps(to_dict(cfg))):
        logger.info("%s was made with another config: the stage runs again (resuming from its checkpoints)", final)
        return None
    logger.info("reusing the finished stage %s (delete %s to train it again)", final, cfg.output_dir)
    return final


def run_side_by_side(*jobs: tuple[Callable, object]) -> list:
    """``[fn(cfg) for fn, cfg in jobs]``, but on a CPU-only machine each job runs in its own process
    on an equal share of the cores: stages 1 and 0 do not depend on each other, and two small models
    on one core each train faster than one after the other on all cores. Progress bars are off in
    the workers (their log lines still print); a failure in either job is raised here."""
    import torch

    if torch.cuda.is_available() or len(jobs) < 2:
        return [fn(cfg) for fn, cfg in jobs]
    threads = max(1, usable_cores() // len(jobs))
    logger.info("training %s side by side, %d thread(s) each", " and ".join(fn.__module__ for fn, _ in jobs), threads)
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_setup, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, cfg) for fn, cfg in jobs]
        return [future.result() for future in futures]


def _worker_setup(threads: int) -> None:
    """Runs in each worker before the stage module is imported: no progress bars, ``threads`` threads."""
    import torch
    import tqdm.auto

    class QuietBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **(kwargs | {"disable": True}))

    tqdm.auto.tqdm = QuietBar  # two bars from two processes would overwrite each other's line
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# ldm train all
# --------------------------------------------------------------------------------------------
def run_recipe(data: str, out: str | Path, preset: str = "cpu", text_encoder: str = "train",
               overrides: list[str] = (), heldout: float = 0.15, seed: int = 0, clip: str | None = None,
               eval_images: int | None = None, caption_column: str = "text", image_column: str = "image") -> dict:
    """Split ``data``, train every stage with ``preset``, sample held-out captions, measure; returns the metrics."""
    from ldm.data.split import split_heldout

    start, out = time.time(), Path(out).expanduser()
    configs, per_stage = check_recipe_inputs(data, out, preset, text_encoder, list(overrides))
    train_dir, heldout_dir = split_heldout(data, out / "data", heldout, seed, caption_column, image_column,
                                           max_fraction_count=MAX_HELDOUT)
    captions = heldout_captions(heldout_dir)
    per_stage["unet"] = [f"validation.prompts={json.dumps(captions[:4])}", f"validation.data={heldout_dir}",
                         *per_stage["unet"]]
    vae, text, pipeline = train_chain(out, train_dir, configs, per_stage, text_encoder)
    grid = sample_heldout_grid(pipeline, captions[:GRID_PROMPTS], out / "samples.png")
    metrics = measure(out, vae, text if text_encoder == "train" else None, pipeline, heldout_dir, clip, eval_images)
    metrics["minutes"] = round((time.time() - start) / 60, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report(out, train_dir, heldout_dir, vae, text, pipeline, grid, metrics)
    return metrics


RECIPE_WRITES = ("data", "vae", "text_encoder", "unet", "pipeline", "samples.png", "metrics.json")


def is_recipe_folder(out: Path) -> bool:
    """True for an OUT that ``ldm train all`` started before: its split is there."""
    return (out / "data" / "split.json").is_file()


def check_recipe_inputs(data: str, out: Path, preset: str, text_encoder: str, overrides: list[str]
                        ) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Every check ``ldm train all`` can make before it reads the data: paths, the preset, the text encoder,
    and each stage's config with its ``--set`` overrides. Returns (stage configs, overrides per stage)."""
    from ldm.locations import check_apart, check_ours_or_new, local_or_hub, model_location

    local_or_hub(data, "--data")
    check_apart(out, "--out", data, "--data")
    check_ours_or_new(out, "--out", is_recipe_folder, RECIPE_WRITES, "ldm train all")
    if text_encoder != "train":
        model_location(text_encoder, "--text-encoder", "text_encoder/config.json", "text encoder")
    configs, per_stage = preset_configs(preset), split_overrides(overrides)
    text = str(out / "text_encoder" / "final") if text_encoder == "train" else text_encoder
    for stage, entry in STAGES.items():
        if stage != "text_encoder" or text_encoder == "train":
            paths = [f"vae={out / 'vae' / 'final'}", f"text_encoder={text}"] if stage == "unet" else []
            load_config(entry.config, configs[stage], [f"data.path={out / 'data' / 'train'}",
                                                       f"output_dir={out / stage}", *paths, *per_stage[stage]])
    return configs, per_stage


def heldout_captions(heldout_dir: Path) -> list[str]:
    """The distinct captions of the held-out split, in file order."""
    rows = [json.loads(line) for line in (heldout_dir / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(str(row["text"]) for row in rows))


def sample_heldout_grid(pipeline: Path, prompts: list[str], path: Path) -> Path:
    """A row of ``GRID_IMAGES`` images for each held-out caption (DPM-Solver++, 20 steps, guidance 5)."""
    from ldm.sampling import load_pipeline, sample_grid

    _, grid = sample_grid(load_pipeline(pipeline, scheduler="dpm++"), prompts, num_images=GRID_IMAGES, steps=20,
                          guidance=5.0, seed=0)
    scale = max(1, 128 // (grid.width // GRID_IMAGES))  # small images: nearest-neighbour upscale to ~128 px
    grid.resize((grid.width * scale, grid.height * scale), 0).save(path)
    return path


def measure(out: Path, vae: Path, text: Path | None, pipeline: Path, heldout_dir: Path, clip: str | None,
            eval_images: int | None) -> dict:
    """Held-out metrics of each stage; the pipeline's also go to ``pipeline/metrics/`` (the model card)."""
    from ldm.evaluation.pipeline import evaluate_pipeline
    from ldm.evaluation.retrieval import evaluate_text_encoder
    from ldm.evaluation.vae import evaluate_vae

    data = DataConfig(path=str(heldout_dir))
    num = eval_images or 200
    split = json.loads((heldout_dir.parent / "split.json").read_text())
    metrics = {"data": {k: v for k, v in split.items() if k != "heldout_indices"},
               "vae": evaluate_vae(str(vae), data, num=min(200, num))}
    if text is not None:
        metrics["text_encoder"] = evaluate_text_encoder(str(text), data, num=min(100, num))
    metrics["pipeline"] = evaluate_pipeline(str(pipeline), data, num=eval_images, clip=clip,
                                            bpd_images=min(16, max(1, num // 4)))
    (pipeline / "metrics").mkdir(exist_ok=True)
    (pipeline / "metrics" / "pipeline.json").write_text(json.dumps(metrics["pipeline"], indent=2))
    return metrics


def report(out, train_dir, heldout_dir, vae, text, pipeline, grid, metrics) -> None:
    from ldm.evaluation.pipeline import summary_lines

    split = metrics["data"]
    lines = [f"data            {train_dir} ({split['train']} pairs; held out: {heldout_dir}, {split['heldout']} pairs)",
             f"vae             {vae}  PSNR {metrics['vae'].get('psnr', float('nan')):.2f} dB"]
    if "text_encoder" in metrics:
        lines.append(f"text encoder    {text}  text->image top-1 "
                     f"{metrics['text_encoder'].get('text_to_image_top1', 0):.2f}")
    else:
        lines.append(f"text encoder    {text} (pretrained)")
    lines += [f"pipeline        {pipeline}", f"samples         {grid}", *summary_lines(metrics["pipeline"]),
              f"metrics         {out / 'metrics.json'}  ({metrics['minutes']} minutes)"]
    print("\n".join(lines))
