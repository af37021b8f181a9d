"""Zero-shot retrieval and attribute sensitivity of a CLIP trained by stage 0.

Similarity of caption i and image j is s_ij = <t_i, v_j> / (|t_i| |v_j|) (Radford et al. 2021,
Fig. 3). Text→image top-k: the matching image is among the k most similar of N candidates;
image→text the same the other way. Candidates whose caption equals the query's caption are
indistinguishable by definition, so any of them counts as the match.

Attribute sensitivity: captions that differ only in one colour word (or one shape word) should
not collapse onto the same embedding; we report the cosine similarity of such pairs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from ldm.arguments import ArgumentValueError
from ldm.config import DataConfig
from ldm.data.images import ImageCaptionDataset, collate
from ldm.data.shapes import COLOURS, KINDS
from ldm.data.split import pick_examples
from ldm.models.text import load_open_clip, load_text_encoder, tokenize, warn_if_truncated

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": KINDS}  # the words the shapes captions use


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str],
                      ks: tuple[int, ...] = (1, 5)) -> dict:
    """Recall@k both ways among N pairs. Features: [N, E] each; row i of both is pair i."""
    sims = F.normalize(text_features.float(), dim=-1) @ F.normalize(image_features.float(), dim=-1).T  # [N, N]
    same = torch.tensor([[a == b for b in captions] for a in captions])  # [N, N] caption i == caption j
    out: dict = {"candidates": len(captions)}
    for name, scores in (("text_to_image", sims), ("image_to_text", sims.T)):
        hits = same.gather(1, scores.argsort(dim=1, descending=True))  # [N, N] match flags in rank order
        for k in ks:
            out[f"{name}_top{k}"] = hits[:, :k].any(dim=1).float().mean().item()
    return out


def swap_attribute(caption: str, words: tuple[str, ...], first_only: bool = True) -> list[str]:
    """``caption`` with its first (or each) word from ``words`` replaced by each other word of ``words``."""
    tokens, swaps = caption.split(" "), []
    for i, token in enumerate(tokens):
        if token in words:
            swaps += [" ".join(tokens[:i] + [w] + tokens[i + 1:]) for w in words if w != token]
            if first_only:
                break
    return swaps


def cosine_stats(cos: torch.Tensor) -> dict:
    return {"mean_cosine": cos.mean().item(), "max_cosine": cos.max().item(),
            "fraction_above_0.95": (cos > 0.95).float().mean().item(), "pairs": len(cos)}


@torch.no_grad()
def attribute_sensitivity(encode: Callable[[list[str]], torch.Tensor], captions: list[str],
                          attributes: dict[str, tuple[str, ...]] = ATTRIBUTES) -> dict:
    """cos(e(c), e(c')) over pairs (c, c') differing in one attribute word: mean, max, share > 0.95.

    ``encode`` maps texts to pooled embeddings [B, E]. "single" repeats the statistics over captions
    that mention one such word (one shape); None for an attribute no caption mentions.
    """
    out = {}
    for name, words in attributes.items():
        pairs = [(c, v) for c in dict.fromkeys(captions) for v in swap_attribute(c, words)]
        if not pairs:
            out[name] = None
            continue
        cos = torch.cat([F.cosine_similarity(encode([a for a, _ in chunk]), encode([b for _, b in chunk]), dim=-1)
                         for chunk in (pairs[i:i + 256] for i in range(0, len(pairs), 256))])
        single = torch.tensor([sum(t in words for t in a.split(" ")) == 1 for a, _ in pairs])
        out[name] = cosine_stats(cos) | {"single": cosine_stats(cos[single]) if single.any() else None}
    return out


@torch.no_grad()
def clip_features(model, tokenizer: CLIPTokenizer, pixel_values: torch.Tensor, captions: list[str],
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip image and text features [N, E] (projected, not normalised), computed in chunks."""
    device = next(model.parameters()).device
    images, texts = [], []
    for i in range(0, len(captions), batch_size):
        images.append(model.encode_image(pixel_values[i:i + batch_size].to(device)))
        texts.append(model.encode_text(tokenize(tokenizer, captions[i:i + batch_size]).to(device)))
    return torch.cat(images).float().cpu(), torch.cat(texts).float().cpu()


@torch.no_grad()
def evaluate_clip(model, tokenizer: CLIPTokenizer, pixel_values: torch.Tensor, captions: list[str]) -> dict:
    """Retrieval among the N given pairs + attribute sensitivity of the projected text features."""
    was_training = model.training
    model.eval()
    image_features, text_features = clip_features(model, tokenizer, pixel_values, captions)
    device = next(model.parameters()).device
    metrics = retrieval_metrics(image_features, text_features, captions)
    metrics["attribute_sensitivity_projected"] = attribute_sensitivity(
        lambda t: model.encode_text(tokenize(tokenizer, t).to(device)).float().cpu(), captions)
    model.train(was_training)
    return metrics


def evaluate_text_encoder(model_dir: str | Path, data: DataConfig, num: int | None = None, seed: int = 0,
                          resolution: int | None = None) -> dict:
    """Zero-shot retrieval on held-out pairs with the open_clip model saved by stage 0.

    model_dir: ``<output_dir>/final`` of ``ldm train text-encoder`` (``open_clip/``, ``text_encoder/``,
    ``tokenizer/``). data: held-out image-caption pairs (e.g. shapes written with another seed).
    Returns retrieval among ``num`` (default 100) candidates both ways, and the cosine similarity of
    captions that differ only in colour or only in shape, for the projected open_clip text features
    and for the pooled output of the saved CLIPTextModel.
    """
    model_dir = Path(model_dir)
    model, config = load_open_clip(model_dir / "open_clip")
    size = config["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    if resolution not in (None, size):  # another size gives another number of patches than it was trained on
        raise ArgumentValueError(f"--resolution {resolution}: the stage-0 CLIP's image tower takes {size}-pixel "
                                 f"images (leave --resolution out)")
    resolution = size
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    text_encoder, _ = load_text_encoder(model_dir)
    dataset = ImageCaptionDataset(replace(data, resolution=resolution))
    batch = collate([dataset[i] for i in pick_examples(len(dataset), num or 100, seed)])
    warn_if_truncated(tokenizer, batch["caption"])
    metrics = {"model": str(model_dir), "data": data.path, "resolution": resolution, "seed": seed}
    metrics |= evaluate_clip(model, tokenizer, batch["pixel_values"], batch["caption"])
    metrics["attribute_sensitivity_pooled"] = attribute_sensitivity(
        lambda t: text_encoder(tokenize(tokenizer, t)).pooler_output, batch["caption"])
    return metrics
