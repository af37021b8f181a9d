"""Representation alignment for stage 2 (REPA, Yu et al. 2024; U-REPA for U-Nets): the frozen image
encoder, its patch-feature targets (computed once per run, before the first step), and the trainable
projection of the U-Net's middle-block features that ``ldm.losses.alignment`` compares with them.

The encoder is an open_clip image tower: by default the stage-0 CLIP trained for this model (its
``open_clip/`` folder beside the text encoder), or any open_clip model with local weights
(``align.encoder``, the forms ``ldm eval pipeline --clip`` takes). The loss is on for the first
``align.steps`` optimizer steps only (HASTE, Wang et al. 2025: alignment helps early and can hold the
model back late); the projection is trained with the U-Net and never ships with the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ldm.config import AlignConfig
from ldm.data.images import flip_decision
from ldm.losses.alignment import alignment_loss, common_grid, to_patch_grid, tokens_to_grid

logger = logging.getLogger(__name__)
TARGETS_FILE = "align-targets.safetensors"


class Projector(nn.Module):
    """h_φ: a 3-layer MLP with SiLU applied to every patch token (REPA's projector), C -> width -> D."""

    def __init__(self, in_dim: int, width: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, N, D]
        return self.net(tokens)


def encoder_folder_candidates(align: AlignConfig, text_encoder: str | None, pretrained: str | None) -> list[str]:
    """Where the image encoder comes from: ``align.encoder``, else the stage-0 CLIP's ``open_clip/`` folder
    beside the text encoder or inside the pipeline being fine-tuned."""
    if align.encoder:
        return [align.encoder]
    return [str(Path(p) / "open_clip") for p in (pretrained, text_encoder) if p]


def load_image_encoder(align: AlignConfig, text_encoder: str | None, pretrained: str | None) -> nn.Module:
    """The frozen open_clip image tower that gives the targets (eval mode, returns patch tokens)."""
    from ldm.evaluation.fid import load_feature_space

    candidates = encoder_folder_candidates(align, text_encoder, pretrained)
    found = next((c for c in candidates if align.encoder or (Path(c) / "open_clip_config.json").is_file()), None)
    if found is None:
        raise FileNotFoundError(f"align.weight > 0 needs an image encoder, and none of {candidates} is an open_clip "
                                f"folder: set align.encoder to `<stage-0 output>/final/open_clip` or to an open_clip "
                                f"MODEL:WEIGHTS with local weights (or align.weight=0)")
    visual = load_feature_space(clip=found).model.visual.eval().requires_grad_(False)
    visual.output_tokens = True
    return visual


def input_size(visual: nn.Module) -> tuple[int, int]:
    size = visual.preprocess_cfg["size"]
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def to_input_size(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] resized (bicubic) to the encoder's input size, as open_clip's preprocessing does."""
    size = input_size(visual)
    if tuple(pixels.shape[-2:]) == size:
        return pixels.float()
    return F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False)


@torch.no_grad()
def encode_patches(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch features y* [B, N, D] of images in [-1, 1] [B, 3, H, W], resized to the encoder's input size and
    normalised with its own mean and std, as open_clip's preprocessing does."""
    cfg = visual.preprocess_cfg
    x = (to_input_size(visual, pixels) + 1) / 2
    mean, std = (torch.tensor(cfg[k], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for k in ("mean", "std"))
    _, tokens = visual((x - mean) / std)
    return tokens.float()


def patch_grid(visual: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the encoder's patch tokens."""
    grid = visual.grid_size
    return (grid, grid) if isinstance(grid, int) else tuple(grid)


@torch.no_grad()
def compute_targets(visual: nn.Module, dataset, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{"plain": [N, P, D], and "flip": mirrored images' [N, P, D] when the data mirror} for every example
    of ``dataset`` (its deterministic crop: the same pixels the latent cache encodes)."""
    flips = (False, True) if dataset.data.random_flip else (False,)
    out = {}
    for flip in flips:
        chunks = []
        for start in tqdm(range(0, len(dataset), batch_size), desc="alignment targets", leave=False):
            stop = min(start + batch_size, len(dataset))
            pixels = torch.cat([to_input_size(visual, dataset.load(i, 0, flip)["pixel_values"][None])
                                for i in range(start, stop)])  # one size, whatever the aspect buckets
            device = next(visual.parameters()).device
            chunks.append(encode_patches(visual, pixels.to(device)).half().cpu())
        out["flip" if flip else "plain"] = torch.cat(chunks)
    return out


def load_or_compute_targets(visual: nn.Module, dataset, path: Path, fingerprint: dict) -> dict[str, torch.Tensor]:
    """The targets of ``compute_targets``, kept at ``path`` (safetensors, with their fingerprint in its
    metadata): reused when the fingerprint matches, else computed and written (write-then-rename)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = json.dumps(fingerprint, sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == key:
                return {name: f.get_tensor(name) for name in f.keys()}
        logger.info("alignment targets %s were made from other data or another encoder: recomputed", path)
    targets = compute_targets(visual, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.contiguous() for k, v in targets.items()}, str(tmp), metadata={"fingerprint": key})
    tmp.replace(path)
    return targets


class Aligner:
    """REPA for one run: the projector, the targets, a hook on the U-Net's middle block, and λ·L_REPA."""

    def __init__(self, align: AlignConfig, projector: Projector, targets: dict[str, torch.Tensor],
                 grid: tuple[int, int]):
        self.align, self.projector, self.targets, self.grid = align, projector, targets, grid
        self.features: torch.Tensor | None = None
        self.logged: list[torch.Tensor] = []  # λ·L_REPA of each micro-batch since the last ``pop_log``

    def active(self, step: int) -> bool:
        """On for optimizer steps 0 .. align.steps − 1 (all steps when align.steps is null)."""
        return self.align.steps is None or step < self.align.steps

    @contextlib.contextmanager
    def capture(self, unet: nn.Module):
        """Keep the output of ``unet.mid_block`` of the forward passes inside the block."""
        handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: setattr(self, "features", out))
        try:
            yield
        finally:
            handle.remove()

    def loss(self, batch: dict, projector: nn.Module | None = None) -> torch.Tensor:
        """λ · mean over the micro-batch of L_REPA, from the captured features and the examples' targets.

        ``projector``: the (possibly distributed-wrapped) module to call; default the plain one."""
        if self.features is None:
            raise RuntimeError("alignment: no U-Net features were captured (call inside Aligner.capture)")
        features, self.features = self.features, None
        index = batch["index"].tolist()
        flip = ["flip" in self.targets and flip_decision(int(s)) for s in batch["seed"].tolist()]
        rows = [self.targets["flip" if f else "plain"][i] for i, f in zip(index, flip)]
        grid = common_grid(features, self.grid)  # the coarser of the two grids: area means on the finer side
        targets = tokens_to_grid(torch.stack(rows).to(features.device).float(), self.grid, grid)
        projected = (projector or self.projector)(to_patch_grid(features, grid).float())
        value = self.align.weight * alignment_loss(projected, targets).mean()
        self.logged.append(value.detach())
        return value

    def pop_log(self) -> dict:
        """{"align_loss": mean λ·L_REPA of the micro-batches since the last call} (empty when none): the logged
        ``loss`` is the whole objective, L_diffusion + this."""
        logged, self.logged = self.logged, []
        return {"align_loss": float(torch.stack(logged).mean())} if logged else {}


def build_aligner(cfg, unet: nn.Module) -> tuple[Aligner, nn.Module] | tuple[None, None]:
    """(Aligner without targets yet, the frozen image encoder) for a stage-2 config, or (None, None) when
    ``align.weight`` is 0. The projector maps the middle block's channels to the encoder's token width."""
    if not cfg.align.weight:
        return None, None
    visual = load_image_encoder(cfg.align, cfg.text_encoder, cfg.pretrained)
    probe = encode_patches(visual, torch.zeros(1, 3, *input_size(visual)))
    projector = Projector(unet.config.block_out_channels[-1], cfg.align.projector_width, probe.shape[-1])
    return Aligner(cfg.align, projector, {}, patch_grid(visual)), visual


def attach_targets(aligner: Aligner, visual: nn.Module, dataset, folder: Path, dist, device) -> None:
    """The run's targets into ``aligner``, before the first step: the main process computes them (on
    ``device``) or finds them current, then every process reads the file (an error on the main process is
    raised on every process: none waits at a barrier)."""
    from ldm.data.cache import fingerprint, module_hash
    from ldm.distributed import main_decides

    key = fingerprint(dataset, module_hash(visual), "", torch.float16) | {"targets": "open_clip patch tokens"}
    path = Path(folder) / TARGETS_FILE

    def make() -> str:
        load_or_compute_targets(visual.to(device), dataset, path, key)
        return str(path)

    main_decides(dist, make)
    aligner.targets = load_or_compute_targets(visual, dataset, path, key)
    logger.info("alignment (REPA): λ=%g for %s steps, %d target patches of width %d per image",
                aligner.align.weight, aligner.align.steps or "all", *aligner.targets["plain"].shape[1:])
