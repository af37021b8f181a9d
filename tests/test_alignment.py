"""Representation alignment (REPA): the loss is the paper's, the targets are the encoder's, on for N steps only."""

import json

import pytest
import torch

from ldm.config import AlignConfig, UNetStageConfig, load_config
from ldm.data.images import ImageCaptionDataset, collate
from ldm.losses.alignment import alignment_loss, to_patch_grid
from ldm.models import alignment as A
from ldm.models.unet import load_components
from train import unet as stage2


def _cfg(overrides, *extra):
    return load_config(UNetStageConfig, None, list(overrides) + list(extra))


def test_alignment_loss_equals_the_hand_computation():
    torch.manual_seed(0)
    h, y = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    expected = torch.tensor([-sum(float(h[b, n] @ y[b, n] / (h[b, n].norm() * y[b, n].norm())) for n in range(3)) / 3
                             for b in range(2)])
    assert torch.allclose(alignment_loss(h, y), expected, atol=1e-6)
    assert torch.allclose(alignment_loss(y, y), torch.full((2,), -1.0))  # aligned features: the minimum, −1
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_loss(h, y[:, :2])


def test_features_on_the_encoder_grid():
    f = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    same = to_patch_grid(f, (4, 4))
    assert same.shape == (2, 16, 3) and torch.equal(same[1, 5], f[1, :, 1, 1])  # token n = row·4 + col
    pooled = to_patch_grid(f, (2, 2))
    assert torch.allclose(pooled[0, 1], f[0, :, 0:2, 2:4].mean(dim=(1, 2)))  # area mean of the top-right block


def test_aligner_loss_on_a_tiny_unet_equals_the_hand_computation(unet_overrides, tiny_open_clip_dir):
    from ldm.data.images import flip_decision

    cfg = _cfg(unet_overrides, "align.weight=0.7", f"align.encoder={tiny_open_clip_dir}", "data.random_flip=true")
    parts = load_components(cfg)
    aligner, visual = A.build_aligner(cfg, parts.unet)
    dataset = ImageCaptionDataset(cfg.data)
    aligner.targets = A.compute_targets(visual, dataset)
    keys = [(5, 7), (0, 8), (11, 9)]
    flips = [flip_decision(seed) for _, seed in keys]
    assert any(flips) and not all(flips)  # mirrored and plain examples in one batch
    batch = collate([dataset[key] for key in keys])
    x = torch.randn(3, 4, 4, 4)
    text = torch.randn(3, 16, 32)
    seen = []
    handle = parts.unet.mid_block.register_forward_hook(lambda m, i, out: seen.append(out))
    with aligner.capture(parts.unet):
        parts.unet(x, torch.tensor([10, 500, 900]), encoder_hidden_states=text)
    handle.remove()
    got = aligner.loss(batch)

    f = seen[0]
    assert f.shape == (3, 32, 2, 2)  # the middle block of the [16, 32] U-Net on 4x4 latents: the 2x2 patch grid
    projected = aligner.projector(f.flatten(2).transpose(1, 2))
    pixels = torch.stack([dataset.load(i, 0, flip)["pixel_values"] for (i, _), flip in zip(keys, flips)])
    fresh = A.encode_patches(visual, pixels)
    cos = torch.nn.functional.cosine_similarity(projected, fresh, dim=-1)  # [3, 4]
    assert torch.allclose(got, 0.7 * -cos.mean(), atol=1e-3)  # targets are stored in float16
    assert aligner.features is None  # consumed: a stale capture is never reused
    assert aligner.pop_log() == {"align_loss": pytest.approx(got.item())} and aligner.pop_log() == {}


def test_coarser_grid_pools_the_finer_side():
    from ldm.losses.alignment import common_grid, tokens_to_grid

    features, tokens = torch.randn(2, 3, 2, 2), torch.randn(2, 16, 5)  # U-Net 2x2, encoder 4x4
    assert common_grid(features, (4, 4)) == (2, 2)
    pooled = tokens_to_grid(tokens, (4, 4), (2, 2))
    assert torch.allclose(pooled[1, 0], tokens[1, [0, 1, 4, 5]].mean(0), atol=1e-6)  # the top-left 2x2 patches


def test_cached_targets_equal_fresh_ones_and_a_new_fingerprint_recomputes(shapes16, tiny_open_clip_dir, tmp_path):
    from ldm.config import DataConfig

    dataset = ImageCaptionDataset(DataConfig(path=str(shapes16), resolution=16, random_flip=True))
    visual = A.load_image_encoder(AlignConfig(weight=1.0, encoder=str(tiny_open_clip_dir)), None, None)
    fresh = A.compute_targets(visual, dataset)
    assert set(fresh) == {"plain", "flip"} and fresh["plain"].shape == (48, 4, 32)
    mirrored = torch.stack([dataset.load(i, 0, True)["pixel_values"] for i in range(3)])
    assert torch.equal(fresh["flip"][:3], A.encode_patches(visual, mirrored).half())
    path = tmp_path / A.TARGETS_FILE
    written = A.load_or_compute_targets(visual, dataset, path, {"k": 1})
    stamp = path.stat().st_mtime_ns
    read = A.load_or_compute_targets(visual, dataset, path, {"k": 1})
    assert path.stat().st_mtime_ns == stamp  # read back, not recomputed
    assert all(torch.equal(fresh[k], written[k]) and torch.equal(fresh[k], read[k]) for k in fresh)
    A.load_or_compute_targets(visual, dataset, path, {"k": 2})
    assert path.stat().st_mtime_ns != stamp


def test_alignment_is_in_the_loss_for_the_first_steps_only(unet_overrides, tiny_open_clip_dir, tmp_path,
                                                           monkeypatch):
    calls = []
    original = A.Aligner.loss

    def spy(self, batch, projector=None):
        calls.append(len(batch["index"]))
        return original(self, batch, projector)

    monkeypatch.setattr(A.Aligner, "loss", spy)
    logged, pop_log = [], A.Aligner.pop_log
    monkeypatch.setattr(A.Aligner, "pop_log", lambda self: logged.append(pop_log(self)) or logged[-1])
    final = stage2.main(_cfg(unet_overrides, "align.weight=0.5", "align.steps=3", "train.grad_accum_steps=2",
                             "train.checkpoint_every=3", f"align.encoder={tiny_open_clip_dir}"))
    assert calls == [4] * 6  # 3 steps x 2 micro-batches of 4, then never again (4 steps in all)
    assert [("align_loss" in row) for row in logged] == [True, True, True, False]  # logged at every step
    from ldm.checkpoint import load_state_dict

    at3, at4 = (load_state_dict(tmp_path / "unet" / f"checkpoint-{k}" / "model-align.safetensors") for k in (3, 4))
    assert all(torch.equal(at3[k], at4[k]) for k in at3)  # no gradient after step 3: the projector stays put
    unet3, unet4 = (load_state_dict(tmp_path / "unet" / f"checkpoint-{k}" / "model-unet.safetensors") for k in (3, 4))
    assert any(not torch.equal(unet3[k], unet4[k]) for k in unet3)  # while the U-Net trains on
    assert not any("align" in p.name for p in final.rglob("*"))  # and never ships
    assert json.loads((final / "training.json").read_text())["config"]["align"]["steps"] == 3


def test_alignment_needs_an_encoder_and_an_image_folder(unet_overrides):
    with pytest.raises(FileNotFoundError, match="align.encoder"):
        stage2.main(_cfg(unet_overrides, "align.weight=0.5"))  # the tiny text encoder has no open_clip/ beside it
    with pytest.raises(ValueError, match="align.weight"):
        _cfg(unet_overrides, "align.weight=0.5", "data.streaming=true")
    with pytest.raises(ValueError, match="align.steps"):
        _cfg(unet_overrides, "align.steps=0")
    with pytest.raises(ValueError, match="random features"):
        _cfg(unet_overrides, "align.weight=0.5", "align.encoder=ViT-B-32")  # no local weights
    with pytest.raises(ValueError, match="data.crop=random"):
        _cfg(unet_overrides, "align.weight=0.5", "data.crop=random")
