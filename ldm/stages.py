"""The one stage registry: name -> config class -> main. Used by ``ldm train <stage>``, ``ldm train all``
(``ldm.recipe``), ``ldm demo``, the benches and ``python -m train.<stage>`` (``ldm.entry.stage_entry``).

    STAGES["unet"].config      UNetStageConfig          (ldm.config)
    STAGES["unet"].main(cfg)   train.unet.main          (the module imported when main is asked for)
    STAGES["unet"].command     "unet"                   (ldm train <command>; "text-encoder" for stage 0)

The command layer (``ldm/cli.py``, ``ldm/demo.py``, ``ldm/recipe.py`` and this module) is the only part of
``ldm/`` that reaches ``train/``; the library below it never does (``tests/test_imports.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ldm.config import TextEncoderStageConfig, UNetStageConfig, VAEStageConfig


@dataclass(frozen=True)
class Stage:
    name: str  # the key of --set <stage>.key=value and the output folder of ldm train all: vae, text_encoder, unet
    command: str  # ldm train <command>
    module: str  # the entry point in train/: python -m <module>
    config: type  # its config class in ldm.config

    @property
    def main(self):
        """``<module>.main``, looked up at each call (a patched or reloaded module is seen)."""
        return importlib.import_module(self.module).main


STAGES = {stage.name: stage for stage in (
    Stage("vae", "vae", "train.vae", VAEStageConfig),
    Stage("text_encoder", "text-encoder", "train.text_encoder", TextEncoderStageConfig),
    Stage("unet", "unet", "train.unet", UNetStageConfig),
)}  # in training order: stages 1 and 0 (side by side), then stage 2
COMMANDS = {stage.command: stage for stage in STAGES.values()}
