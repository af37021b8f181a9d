"""The ``ldm`` command: data | train | cache | sample | eval | push | demo | ema. Parses arguments and calls.

Heavy imports happen inside the commands, so ``ldm --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ldm.arguments import (POSITIVE, SEED, SIGMA_REL, ArgumentValueError, clip_spec, heldout, number, override, text,
                           whole)
from ldm.entry import add_config_args, load_stage_config
from ldm.errors import run_reporting_bad_input
from ldm.locations import (LORA_FILE, LocationError, check_apart, check_can_create, check_empty_or_new,
                           check_ours_or_new, local_or_hub, model_location)
from ldm.stages import COMMANDS

SAMPLERS = ("ddim", "ddpm", "euler", "dpm++", "unipc")  # = ldm.sampling.SCHEDULERS (kept here: no torch import)
MAX_SIZE = 2048  # ldm data --size: the largest images the built-in datasets are written at
DIGITS = 1797  # scikit-learn's handwritten digits (ldm data digits --num)
TEXTURE_CLASSES = 8  # ldm data textures: one class per photograph (ldm.data.textures.TEXTURES)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def cmd_data(args) -> None:
    from ldm.checkpoint import atomic_folder

    low, high = (16, MAX_SIZE) if args.dataset == "shapes" else (8, MAX_SIZE)
    if not low <= args.size <= high:
        raise ArgumentValueError(f"--size {args.size}: {args.dataset} images must be {low} to {high} pixels")
    if args.dataset == "digits" and args.num is not None and args.num > DIGITS:
        raise ArgumentValueError(f"--num {args.num}: scikit-learn ships {DIGITS} digits; choose 1 to {DIGITS}")
    if args.dataset == "textures" and args.num is not None and args.num < TEXTURE_CLASSES:
        raise ArgumentValueError(f"--num {args.num}: textures need one image per class; choose at least "
                                 f"{TEXTURE_CLASSES}")
    out = check_can_create(check_empty_or_new(args.out, "--out"), "--out")
    with atomic_folder(out) as tmp:  # written beside --out and renamed: a killed run leaves no half dataset
        if args.dataset == "digits":
            from ldm.data.digits import write_digits_dataset

            write_digits_dataset(tmp, size=args.size, num=args.num)
            what = "handwritten digits"
        elif args.dataset == "textures":
            from ldm.data.textures import write_textures_dataset

            write_textures_dataset(tmp, size=args.size, num=args.num or 1600, seed=args.seed)
            what = "photograph crops"
        else:
            from ldm.data.shapes import write_shapes_dataset

            write_shapes_dataset(tmp, num=args.num or 2000, size=args.size, seed=args.seed)
            what = "images"
    count = sum(1 for _ in open(out / "metadata.jsonl"))
    print(f"wrote {count} {what} of {args.size}x{args.size} and metadata.jsonl to {out}")


def cmd_train(args) -> None:
    stage = COMMANDS[args.stage]
    cfg = load_stage_config(stage.config, args)  # checked before the stage module is imported
    stage.main(cfg)


def cmd_train_all(args) -> None:
    from ldm.recipe import run_recipe

    run_recipe(args.data, args.out, preset=args.preset, text_encoder=args.text_encoder, overrides=args.overrides,
               heldout=args.heldout, seed=args.seed, clip=args.clip, eval_images=args.eval_images,
               caption_column=args.caption_column, image_column=args.image_column)


def cmd_cache(args) -> None:
    if args.action == "verify":
        from ldm.data.cached import check_cache, read_manifest
        from ldm.data.shards import REBUILD, DamagedCacheError

        if not Path(args.dir).is_dir():
            raise FileNotFoundError(f"--dir {args.dir}: this folder does not exist (pass cache.dir of a built cache)")
        manifest = read_manifest(Path(args.dir))
        problems = check_cache(Path(args.dir), manifest, full=True)
        if problems:
            raise DamagedCacheError(f"latent cache {args.dir} is damaged: {'; '.join(problems)}; {REBUILD}")
        print(f"{args.dir}: {manifest['examples']} examples in {len(manifest['shards'])} shards, every size and "
              f"sha256 as the manifest records")
        return
    from ldm.config import UNetStageConfig
    from train.cache import main as build

    folder = build(load_stage_config(UNetStageConfig, args))
    if os.environ.get("RANK", "0") == "0":
        print(folder)


def cmd_sample(args) -> None:
    from ldm.sampling import sample_to_files

    check_apart(args.out, "--out", args.model, "--model")
    paths = sample_to_files(args.model, args.prompt, negative_prompt=args.negative_prompt,
                            num_images=args.num_images, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, out=args.out, scheduler=args.scheduler, singles=args.singles)
    for path in paths:
        print(path)


EVAL_MARKERS = {"vae": ("config.json", "vae/config.json"), "text-encoder": ("open_clip/open_clip_config.json",),
                "pipeline": ("model_index.json", LORA_FILE)}
EVAL_MIN_NUM = {"vae": 1, "text-encoder": 2, "pipeline": 4}  # retrieval needs 2 pairs; FD and KID 2 per half


def check_eval_args(args) -> Path:
    """Everything ``ldm eval`` can check before it loads a model; returns the metrics file to write."""
    if args.resolution is not None and args.kind == "pipeline":
        raise ArgumentValueError(f"--resolution {args.resolution}: ldm eval pipeline samples at the pipeline's own "
                                 f"size; --resolution is for vae and text-encoder")
    if args.num is not None and args.num < EVAL_MIN_NUM[args.kind]:
        raise ArgumentValueError(f"--num {args.num}: ldm eval {args.kind} needs at least {EVAL_MIN_NUM[args.kind]} "
                                 f"examples")
    model = local_or_hub(args.model, "--model")
    if isinstance(model, Path) and not any((model / m).is_file() for m in EVAL_MARKERS[args.kind]):
        markers = " or ".join(EVAL_MARKERS[args.kind])
        raise FileNotFoundError(f"--model {args.model} is not a {args.kind} folder (no {markers}); pass the folder a "
                                f"stage saved (<output_dir>/final)")
    if not isinstance(model, Path) and (args.out is None or args.kind == "text-encoder"):
        raise LocationError(f"--model {args.model} is a Hub id: " + (
            "ldm eval text-encoder reads a local stage-0 folder (<output_dir>/final)" if args.kind == "text-encoder"
            else f"pass --out FILE.json for the metrics (the default is <model folder>/metrics/{args.kind}.json)"))
    local_or_hub(args.data, "--data")
    out = Path(args.out or model / "metrics" / f"{args.kind}.json").expanduser()
    if out.is_dir() or out.suffix.lower() != ".json":
        raise LocationError(f"--out {args.out} must be a file name ending in .json (an existing file of that name is "
                            f"replaced)")
    check_apart(out, "--out", args.data, "--data")
    return check_can_create(out, "--out")


def cmd_eval(args) -> None:
    from ldm.config import DataConfig

    out = check_eval_args(args)
    data = DataConfig(path=args.data, split=args.split, image_column=args.image_column,
                      caption_column=args.caption_column, resolution=args.resolution or 32)
    if args.kind == "vae":
        from ldm.evaluation.vae import evaluate_vae
        metrics = evaluate_vae(args.model, data, num=args.num, batch_size=args.batch_size, seed=args.seed,
                               resolution=args.resolution)
    elif args.kind == "text-encoder":
        from ldm.evaluation.retrieval import evaluate_text_encoder
        metrics = evaluate_text_encoder(args.model, data, num=args.num, seed=args.seed, resolution=args.resolution)
    else:
        from ldm.evaluation.pipeline import evaluate_pipeline
        metrics = evaluate_pipeline(args.model, data, num=args.num, seed=args.seed, steps=args.steps,
                                    guidance=args.guidance, scheduler=args.scheduler, clip=args.clip)
    print(json.dumps(metrics, indent=2))  # first: the numbers are not lost if the file cannot be written
    if args.kind == "pipeline":
        from ldm.evaluation.pipeline import summary_lines
        print("\n".join(summary_lines(metrics)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


def cmd_push(args) -> None:
    from ldm.hub import push

    result = push(args.model, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    print(result)


def cmd_demo(args) -> None:
    from ldm.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)


def cmd_ema(args) -> None:
    from ldm.ema import check_posthoc_args, sweep_sigma_rel, write_posthoc_pipeline

    if args.sigma_rel is None and not args.sweep:
        raise ArgumentValueError("ldm ema needs --sigma-rel X (write that pipeline) or --sweep X Y ... (compare them)")
    for key, value in (("--out", args.out), ("--data", args.data), ("--num", args.num)):
        needs = "--sigma-rel" if key == "--out" else "--sweep"
        if value is not None and getattr(args, needs[2:].replace("-", "_")) in (None, []):
            raise ArgumentValueError(f"{key} {value} is used with {needs} only; add {needs} or leave {key} out")
    out = check_posthoc_args(args.model, args.sigma_rel, args.out, args.data)
    if args.sweep:
        rows = sweep_sigma_rel(args.model, args.sweep, data=args.data, num=args.num)
        print("sigma_rel  val_loss  profile_fit_error")
        for row in rows:
            label = "final" if row["sigma_rel"] is None else f"{row['sigma_rel']:.4f}"
            fit = "" if row["profile_fit_error"] is None else f"{row['profile_fit_error']:.1e}"
            print(f"{label:>9}  {row['val_loss']:.6f}  {fit}")
    if args.sigma_rel is not None:
        print(write_posthoc_pipeline(args.model, args.sigma_rel, out))


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Staged latent diffusion on diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_data_command, add_train_command, add_cache_command, add_sample_command, add_eval_command,
                add_push_command, add_demo_command, add_ema_command):
        add(sub)
    return parser


def add_data_command(sub) -> None:
    data = sub.add_parser("data", help="write a built-in dataset: synthetic shapes, real handwritten digits, or "
                                       "crops of real photographs")
    data.add_argument("dataset", choices=["shapes", "digits", "textures"],
                      help="shapes: generated here; digits: scikit-learn's 1,797 scans; textures: crops of 8 "
                           "photographs bundled in scikit-image (both: pip install -e \".[real]\")")
    data.add_argument("--out", required=True, help="a new or empty folder")
    data.add_argument("--num", type=POSITIVE, default=None,
                      help=f"images (shapes: default 2000; digits: 1 to {DIGITS}, default all; textures: at least "
                           f"{TEXTURE_CLASSES}, default 1600)")
    data.add_argument("--size", type=POSITIVE, default=32, help=f"pixels (shapes: 16 to {MAX_SIZE}; digits: 8 to "
                      f"{MAX_SIZE})")
    data.add_argument("--seed", type=SEED, default=0, help="shapes and textures")
    data.set_defaults(func=cmd_data)


def add_train_command(sub) -> None:
    train = sub.add_parser("train", help="train a stage (same as accelerate launch -m train.<stage>), or all")
    stages = train.add_subparsers(dest="stage", required=True)
    for name in COMMANDS:
        stage = stages.add_parser(name, help=f"train stage {name} from a YAML config")
        add_config_args(stage)
        stage.set_defaults(func=cmd_train)
    add_train_all_args(stages.add_parser("all", help="every stage on your own captioned images, with a preset"))


def add_cache_command(sub) -> None:
    cache = sub.add_parser("cache", help="precompute stage 2's latent cache (split across launched processes)")
    actions = cache.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="encode the data of a stage-2 config into cache.dir; under torchrun "
                               "or accelerate launch every process encodes its share")
    build.add_argument("--config", required=True, help="the stage-2 YAML that will train from the cache")
    build.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=override,
                       help="override a config key, e.g. --set cache.dir=/shared/cache (repeatable)")
    build.set_defaults(func=cmd_cache, resume=None)
    verify = actions.add_parser("verify", help="check every shard of a cache against its manifest (sha256)")
    verify.add_argument("--dir", type=text, required=True, help="the cache folder (cache.dir)")
    verify.set_defaults(func=cmd_cache)


def add_sample_command(sub) -> None:
    sample = sub.add_parser("sample", help="generate a PNG grid from a saved pipeline")
    sample.add_argument("--model", required=True, help="pipeline folder or Hub id")
    sample.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    sample.add_argument("--negative-prompt", default=None)
    sample.add_argument("--num-images", type=whole(1, 1024), default=4, help="images per prompt (1 to 1024)")
    sample.add_argument("--steps", type=POSITIVE, default=25,
                        help="sampling steps: 1 to what the sampler can take on the model's schedule (checked)")
    sample.add_argument("--guidance", type=number(0), default=5.0, help="classifier-free guidance scale, >= 0 "
                        "(<= 1: none)")
    sample.add_argument("--seed", type=SEED, default=0)
    sample.add_argument("--scheduler", default=None, choices=SAMPLERS, help="default: the saved one")
    sample.add_argument("--out", default="samples.png", help="a .png, .jpg or .webp file outside --model")
    sample.add_argument("--singles", action="store_true", help="also write each image on its own")
    sample.set_defaults(func=cmd_sample)


def add_eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a saved model; prints and writes JSON metrics")
    ev.add_argument("kind", choices=["vae", "text-encoder", "pipeline"])
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True, help="imagefolder or dataset name (held-out data)")
    ev.add_argument("--split", type=text, default="train")
    ev.add_argument("--image-column", type=text, default="image")
    ev.add_argument("--caption-column", type=text, default="text")
    ev.add_argument("--resolution", type=POSITIVE, default=None, help="default: the model's training resolution")
    ev.add_argument("--num", type=POSITIVE, default=None, help="examples to use (default: a kind-specific number; "
                    "at least 2 for text-encoder, 4 for pipeline)")
    ev.add_argument("--batch-size", type=POSITIVE, default=64)
    ev.add_argument("--seed", type=SEED, default=0)
    ev.add_argument("--steps", type=POSITIVE, default=20, help="pipeline: sampling steps (checked as ldm sample's)")
    ev.add_argument("--guidance", type=number(0), default=5.0, help="pipeline: guidance scale, >= 0")
    ev.add_argument("--scheduler", default="dpm++", choices=SAMPLERS, help="pipeline: sampler")
    ev.add_argument("--clip", type=clip_spec, default=None, metavar="MODEL_NAME:PRETRAINED_PATH",
                    help="pipeline: open_clip model for FD/KID/CLIP score (default: the pipeline's stage-0 CLIP)")
    ev.add_argument("--out", default=None, help="a .json file outside --data (default: <model>/metrics/<kind>.json)")
    ev.set_defaults(func=cmd_eval)


def add_push_command(sub) -> None:
    push = sub.add_parser("push", help="publish a pipeline folder to the Hugging Face Hub")
    push.add_argument("--model", type=text, required=True)
    push.add_argument("--repo-id", type=text, required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch to push to")
    push.add_argument("--dry-run", action="store_true", help="assemble and list the release folder only")
    push.set_defaults(func=cmd_push)


def add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="the whole chain on the built-in shapes data (CPU-sized)")
    demo.add_argument("--out", default="demo", help="a new or empty folder, or an earlier demo's to continue it")
    demo.add_argument("--quick", action="store_true",
                      help="a 2-minute smoke run of the same chain (tiny data, 2 steps per stage)")
    demo.add_argument("--seed", type=SEED, default=0, help="train.seed of every stage (the data stay the same)")
    demo.set_defaults(func=cmd_demo)


def add_ema_command(sub) -> None:
    ema = sub.add_parser("ema", help="post-hoc EMA: rebuild any EMA length from a stage-2 run's snapshots")
    ema.add_argument("--model", required=True, help="the stage-2 output_dir (with final/ and ema-snapshots/)")
    ema.add_argument("--sigma-rel", type=SIGMA_REL, default=None, help="EMA length relative to training time (EDM2 "
                     "σ_rel in (0, 0.2887), e.g. 0.05-0.15): write that pipeline")
    ema.add_argument("--out", default=None, help="pipeline folder to write: new, empty or an earlier ldm ema output "
                     "(default: <model>/posthoc-ema-<σ_rel>)")
    ema.add_argument("--sweep", type=SIGMA_REL, nargs="+", default=None, metavar="SIGMA_REL",
                     help="print the held-out validation loss of each σ_rel (and of final/) to choose one")
    ema.add_argument("--data", default=None, help="held-out data for --sweep (default: the run's validation.data)")
    ema.add_argument("--num", type=POSITIVE, default=None, help="held-out examples for --sweep (default: as trained)")
    ema.set_defaults(func=cmd_ema)


def add_train_all_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=text, required=True, help="your imagefolder with metadata.jsonl (or a "
                        "dataset name); only read: the split is written to OUT/data")
    parser.add_argument("--out", type=text, required=True, help="everything goes here: a new or empty folder, or "
                        "an earlier run's to continue it")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu-256", "gpu-512"],
                        help="stage configs from configs/presets/<preset>/")
    parser.add_argument("--text-encoder", default="train", metavar="train|PATH_OR_HUB_ID",
                        help="train stage 0 (default) or use this pretrained CLIPTextModel folder / Hub id")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        type=override,
                        help="override a key of one stage, e.g. --set vae.train.max_steps=100 (repeatable)")
    parser.add_argument("--heldout", type=heldout, default=0.15,
                        help="held-out pairs: a fraction (below 1, at most 1,000 pairs) or a count (default 0.15)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the held-out split")
    parser.add_argument("--clip", type=clip_spec, default=None, metavar="MODEL_NAME:PRETRAINED_PATH",
                        help="open_clip model for FD/KID/CLIP score (default: the stage-0 CLIP)")
    parser.add_argument("--eval-images", type=whole(4), default=None,
                        help="held-out pairs the metrics use, at least 4 (default all, at most 1,000)")
    parser.add_argument("--caption-column", type=text, default="text")
    parser.add_argument("--image-column", type=text, default="image")
    parser.set_defaults(func=cmd_train_all)


def main(argv: list[str] | None = None) -> None:
    """Run a command. A bad argument stops it while parsing (argparse's ``ldm <command>: error: argument ...``);
    bad input found later (a ``UserError``, a missing, existing or unwritable path) exits with ``error: <message>``
    on one line; both with status 2 and before any work. Anything else keeps its traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    run_reporting_bad_input(args.func, args)


if __name__ == "__main__":
    main()
