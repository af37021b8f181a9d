"""CLIP text encoders: tokenizer, loading with a layer choice, exact OpenCLIP conversion, saving.

Whatever the source (a transformers ``CLIPTextModel``, an OpenCLIP text tower, or a CLIP trained
here by stage 0), the result is a standard ``CLIPTextModel`` + ``CLIPTokenizer`` whose
``last_hidden_state`` is the conditioning c [B, L, D] of the U-Net.

The layer choice is realised by truncation. "penultimate" (clip skip, the SD-2 choice) drops the
last encoder layer, so ``last_hidden_state = LN_final(h_{n-1})``: the penultimate hidden state
with the final layer norm applied, exactly what stock diffusers and SD-2 compute. Training and
the pipeline both read ``last_hidden_state`` and therefore see bit-identical embeddings.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.config import CLIPModelConfig

logger = logging.getLogger(__name__)

Layer = Literal["last", "penultimate"]
VOCAB_SIZE = 49408  # 256 bytes x 2 + 48,894 merges + <|startoftext|> + <|endoftext|>
BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 0  # open_clip pads with zeros ("!")
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def build_clip_tokenizer(context_length: int = 77) -> CLIPTokenizer:
    """The CLIP BPE tokenizer, built offline from the vocabulary open_clip ships in its package.

    Ids equal ``open_clip.get_tokenizer(...)`` including the zero padding. ``split_special_tokens``
    keeps "!" (the pad token, id 0) and "<|endoftext|>" inside a prompt ordinary text, as in open_clip.
    open_clip also runs ``ftfy.fix_text`` and ``html.unescape`` on the prompt, which a saved
    CLIPTokenizer cannot do; prompts those leave unchanged (the usual case) get identical ids.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # open_clip is imported where used: ~2 s

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab = {w: i for i, w in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=context_length,
                         split_special_tokens=True)


def context_length(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> int:
    """Tokens per prompt: the tokenizer's model_max_length, bounded by the encoder's positions."""
    return min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)


def tokenize(tokenizer: CLIPTokenizer, texts: list[str], length: int | None = None) -> torch.Tensor:
    """[B, L] ids: <|startoftext|> tokens <|endoftext|> then padding, truncated to L tokens."""
    length = length or tokenizer.model_max_length
    return tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def warn_if_truncated(tokenizer: CLIPTokenizer, texts: list[str], length: int | None = None) -> list[int]:
    """Tokens each text loses to an L-token context; ONE warning (with the counts) if any lose some."""
    length = length or tokenizer.model_max_length
    cut = [max(0, len(ids) - length) for ids in tokenizer(list(texts), verbose=False).input_ids]
    lost = [(i, n) for i, n in enumerate(cut) if n]
    if lost:
        shown = ", ".join(f"#{i} lost {n}" for i, n in lost[:10]) + (" ..." if len(lost) > 10 else "")
        logger.warning("%d of %d text(s) are longer than the %d-token context and were truncated (%d token(s) "
                       "cut in all, at most %d from one): %s", len(lost), len(cut), length, sum(cut), max(cut),
                       shown)
    return cut


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str],
                   warn: bool = True, grad: bool = False) -> torch.Tensor:
    """c = last_hidden_state [B, L, D], computed exactly as the pipeline computes it.

    ``text_encoder`` may be wrapped (DDP) when it is trained (``grad=True``): the call goes through the
    wrapper, the config and device come from the model inside.
    """
    model = getattr(text_encoder, "module", text_encoder)
    length = context_length(model, tokenizer)
    if warn:
        warn_if_truncated(tokenizer, texts, length)
    tokens = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    use_mask = getattr(model.config, "use_attention_mask", False)
    device = next(model.parameters()).device
    mask = tokens.attention_mask.to(device) if use_mask else None
    with torch.set_grad_enabled(grad):
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


# --------------------------------------------------------------------------------------------
# Loading and saving CLIPTextModel folders
# --------------------------------------------------------------------------------------------
def apply_layer(model: CLIPTextModel, layer: Layer) -> CLIPTextModel:
    """Realise the layer choice: "penultimate" drops the last encoder layer (in place)."""
    if layer not in ("last", "penultimate"):
        raise ValueError(f"layer must be 'last' or 'penultimate' (clip skip), got {layer!r}")
    if layer == "penultimate":
        text_model = model.text_model if isinstance(model, CLIPTextModelWithProjection) else model
        if model.config.num_hidden_layers < 2:
            raise ValueError("layer='penultimate' needs a text encoder with at least 2 layers")
        text_model.encoder.layers = text_model.encoder.layers[:-1]
        model.config.num_hidden_layers -= 1
        text_model.config.num_hidden_layers = model.config.num_hidden_layers
    return model


def load_text_encoder(source: str | Path, layer: Layer = "last") -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A frozen ``CLIPTextModel`` and its tokenizer from a folder or Hub id.

    Accepts a pipeline-style folder (``text_encoder/`` + ``tokenizer/``) or a CLIPTextModel folder
    holding the tokenizer files. A folder written by this project already has its layer choice
    applied; load it with layer="last" (the default) to use it as saved.
    """
    source, local = str(source), Path(source)
    if local.is_dir():
        nested = (local / "text_encoder").is_dir()
        if not (local / ("text_encoder" if nested else "") / "config.json").is_file():
            raise FileNotFoundError(f"{source} holds no CLIPTextModel config.json; give a folder with "
                                    f"text_encoder/ + tokenizer/ subfolders or a CLIPTextModel folder")
        model = CLIPTextModel.from_pretrained(source, subfolder="text_encoder" if nested else "")
    else:  # a Hub id (or its cache when offline): the pipeline layout first, then a plain model repo
        try:
            model, nested = CLIPTextModel.from_pretrained(source, subfolder="text_encoder"), True
        except OSError:
            model, nested = CLIPTextModel.from_pretrained(source), False
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer" if nested else "")
    apply_layer(model, layer)
    return model.eval().requires_grad_(False), tokenizer


def save_text_encoder(folder: str | Path, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> Path:
    """Write ``folder/text_encoder`` (safetensors) and ``folder/tokenizer``: the pipeline's layout."""
    folder = Path(folder)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


# --------------------------------------------------------------------------------------------
# open_clip models (stage 0 trains one; evaluation reloads it)
# --------------------------------------------------------------------------------------------
def open_clip_config(model: CLIPModelConfig, image_size: int) -> dict:
    """An open_clip model config (the ``model_cfg`` of ``open_clip_config.json``) from our config."""
    if image_size % model.vision_patch_size:
        raise ValueError(f"data.resolution {image_size} must be a multiple of model.vision_patch_size "
                         f"{model.vision_patch_size}")
    return {
        "embed_dim": model.embed_dim,
        "quick_gelu": model.quick_gelu,
        "init_logit_scale": math.log(1 / model.init_temperature),
        "vision_cfg": {"image_size": image_size, "layers": model.vision_layers, "width": model.vision_width,
                       "head_width": model.vision_width // model.vision_heads, "patch_size": model.vision_patch_size},
        "text_cfg": {"context_length": model.text_context_length, "vocab_size": VOCAB_SIZE,
                     "width": model.text_width, "heads": model.text_heads, "layers": model.text_layers},
    }


def build_open_clip(config: dict) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` (or ``CustomTextCLIP``) from a model config dict."""
    import open_clip

    config = dict(config.get("model_cfg", config))
    custom = config.pop("custom_text", False) or "hf_model_name" in config.get("text_cfg", {})
    return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**config)


def save_open_clip(folder: str | Path, model: nn.Module, config: dict) -> Path:
    """``open_clip_config.json`` + ``open_clip_model.safetensors``: loads with
    ``open_clip.create_model("local-dir:<folder>")``. Images are in [-1, 1] (mean = std = 0.5)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / OPEN_CLIP_WEIGHTS))
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2))
    return folder


def load_open_clip(folder: str | Path) -> tuple[nn.Module, dict]:
    """The open_clip model saved by ``save_open_clip`` (eval mode) and its model config."""
    folder = Path(folder)
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} has no {OPEN_CLIP_CONFIG}; it is written by `ldm train text-encoder` "
                                f"at <output_dir>/final/open_clip")
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}", device="cpu")
    return model.eval(), json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model_cfg"]


# --------------------------------------------------------------------------------------------
# Exact OpenCLIP text tower -> CLIPTextModel
# --------------------------------------------------------------------------------------------
def openclip_to_clip_text(model_or_name, pretrained: str | None = None, layer: Layer = "last",
                          projection: bool = False) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Convert an OpenCLIP text tower into a frozen ``CLIPTextModel`` (+ tokenizer), exactly.

    model_or_name: an open_clip model name ("ViT-H-14", "local-dir:DIR", "hf-hub:ORG/REPO") with
    ``pretrained`` a tag or a local checkpoint file; a folder written by ``save_open_clip``; an
    open_clip model config dict (random init, or weights from the checkpoint ``pretrained``); or a
    built open_clip ``CLIP`` / ``CustomTextCLIP`` / ``TextTransformer``.
    projection=True returns ``CLIPTextModelWithProjection`` whose ``text_model`` is the ``CLIPTextModel``.
    With layer="last" its ``text_embeds`` equal open_clip's ``encode_text`` (pooled at the end-of-text
    token, then projected). With layer="penultimate" they do not: the tower is truncated, so they are
    the projection of the final-LayerNormed penultimate state pooled at that token, a feature open_clip
    never computes (use layer="last" for CLIP-score features). Pooling: open_clip takes the argmax id
    (= <|endoftext|>, the largest id), transformers with eos_token_id=49407 its first occurrence; the
    same for every tokenizer output.
    """
    tower = _text_tower(_open_clip_model(model_or_name, pretrained))
    config = clip_text_config(tower)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    if projection and tower.text_projection is None:
        raise ValueError("this open_clip text tower has no text projection; use projection=False")
    model = cls(config).eval()
    state = convert_text_state_dict(tower)
    if projection:
        state = {f"text_model.{k}": v for k, v in state.items() if k != "text_projection.weight"} | {
            "text_projection.weight": state["text_projection.weight"]}
    else:
        state.pop("text_projection.weight", None)
    model.load_state_dict(state, strict=True)
    apply_layer(model, layer)
    return model.requires_grad_(False), build_clip_tokenizer(config.max_position_embeddings)


def _open_clip_model(model_or_name, pretrained: str | None) -> nn.Module:
    import open_clip

    if isinstance(model_or_name, nn.Module):
        return model_or_name
    if isinstance(model_or_name, dict):
        model = build_open_clip(model_or_name)
        if pretrained:
            open_clip.load_checkpoint(model, pretrained)
        return model
    name = str(model_or_name)
    if Path(name).is_dir():
        name = f"local-dir:{name}"
    return open_clip.create_model(name, pretrained=pretrained, device="cpu")


def _text_tower(model: nn.Module) -> nn.Module:
    """The TextTransformer (CustomTextCLIP.text) or the CLIP model whose attributes form it."""
    tower = getattr(model, "text", model)
    if not hasattr(tower, "token_embedding"):
        raise ValueError(f"{type(tower).__name__} is not an open_clip transformer text tower (an HF text tower "
                         f"is already a transformers model; load it with transformers)")
    if getattr(tower, "cls_emb", None) is not None:
        raise ValueError("text towers with a class token (CoCa) have no CLIPTextModel equivalent")
    if getattr(tower, "attn_mask", None) is None:
        raise ValueError("this text tower is bidirectional (no causal mask); CLIPTextModel is always causal")
    pool = getattr(tower, "pool_type", getattr(tower, "text_pool_type", "argmax"))
    if pool not in ("argmax", "eos"):
        raise ValueError(f"text pool_type {pool!r} has no CLIPTextModel equivalent (argmax and eos do)")
    if pool == "eos" and getattr(tower, "eos_id", getattr(tower, "text_eos_id", EOS_ID)) != EOS_ID:
        raise ValueError("text pool_type 'eos' with an eos_id other than 49407 needs another tokenizer")
    if isinstance(tower.text_projection, nn.Linear) and tower.text_projection.bias is not None:
        raise ValueError("a text projection with a bias has no CLIPTextModelWithProjection equivalent")
    from open_clip.transformer import ResidualAttentionBlock

    block = tower.transformer.resblocks[0]
    if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
        raise ValueError(f"{type(block).__name__} blocks (qk-norm, scaled cosine attention, ...) have no "
                         f"CLIPTextModel equivalent")
    if tower.token_embedding.num_embeddings != VOCAB_SIZE:
        raise ValueError(f"text vocabulary of {tower.token_embedding.num_embeddings} tokens: only the CLIP BPE "
                         f"vocabulary ({VOCAB_SIZE}) has a CLIPTokenizer here")
    return tower


def _activation(module: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[module.approximate]
    raise ValueError(f"activation {type(module).__name__} has no CLIPTextModel equivalent")


def clip_text_config(tower: nn.Module) -> CLIPTextConfig:
    """CLIPTextConfig of an open_clip text tower: widths, activation, positions, norm eps, ids."""
    blocks = tower.transformer.resblocks
    width = tower.token_embedding.embedding_dim
    proj = tower.text_projection
    proj_dim = None if proj is None else (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
    return CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features, projection_dim=proj_dim or width,
        num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=tower.positional_embedding.shape[0], hidden_act=_activation(blocks[0].mlp.gelu),
        layer_norm_eps=tower.ln_final.eps, attention_dropout=0.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def convert_text_state_dict(tower: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip text weights under CLIPTextModel names; in_proj split into q/k/v, LayerScale folded."""
    out = {"embeddings.token_embedding.weight": tower.token_embedding.weight,
           "embeddings.position_embedding.weight": tower.positional_embedding,
           "final_layer_norm.weight": tower.ln_final.weight, "final_layer_norm.bias": tower.ln_final.bias}
    for i, block in enumerate(tower.transformer.resblocks):
        out |= _convert_block(block, f"encoder.layers.{i}.")
    proj = tower.text_projection
    if proj is not None:  # x @ P  ==  Linear(weight = P^T)
        out["text_projection.weight"] = proj.weight if isinstance(proj, nn.Linear) else proj.T
    return {k: v.detach().float().clone().contiguous() for k, v in out.items()}


def _convert_block(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """One residual block: x + g1 * attn(ln_1(x)), then x + g2 * mlp(ln_2(x)), g = LayerScale or 1."""
    from open_clip.transformer import LayerScale

    attn, mlp = block.attn, block.mlp
    g1, g2 = (ls.gamma if isinstance(ls, LayerScale) else None for ls in (block.ls_1, block.ls_2))
    q, k, v = attn.in_proj_weight.chunk(3)
    qb, kb, vb = attn.in_proj_bias.chunk(3)

    def scaled(weight, bias, gamma):  # gamma * (W x + b) == (gamma W) x + gamma b
        return (weight, bias) if gamma is None else (weight * gamma[:, None], bias * gamma)

    out_w, out_b = scaled(attn.out_proj.weight, attn.out_proj.bias, g1)
    fc2_w, fc2_b = scaled(mlp.c_proj.weight, mlp.c_proj.bias, g2)
    names = {
        "self_attn.q_proj.weight": q, "self_attn.q_proj.bias": qb, "self_attn.k_proj.weight": k,
        "self_attn.k_proj.bias": kb, "self_attn.v_proj.weight": v, "self_attn.v_proj.bias": vb,
        "self_attn.out_proj.weight": out_w, "self_attn.out_proj.bias": out_b,
        "layer_norm1.weight": block.ln_1.weight, "layer_norm1.bias": block.ln_1.bias,
        "layer_norm2.weight": block.ln_2.weight, "layer_norm2.bias": block.ln_2.bias,
        "mlp.fc1.weight": mlp.c_fc.weight, "mlp.fc1.bias": mlp.c_fc.bias,
        "mlp.fc2.weight": fc2_w, "mlp.fc2.bias": fc2_b,
    }
    return {prefix + k: v for k, v in names.items()}
