"""The ``ldm`` command: data | train | cache | sample | eval | push | demo | ema. Parses arguments and calls.

Heavy imports happen inside the commands, so ``ldm --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from ldm.entry import add_config_args, load_stage_config
from ldm.errors import UserError
from ldm.locations import LocationError, check_empty_or_new, check_writable, local_or_hub

STAGES = {  # ldm train <name> -> (module in train/, config class in ldm.config)
    "vae": ("train.vae", "VAEStageConfig"),
    "text-encoder": ("train.text_encoder", "TextEncoderStageConfig"),
    "unet": ("train.unet", "UNetStageConfig"),
}


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def cmd_data(args) -> None:
    from ldm.checkpoint import atomic_folder

    out = check_empty_or_new(args.out, "--out")
    with atomic_folder(out) as tmp:  # written beside --out and renamed: a killed run leaves no half dataset
        if args.dataset == "digits":
            from ldm.data.digits import write_digits_dataset

            write_digits_dataset(tmp, size=args.size, num=args.num)
            what = "handwritten digits"
        else:
            from ldm.data.shapes import write_shapes_dataset

            write_shapes_dataset(tmp, num=args.num or 2000, size=args.size, seed=args.seed)
            what = "images"
    count = sum(1 for _ in open(out / "metadata.jsonl"))
    print(f"wrote {count} {what} of {args.size}x{args.size} and metadata.jsonl to {out}")


def cmd_train(args) -> None:
    import importlib

    from ldm import config as config_module

    module_name, class_name = STAGES[args.stage]
    cfg = load_stage_config(getattr(config_module, class_name), args)
    importlib.import_module(module_name).main(cfg)


def cmd_train_all(args) -> None:
    from ldm.recipe import run_recipe

    run_recipe(args.data, args.out, preset=args.preset, text_encoder=args.text_encoder, overrides=args.overrides,
               heldout=args.heldout, seed=args.seed, clip=args.clip, eval_images=args.eval_images,
               caption_column=args.caption_column, image_column=args.image_column)


def cmd_cache(args) -> None:
    if args.action == "verify":
        from ldm.data.cached import check_cache, read_manifest
        from ldm.data.shards import REBUILD, DamagedCacheError

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

    paths = sample_to_files(args.model, args.prompt, negative_prompt=args.negative_prompt,
                            num_images=args.num_images, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, out=args.out, scheduler=args.scheduler, singles=args.singles)
    for path in paths:
        print(path)


def cmd_eval(args) -> None:
    from ldm.config import DataConfig

    if args.out is None and not isinstance(local_or_hub(args.model, "--model"), Path):
        raise LocationError(f"--model {args.model} is a Hub id: pass --out FILE.json for the metrics (the default "
                            f"is <model folder>/metrics/{args.kind}.json)")
    check_writable(Path(args.out).parent if args.out else Path(args.model) / "metrics", "--out folder",
                   "pass --out FILE.json in a folder you can write to")
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
    out = Path(args.out or Path(args.model) / "metrics" / f"{args.kind}.json")
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
    from ldm.ema import sweep_sigma_rel, write_posthoc_pipeline

    if args.sigma_rel is None and not args.sweep:
        raise SystemExit("error: ldm ema needs --sigma-rel X (write that pipeline) or --sweep X Y ... (compare them)")
    if args.sweep:
        rows = sweep_sigma_rel(args.model, args.sweep, data=args.data, num=args.num)
        print("sigma_rel  val_loss  profile_fit_error")
        for row in rows:
            label = "final" if row["sigma_rel"] is None else f"{row['sigma_rel']:.4f}"
            fit = "" if row["profile_fit_error"] is None else f"{row['profile_fit_error']:.1e}"
            print(f"{label:>9}  {row['val_loss']:.6f}  {fit}")
    if args.sigma_rel is not None:
        print(write_posthoc_pipeline(args.model, args.sigma_rel, args.out))


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Staged latent diffusion on diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write a built-in dataset: synthetic shapes, or real handwritten digits")
    data.add_argument("dataset", choices=["shapes", "digits"],
                      help="shapes: generated here; digits: scikit-learn's 1,797 scans (pip install -e \".[real]\")")
    data.add_argument("--out", required=True)
    data.add_argument("--num", type=int, default=None, help="images (shapes: default 2000; digits: default all)")
    data.add_argument("--size", type=int, default=32)
    data.add_argument("--seed", type=int, default=0, help="shapes only")
    data.set_defaults(func=cmd_data)

    train = sub.add_parser("train", help="train a stage (same as accelerate launch -m train.<stage>), or all")
    stages = train.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        stage = stages.add_parser(name, help=f"train stage {name} from a YAML config")
        add_config_args(stage)
        stage.set_defaults(func=cmd_train)
    add_train_all_args(stages.add_parser("all", help="every stage on your own captioned images, with a preset"))

    cache = sub.add_parser("cache", help="precompute stage 2's latent cache (split across launched processes)")
    actions = cache.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="encode the data of a stage-2 config into cache.dir; under torchrun "
                               "or accelerate launch every process encodes its share")
    build.add_argument("--config", required=True, help="the stage-2 YAML that will train from the cache")
    build.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set cache.dir=/shared/cache (repeatable)")
    build.set_defaults(func=cmd_cache, resume=None)
    verify = actions.add_parser("verify", help="check every shard of a cache against its manifest (sha256)")
    verify.add_argument("--dir", required=True, help="the cache folder (cache.dir)")
    verify.set_defaults(func=cmd_cache)

    sample = sub.add_parser("sample", help="generate a PNG grid from a saved pipeline")
    sample.add_argument("--model", required=True, help="pipeline folder or Hub id")
    sample.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    sample.add_argument("--negative-prompt", default=None)
    sample.add_argument("--num-images", type=int, default=4, help="images per prompt")
    sample.add_argument("--steps", type=int, default=25)
    sample.add_argument("--guidance", type=float, default=5.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--scheduler", default=None, help="ddim | ddpm | euler | dpm++ | unipc (default: saved)")
    sample.add_argument("--out", default="samples.png")
    sample.add_argument("--singles", action="store_true", help="also write each image on its own")
    sample.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a saved model; prints and writes JSON metrics")
    ev.add_argument("kind", choices=["vae", "text-encoder", "pipeline"])
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True, help="imagefolder or dataset name (held-out data)")
    ev.add_argument("--split", default="train")
    ev.add_argument("--image-column", default="image")
    ev.add_argument("--caption-column", default="text")
    ev.add_argument("--resolution", type=int, default=None, help="default: the model's training resolution")
    ev.add_argument("--num", type=int, default=None, help="examples to use (default: a kind-specific number)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--steps", type=int, default=20, help="pipeline: sampling steps")
    ev.add_argument("--guidance", type=float, default=5.0, help="pipeline: guidance scale")
    ev.add_argument("--scheduler", default="dpm++", help="pipeline: sampler")
    ev.add_argument("--clip", default=None, metavar="MODEL_NAME:PRETRAINED_PATH",
                    help="pipeline: open_clip model for FD/KID/CLIP score (default: the pipeline's stage-0 CLIP)")
    ev.add_argument("--out", default=None, help="JSON path (default: <model>/metrics/<kind>.json)")
    ev.set_defaults(func=cmd_eval)

    push = sub.add_parser("push", help="publish a pipeline folder to the Hugging Face Hub")
    push.add_argument("--model", required=True)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch to push to")
    push.add_argument("--dry-run", action="store_true", help="assemble and list the release folder only")
    push.set_defaults(func=cmd_push)

    demo = sub.add_parser("demo", help="the whole chain on the built-in shapes data (CPU-sized)")
    demo.add_argument("--out", default="demo")
    demo.add_argument("--quick", action="store_true",
                      help="a 2-minute smoke run of the same chain (tiny data, 2 steps per stage)")
    demo.add_argument("--seed", type=int, default=0, help="train.seed of every stage (the data stay the same)")
    demo.set_defaults(func=cmd_demo)

    ema = sub.add_parser("ema", help="post-hoc EMA: rebuild any EMA length from a stage-2 run's snapshots")
    ema.add_argument("--model", required=True, help="the stage-2 output_dir (with final/ and ema-snapshots/)")
    ema.add_argument("--sigma-rel", type=float, default=None,
                     help="EMA length relative to training time (EDM2 σ_rel, e.g. 0.05-0.15): write that pipeline")
    ema.add_argument("--out", default=None, help="pipeline folder to write (default: <model>/posthoc-ema-<σ_rel>)")
    ema.add_argument("--sweep", type=float, nargs="+", default=None, metavar="SIGMA_REL",
                     help="print the held-out validation loss of each σ_rel (and of final/) to choose one")
    ema.add_argument("--data", default=None, help="held-out data for --sweep (default: the run's validation.data)")
    ema.add_argument("--num", type=int, default=None, help="held-out examples for --sweep (default: as trained)")
    ema.set_defaults(func=cmd_ema)
    return parser


def add_train_all_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="your imagefolder with metadata.jsonl (or a dataset name); "
                        "only read: the split is written to OUT/data")
    parser.add_argument("--out", required=True, help="everything goes here; rerun to continue")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu-256", "gpu-512"],
                        help="stage configs from configs/presets/<preset>/")
    parser.add_argument("--text-encoder", default="train", metavar="train|PATH_OR_HUB_ID",
                        help="train stage 0 (default) or use this pretrained CLIPTextModel folder / Hub id")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a key of one stage, e.g. --set vae.train.max_steps=100 (repeatable)")
    parser.add_argument("--heldout", type=float, default=0.15,
                        help="held-out pairs: a fraction (below 1, at most 1,000 pairs) or a count (default 0.15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--clip", default=None, metavar="MODEL_NAME:PRETRAINED_PATH",
                        help="open_clip model for FD/KID/CLIP score (default: the stage-0 CLIP)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="held-out pairs the metrics use (default all, at most 1,000)")
    parser.add_argument("--caption-column", default="text")
    parser.add_argument("--image-column", default="image")
    parser.set_defaults(func=cmd_train_all)


def main(argv: list[str] | None = None) -> None:
    """Run a command; bad input (a ``UserError``, a missing, existing or unwritable path) exits with its
    message alone, status 2; anything else keeps its traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as err:
        if not is_bad_input(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def is_bad_input(err: BaseException) -> bool:
    """Errors whose message is the whole story: bad input, or a path that is missing, taken or unwritable."""
    return isinstance(err, (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                            NotADirectoryError)) or (
        isinstance(err, OSError) and err.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT))


if __name__ == "__main__":
    main()
