"""The stage entry point: ``python -m train.<stage> --config F [--set k=v ...] [--resume R]``.

It belongs with the stages and the config, not the CLI: ``train/*`` import it, and ``ldm.cli`` (which
reaches ``train/*`` through the demo) imports it too, so no import arrow runs from ``train/`` up into
the CLI.
"""

from __future__ import annotations

import argparse

from ldm.errors import run_reporting_bad_input


def stage_entry(stage: str, main, argv: list[str] | None = None):
    """Parse ``--config/--set/--resume``, load the config of ``stage`` (a name in ``ldm.stages.STAGES``) and call
    ``main(cfg)``.

    Bad input, in the config or found by the stage before it trains (a missing data or VAE folder, a
    folder without metadata.jsonl), exits with ``error: <message>`` and status 2, as ``ldm`` does.
    """
    from ldm.stages import STAGES

    config_class = STAGES[stage].config
    parser = argparse.ArgumentParser(description=f"train a stage from a YAML config ({config_class.__name__})")
    add_config_args(parser)
    args = parser.parse_args(argv)

    def run():
        return main(load_stage_config(config_class, args))

    return run_reporting_bad_input(run)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    from ldm.arguments import override, resume

    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=override,
                        help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="latest|never|PATH", type=resume,
                        help="continue from a checkpoint (default: latest one in output_dir, if any)")


def load_stage_config(cls, args):
    """The validated stage config from ``args.config`` + ``args.overrides`` whose input folders exist (a
    ``ConfigError`` or a path error otherwise): checked before the stage creates or moves anything."""
    from ldm.config import load_config

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(cls, args.config, overrides)
    check_stage_inputs(cfg)
    return cfg


def check_stage_inputs(cfg) -> None:
    """Every folder or Hub id a stage config reads exists (a missing local folder, or a folder of the wrong kind,
    is an error naming its key), and stage 2 knows where its VAE and text encoder come from."""
    from ldm.config import ConfigError, UNetStageConfig
    from ldm.locations import local_or_hub, model_location

    dreambooth = getattr(getattr(cfg, "dreambooth", None), "instance_data", None)
    for key, value in (("data.path", cfg.data.path), ("dreambooth.instance_data", dreambooth),
                       ("validation.data", getattr(getattr(cfg, "validation", None), "data", None))):
        if value:
            local_or_hub(value, key)
    if not isinstance(cfg, UNetStageConfig):
        return
    if cfg.lora.rank > 0 and not cfg.pretrained:
        raise ConfigError("lora.rank > 0 trains adapters for a base model: set `pretrained` to the pipeline folder "
                          "or Hub id to adapt (or lora.rank=0 to train a new U-Net)")
    for key, marker, what in (("pretrained", "model_index.json", "pipeline"), ("vae", "config.json", "VAE"),
                              ("text_encoder", None, "text encoder")):
        if key != "pretrained" and not cfg.pretrained and not getattr(cfg, key):
            raise ConfigError(f"{key} is not set: set it to the folder stage {1 if key == 'vae' else 0} saved (or "
                              f"set `pretrained` to a pipeline folder to fine-tune)")
        if getattr(cfg, key) and (key == "pretrained" or not cfg.pretrained):
            model_location(getattr(cfg, key), key, marker, what)
    check_resolution_fits_vae(cfg)


def check_resolution_fits_vae(cfg) -> None:
    """data.resolution is a multiple of the local VAE's downsampling factor 2^(levels − 1) (read from its config)."""
    import json
    from pathlib import Path

    from ldm.config import ConfigError

    key, folder = ("pretrained", Path(cfg.pretrained) / "vae") if cfg.pretrained else ("vae", Path(cfg.vae))
    try:
        factor = 2 ** (len(json.loads((folder.expanduser() / "config.json").read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return  # a Hub id, or a config the loader reports on
    if cfg.data.resolution % factor:
        raise ConfigError(f"data.resolution {cfg.data.resolution} is not a multiple of the downsampling factor "
                          f"{factor} of the VAE in {key} {folder}; use a multiple of {factor}")
