"""Stage 2: the trainer writes a complete pipeline; the cache changes speed, not results."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm.config import UNetStageConfig, load_config
from ldm.data.cache import CachedLatentDataset, build_cache, collate_cached, fingerprint, is_current, module_hash
from ldm.data.images import ImageCaptionDataset, collate
from ldm.models.text import encode_prompts
from ldm.models.unet import load_components
from ldm.models.vae import posterior_moments
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from train import unet as stage2


def _cfg(overrides, *extra):
    return load_config(UNetStageConfig, None, list(overrides) + list(extra))


@pytest.mark.parametrize("pooled", [False, True])
def test_stage2_writes_a_complete_pipeline_that_stock_diffusers_loads(unet_overrides, tmp_path, pooled):
    cfg = _cfg(unet_overrides, "validation.every=4", f"model.pooled_text={str(pooled).lower()}")
    final = stage2.main(cfg)
    names = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    assert {"model_index.json", "pipeline_latent_diffusion.py", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "scheduler/scheduler_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert (tmp_path / "unet" / "samples" / "step-4.png").exists()

    pipe = LatentDiffusionPipeline.from_pretrained(final)
    from ldm.checkpoint import load_state_dict
    ema = load_state_dict(tmp_path / "unet" / "checkpoint-4" / "ema-unet.safetensors")
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in ema.items())  # the EMA weights are what ships
    stock = StableDiffusionPipeline.from_pretrained(final, requires_safety_checker=False)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    a = pipe("a small red circle", generator=torch.Generator().manual_seed(1), **kwargs).images
    b = stock("a small red circle", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (1, 16, 16, 3) and abs(a - b).max() <= 1e-4
    assert (stock.unet.config.addition_embed_type == "text") == pooled
    if pooled:  # the pooled text path is live: without it the same call gives other images
        pipe.unet.add_embedding.proj.weight.data.zero_()
        c = pipe("a small red circle", generator=torch.Generator().manual_seed(1), **kwargs).images
        assert abs(a - c).max() > 1e-3


def _cache_setup(unet_overrides, tmp_path, *extra):
    cfg = _cfg(unet_overrides, *extra)
    parts = load_components(cfg)
    dataset = ImageCaptionDataset(cfg.data)
    fp = fingerprint(dataset, module_hash(parts.vae), module_hash(parts.text_encoder), torch.float32)
    folder = build_cache(tmp_path / "cache", dataset, fp, lambda x: posterior_moments(parts.vae, x),
                         lambda t: encode_prompts(parts.text_encoder, parts.tokenizer, t))
    return cfg, parts, dataset, folder, fp


def test_cached_and_fresh_latents_give_the_same_losses(unet_overrides, tmp_path):
    cfg, parts, dataset, folder, _ = _cache_setup(unet_overrides, tmp_path, "data.random_flip=true",
                                                  "diffusion.offset_noise=0.1", "diffusion.caption_dropout=0.3")
    cached = CachedLatentDataset(folder, dataset)
    empty = encode_prompts(parts.text_encoder, parts.tokenizer, [""])[0]
    args = (parts.vae, parts.text_encoder, parts.tokenizer, empty, parts.scheduler.alphas_cumprod, cfg.diffusion,
            parts.scheduler.config)
    for step in range(6):
        keys = [((7 * step + i) % len(dataset), 1000 * step + i) for i in range(8)]  # flips both ways
        fresh = stage2.training_loss(parts.unet, collate([dataset[k] for k in keys]), *args)
        from_cache = stage2.training_loss(parts.unet, collate_cached([cached[k] for k in keys]), *args)
        assert torch.allclose(fresh, from_cache, rtol=1e-5, atol=1e-6), step


def logged(output_dir, tag="loss"):
    """The scalars a run logged to TensorBoard, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((output_dir / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values |= {e.step: e.value for e in acc.Scalars(tag)}
    return [values[k] for k in sorted(values)]


def test_cached_and_uncached_runs_log_the_same_losses(unet_overrides, tmp_path):
    a = stage2.main(_cfg(unet_overrides, f"output_dir={tmp_path / 'a'}", "cache.enabled=true"))
    b = stage2.main(_cfg(unet_overrides, f"output_dir={tmp_path / 'b'}", "cache.enabled=false"))
    assert (tmp_path / "a" / "cache" / "manifest.json").exists() and not (tmp_path / "b" / "cache").exists()
    la, lb = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5)
    wa = LatentDiffusionPipeline.from_pretrained(a).unet.state_dict()
    wb = LatentDiffusionPipeline.from_pretrained(b).unet.state_dict()
    # Adam normalises each gradient: where a gradient is ~0, float noise from the encoder's batching (which
    # depends on the thread count) can move one weight by a fraction of a step (lr 1e-3 here). Bounded per
    # weight by one step, and by 1% of a step on average over all weights.
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diffs.max() < 1e-3 and diffs.mean() < 1e-5


def test_cache_fingerprint_invalidation(unet_overrides, tmp_path, caplog):
    cfg, parts, dataset, folder, fp = _cache_setup(unet_overrides, tmp_path)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert is_current(folder, fp)
    vae_hash, text_hash = module_hash(parts.vae), module_hash(parts.text_encoder)
    assert fingerprint(dataset, vae_hash, text_hash, torch.float32) == fp  # nothing changed: reused
    with torch.no_grad():
        parts.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert module_hash(parts.vae) != vae_hash
    changed = [fingerprint(dataset, module_hash(parts.vae), text_hash, torch.float32),
               fingerprint(dataset, vae_hash, text_hash, torch.bfloat16),
               fingerprint(ImageCaptionDataset(_cfg(unet_overrides, "data.random_flip=true").data), vae_hash,
                           text_hash, torch.float32),
               fingerprint(ImageCaptionDataset(_cfg(unet_overrides, "data.max_samples=40").data), vae_hash,
                           text_hash, torch.float32)]
    for other in changed:
        assert other != fp and not is_current(folder, other)
    caplog.set_level("INFO")
    build_cache(folder, dataset, changed[0], lambda x: posterior_moments(parts.vae, x),
                lambda t: encode_prompts(parts.text_encoder, parts.tokenizer, t))
    assert "rebuilding" in caplog.text and (folder / "manifest.json").stat().st_mtime_ns != stamp
    assert json.loads((folder / "manifest.json").read_text())["fingerprint"] == changed[0]
    with pytest.raises(ValueError, match="data.crop=random cannot use the latent cache"):
        fingerprint(ImageCaptionDataset(_cfg(unet_overrides, "data.crop=random").data), vae_hash, text_hash,
                    torch.float32)


def test_non_finite_latents_are_refused(unet_overrides, tmp_path):
    cfg = _cfg(unet_overrides)
    dataset = ImageCaptionDataset(cfg.data)

    def broken(pixels):
        mean = torch.zeros(pixels.shape[0], 4, 4, 4)
        mean[1] = float("nan")
        return mean, torch.zeros_like(mean)

    with pytest.raises(ValueError, match=r"non-finite latents .*00001\.png"):
        build_cache(tmp_path / "c", dataset, {"x": 1}, broken, lambda t: torch.zeros(len(t), 3, 2))
    assert not (tmp_path / "c").exists()


def test_caption_dropout_rate(unet_overrides):
    cfg = _cfg(unet_overrides, "diffusion.caption_dropout=0.25")
    parts = load_components(cfg)
    dataset = ImageCaptionDataset(cfg.data)
    empty = encode_prompts(parts.text_encoder, parts.tokenizer, [""])[0]
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            seen.extend((encoder_hidden_states == empty).flatten(1).all(1).tolist())
            return type("Out", (), {"sample": torch.zeros_like(x, requires_grad=True)})()

    args = (parts.vae, parts.text_encoder, parts.tokenizer, empty, parts.scheduler.alphas_cumprod, cfg.diffusion,
            parts.scheduler.config)
    for start in range(0, 800, 40):
        stage2.training_loss(Spy(), collate([dataset[(i % len(dataset), start + i)] for i in range(40)]), *args)
    rate, sigma = sum(seen) / len(seen), (0.25 * 0.75 / len(seen)) ** 0.5
    assert abs(rate - 0.25) < 4 * sigma, rate


@pytest.mark.parametrize("extra", [
    ["model.learned_variance=true"],
    ["diffusion.prediction_type=v_prediction", "diffusion.zero_terminal_snr=true", "diffusion.offset_noise=0.05"],
    ["diffusion.prediction_type=sample", "diffusion.beta_schedule=squaredcos_cap_v2", "diffusion.min_snr_gamma=null",
     "train.grad_accum_steps=2"],
])
def test_stage2_variants_train_and_sample(unet_overrides, extra):
    final = stage2.main(_cfg(unet_overrides, "train.max_steps=2", "train.mixed_precision=bf16", *extra))
    pipe = LatentDiffusionPipeline.from_pretrained(final)
    if "model.learned_variance=true" in extra:
        from diffusers import DDPMScheduler
        assert pipe.unet.config.out_channels == 8 and pipe.scheduler.config.variance_type == "learned_range"
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = pipe("a large blue square", num_inference_steps=3, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_training_latents_subtract_the_vae_shift_factor(unet_overrides):
    """z = (μ + σ·ε − shift) · s: a VAE with shift_factor c on moments μ trains like one without on μ − c."""
    cfg = _cfg(unet_overrides)
    parts = load_components(cfg)
    dataset = ImageCaptionDataset(cfg.data)
    empty = encode_prompts(parts.text_encoder, parts.tokenizer, [""])[0]
    keys = [(i, i) for i in range(4)]
    batch = collate([dataset[k] for k in keys])
    mean, logvar = posterior_moments(parts.vae, batch["pixel_values"])
    text = encode_prompts(parts.text_encoder, parts.tokenizer, batch["caption"])
    cached = {"mean": mean, "logvar": logvar, "text": text, "seed": batch["seed"]}
    args = (parts.text_encoder, parts.tokenizer, empty, parts.scheduler.alphas_cumprod, cfg.diffusion,
            parts.scheduler.config)

    def loss(shift, moments_offset):
        parts.vae.register_to_config(shift_factor=shift)
        return stage2.training_loss(parts.unet, cached | {"mean": mean - moments_offset}, parts.vae, *args)

    with torch.no_grad():
        unshifted, shifted, moved = loss(None, 0.0), loss(0.7, 0.0), loss(None, 0.7)
    assert torch.allclose(shifted, moved, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shifted, unshifted, rtol=1e-3)  # the shift is not ignored
