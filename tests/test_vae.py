"""Stage 1 end to end on tiny models: training, the discriminator schedule, EMA, resume, the saved
folder, scaling-factor calibration and evaluation. Offline, CPU, deterministic."""

import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from ldm.config import DataConfig, VAEModelConfig, VAEStageConfig, load_config
from ldm.data.shapes import write_shapes_dataset
from ldm.evaluation.vae import evaluate_vae
from ldm.models.discriminator import PatchDiscriminator
from ldm.models.vae import build_vae, calibrate_scaling_factor, load_training_logvar

TINY = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.layers_per_block=1",
        "model.mid_block_attention=false", "loss.disc_channels=8", "loss.disc_layers=1",
        "data.resolution=16", "train.batch_size=4", "train.learning_rate=1e-3", "train.log_every=1",
        "train.image_every=2", "train.ema_decay=0.9", "calibration_samples=32"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), num=32, size=16, seed=0)


def run(out, data, *overrides):
    from train.vae import main

    AcceleratorState._reset_state(True)  # a fresh Accelerator per run inside one process
    cfg = load_config(VAEStageConfig, None, TINY + [f"data.path={data}", f"output_dir={out}", *overrides])
    return cfg, main(cfg)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """4 steps, checkpoints at 2 and 4; the discriminator switches on at step 2."""
    out = tmp_path_factory.mktemp("vae") / "run"
    cfg, final = run(out, shapes, "train.max_steps=4", "train.checkpoint_every=2", "loss.disc_start=2",
                     "train.checkpoints_total_limit=null")
    return cfg, out, final


def _initial_discriminator(cfg):
    """The discriminator as train.vae builds it: seeded, after the VAE."""
    torch.manual_seed(cfg.train.seed)
    build_vae(cfg.model, cfg.data.resolution)
    return PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers).state_dict()


def _close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def test_run_writes_checkpoints_grids_and_final_folder(trained):
    cfg, out, final = trained
    assert final == out / "final"
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    assert (out / "samples" / "step-2.png").is_file() and (out / "samples" / "step-4.png").is_file()
    assert any((out / "logs").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                       "training_logvar.json"]
    assert load_training_logvar(final)["reconstruction"] == "l1"


def test_discriminator_steps_only_after_disc_start(trained):
    cfg, out, _ = trained
    init = _initial_discriminator(cfg)
    before = load_file(out / "checkpoint-2" / "model-discriminator.safetensors")
    after = load_file(out / "checkpoint-4" / "model-discriminator.safetensors")
    assert _close(before, init, atol=0)  # steps 0, 1: untouched
    assert not _close(after, init, atol=1e-7)  # steps 2, 3: trained
    assert len(load_file(out / "checkpoint-2" / "optim-discriminator.safetensors")) == 0  # never stepped
    ae_before = load_file(out / "checkpoint-2" / "model-autoencoder.safetensors")
    ae_after = load_file(out / "checkpoint-4" / "model-autoencoder.safetensors")
    assert not _close(ae_before, ae_after, atol=1e-7)


def test_saved_vae_is_the_ema_and_round_trips(trained, shapes):
    cfg, out, final = trained
    ema = load_file(out / "checkpoint-4" / "ema-autoencoder.safetensors")
    live = load_file(out / "checkpoint-4" / "model-autoencoder.safetensors")
    saved = load_file(final / "diffusion_pytorch_model.safetensors")
    ema_vae = {k.removeprefix("vae."): v for k, v in ema.items() if k.startswith("vae.")}
    live_vae = {k.removeprefix("vae."): v for k, v in live.items() if k.startswith("vae.")}
    assert _close(saved, ema_vae, atol=0) and not _close(saved, live_vae, atol=1e-7)
    assert load_training_logvar(final)["logvar"] == pytest.approx(ema["logvar"].item())

    loaded = AutoencoderKL.from_pretrained(final).eval()
    assert 0 < loaded.config.scaling_factor != 1.0 and loaded.config.shift_factor is None
    assert loaded.config.sample_size == 16 and loaded.config.latent_channels == 4
    rebuilt = build_vae(cfg.model, cfg.data.resolution).eval()
    rebuilt.load_state_dict(ema_vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, rebuilt(x).sample, rtol=0, atol=0)


def test_resume_continues_exactly(trained, shapes, tmp_path):
    cfg, out, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "final")
    run(resumed, shapes, "train.max_steps=4", "train.checkpoint_every=2", "loss.disc_start=2",
        "train.checkpoints_total_limit=null")  # continues from checkpoint-2
    for name in ("model-autoencoder", "model-discriminator", "ema-autoencoder", "optim-autoencoder",
                 "optim-discriminator"):
        a = load_file(out / "checkpoint-4" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoint-4" / f"{name}.safetensors")
        assert _close(a, b), name
    trainer = [(d / "checkpoint-4" / "trainer.json").read_text() for d in (out, resumed)]
    assert trainer[0] == trainer[1]  # same step, data position and digest of the examples seen
    assert _close(load_file(out / "final" / "diffusion_pytorch_model.safetensors"),
                  load_file(resumed / "final" / "diffusion_pytorch_model.safetensors"))


def test_scaling_factor_gives_unit_latents(shapes):
    torch.manual_seed(0)
    vae = build_vae(VAEModelConfig(block_out_channels=(8, 16), norm_num_groups=8, mid_block_attention=False), 16)
    from ldm.data.images import ImageCaptionDataset

    data = ImageCaptionDataset(DataConfig(path=str(shapes), resolution=16), need_captions=False)
    x = torch.stack([data[(i, 0)]["pixel_values"] for i in range(len(data))])
    scale = calibrate_scaling_factor(vae, x.split(8))
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([posterior.sample(gen) for _ in range(20)])  # many posterior draws of the same data
    assert (scale * z).std().item() == pytest.approx(1.0, abs=0.01)


def test_evaluate_vae_numbers_are_sane(trained, shapes):
    _, _, final = trained
    data = DataConfig(path=str(shapes))
    metrics = evaluate_vae(str(final), data, num=32, batch_size=16, seed=0)
    assert metrics["num_images"] == 32 and metrics["resolution"] == 16 and metrics["latent_shape"] == [4, 8, 8]
    assert 0 < metrics["psnr"] < 60 and 0 < metrics["ssim"] < 1
    assert metrics["kl_per_dim"] > 0
    assert metrics["nelbo_per_dim"] == pytest.approx(metrics["nll_per_dim"] + metrics["kl_per_dim"])
    # calibrated on these very images: scaled posterior samples have unit spread
    assert metrics["latent_std"] == pytest.approx(1.0, abs=0.1)
    again = evaluate_vae(str(final), data, num=32, batch_size=8, seed=0)
    assert again["psnr"] == pytest.approx(metrics["psnr"], rel=1e-6)  # deterministic (posterior mode)


def test_gradient_accumulation_matches_a_larger_batch(shapes, tmp_path):
    """2 x 2 accumulated examples = one batch of 4: the same examples, draws and gradient."""
    common = ("train.max_steps=2", "train.checkpoint_every=2", "train.ema_decay=null", "calibration_samples=4")
    run(tmp_path / "big", shapes, "train.batch_size=4", *common)
    run(tmp_path / "acc", shapes, "train.batch_size=2", "train.grad_accum_steps=2", *common)
    a = load_file(tmp_path / "big" / "checkpoint-2" / "model-autoencoder.safetensors")
    b = load_file(tmp_path / "acc" / "checkpoint-2" / "model-autoencoder.safetensors")
    assert _close(a, b, atol=1e-5)


def test_bf16_mixed_precision_trains(shapes, tmp_path):
    _, final = run(tmp_path / "bf16", shapes, "train.mixed_precision=bf16", "train.max_steps=2",
                   "loss.disc_start=1", "train.checkpoint_every=2", "calibration_samples=8")
    assert torch.isfinite(next(AutoencoderKL.from_pretrained(final).parameters())).all()


def test_normalize_latents_subtracts_the_shift_and_the_pipeline_inverts_it():
    """ẑ = (z − shift) · s for a VAE config with a shift_factor (SD3/Flux style); None or absent → no shift."""
    from ldm.models.vae import normalize_latents
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    torch.manual_seed(0)
    blocks = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)
    shifted = AutoencoderKL(**blocks, scaling_factor=0.5, shift_factor=0.25).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(normalize_latents(z, shifted.config), (z - 0.25) * 0.5)
    plain = AutoencoderKL(**blocks, scaling_factor=0.5, shift_factor=None)
    assert torch.equal(normalize_latents(z, plain.config), z * 0.5)

    class OldConfig:  # a config written before diffusers had the key
        scaling_factor = 0.5
    assert torch.equal(normalize_latents(z, OldConfig()), z * 0.5)

    # decode_latents(ẑ) = D(ẑ / s + shift) = D(z): encode side and decode side agree
    pipe = LatentDiffusionPipeline.__new__(LatentDiffusionPipeline)
    object.__setattr__(pipe, "vae", shifted)  # only decode_latents is exercised
    with torch.no_grad():
        expected = shifted.decode(z).sample
        assert torch.allclose(pipe.decode_latents(normalize_latents(z, shifted.config)), expected, atol=1e-5)
