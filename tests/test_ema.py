"""Power-function EMA and post-hoc EMA (EDM2): hand computations, reconstruction, resume, ``ldm ema``."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm import cli
from ldm.config import UNetStageConfig, load_config
from ldm.ema import (PowerEMA, gamma_to_sigma_rel, list_snapshots, posthoc_coefficients, power_ema_beta,
                     profile_dot, reconstruct, sigma_rel_to_gamma, sweep_sigma_rel)
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from train import unet as stage2


def test_beta_and_sigma_rel_match_hand_computations():
    # γ = 7: σ_rel = √(8 / (81·10)); β_4 = (3/4)^8 = 6561/65536; β_1 = 0 (the first average is θ_1)
    assert gamma_to_sigma_rel(7.0) == pytest.approx(math.sqrt(8 / 810), rel=1e-12)
    assert sigma_rel_to_gamma(math.sqrt(8 / 810)) == pytest.approx(7.0, rel=1e-10)
    assert power_ema_beta(4, 7.0) == pytest.approx(6561 / 65536, rel=1e-12)
    assert power_ema_beta(1, 7.0) == 0.0
    # the two lengths EDM2 tracks (§3.1): σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for sigma_rel in (0.01, 0.15, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-10)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(0.3)


def test_power_ema_update_weighs_each_iterate_as_the_profile_does():
    # θ_1..θ_3 = 1, 3, 5 with γ = 7: θ_τ has weight (τ^8 − (τ−1)^8) / 3^8, i.e. (1 + 255·3 + 6305·5) / 6561
    param = torch.nn.Parameter(torch.tensor([1.0]))
    model = torch.nn.Module()
    model.p = param
    ema = PowerEMA(model, (gamma_to_sigma_rel(7.0),), folder="unused")
    for t, value in enumerate([1.0, 3.0, 5.0], start=1):
        with torch.no_grad():
            param.fill_(value)
        ema.update(model, t)
    assert ema.shadows[0][0].item() == pytest.approx(32291 / 6561, rel=1e-6)


def test_profile_inner_product_matches_numerical_integration():
    tau = np.linspace(0, 300, 3_000_001)[1:]
    for (t_a, g_a, t_b, g_b) in [(300, 6.94, 200, 16.97), (120, 2.0, 120, 5.0), (50, 16.97, 300, 0.5)]:
        p_a = np.where(tau <= t_a, (g_a + 1) * tau ** g_a / t_a ** (g_a + 1), 0)
        p_b = np.where(tau <= t_b, (g_b + 1) * tau ** g_b / t_b ** (g_b + 1), 0)
        numeric = np.sum(p_a * p_b) * (tau[1] - tau[0])
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(profile_dot(t_b, g_b, t_a, g_a), rel=1e-12)


def _toy_training(folders_and_sigmas, steps=400, every=4):
    """Noisy SGD on ½‖θ − θ*‖² (64 weights) with power-function EMAs tracked; snapshots every ``every`` steps."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(8, 8, bias=False)
    target = torch.randn(8, 8, generator=g)
    with torch.no_grad():
        model.weight.copy_(torch.randn(8, 8, generator=g) * 3)
    emas = [PowerEMA(model, sigmas, folder) for folder, sigmas in folders_and_sigmas]
    for t in range(1, steps + 1):
        with torch.no_grad():
            grad = (model.weight - target) + 2.0 * torch.randn(8, 8, generator=g)
            model.weight -= 0.05 * grad
        for ema in emas:
            ema.update(model, t)
            if t % every == 0:
                ema.save_snapshots(t)
    return emas


def test_reconstruction_matches_an_ema_tracked_with_that_sigma_rel(tmp_path):
    tracked, direct = _toy_training([(tmp_path / "tracked", (0.05, 0.10)), (tmp_path / "direct", (0.07,))])
    for step in (200, 400):
        (rebuilt,), t, fit_error = reconstruct(tmp_path / "tracked", [0.07], step=step)
        truth = load_file(str(tmp_path / "direct" / f"step-{step:09d}-sigma-0.0700.safetensors"))["weight"]
        relative = ((rebuilt["weight"] - truth).norm() / truth.norm()).item()
        assert t == step and relative < 1e-3, (step, relative)
        assert fit_error[0] < 1e-2
        # the test can fail: each tracked average alone is far from the σ_rel = 0.07 one
        for sigma_rel in (0.05, 0.10):
            other = load_file(str(tmp_path / "tracked" / f"step-{step:09d}-sigma-{sigma_rel:.4f}.safetensors"))
            assert ((other["weight"] - truth).norm() / truth.norm()).item() > 2e-2
    # a tracked σ_rel is rebuilt as its own last snapshot
    (same,), _, _ = reconstruct(tmp_path / "tracked", [0.10])
    assert torch.allclose(same["weight"], tracked.shadows[1][0], rtol=1e-5, atol=1e-6)
    assert len(list_snapshots(tmp_path / "tracked")) == 200


def test_coefficients_sum_to_one_and_reproduce_an_input_profile():
    x, error = posthoc_coefficients([100, 100, 200, 200], [16.97, 6.94, 16.97, 6.94], 200, [6.94, 10.0])
    assert x.shape == (4, 2) and np.allclose(x.sum(axis=0), 1.0)
    assert np.allclose(x[:, 0], [0, 0, 0, 1], atol=1e-6) and error[0] < 1e-6 and 0 < error[1] < 0.1


def _posthoc_overrides(unet_overrides, shapes16):
    return list(unet_overrides) + ["ema.posthoc_sigma_rels=[0.05,0.1]", "ema.snapshot_every=1",
                                   f"validation.data={shapes16}", "validation.loss_samples=8",
                                   "validation.loss_timesteps=4", "validation.every=2"]


def test_resume_keeps_snapshots_and_validation_losses_exact(unet_overrides, shapes16, tmp_path):
    base = _posthoc_overrides(unet_overrides, shapes16)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stage2.main(load_config(UNetStageConfig, None, base + [f"output_dir={straight}"]))
    stage2.main(load_config(UNetStageConfig, None, base + [f"output_dir={resumed}", "train.max_steps=2"]))
    # a killed run may have left a snapshot beyond its last checkpoint: the resumed run must replace it
    bogus = resumed / "ema-snapshots" / "step-000000003-sigma-0.0500.safetensors"
    save_file({"junk": torch.zeros(1)}, str(bogus), metadata={"step": "3", "gamma": "1.0", "sigma_rel": "0.05"})
    stage2.main(load_config(UNetStageConfig, None, base + [f"output_dir={resumed}"]))

    a, b = list_snapshots(straight / "ema-snapshots"), list_snapshots(resumed / "ema-snapshots")
    assert [(s.step, s.sigma_rel) for s in a] == [(s.step, s.sigma_rel) for s in b]
    assert [s.step for s in a] == [1, 1, 2, 2, 3, 3, 4, 4]
    for sa, sb in zip(a, b):
        wa, wb = load_file(str(sa.path)), load_file(str(sb.path))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sa.path.name
    pa = load_file(str(straight / "checkpoint-4" / "ema-unet-phema.safetensors"))
    pb = load_file(str(resumed / "checkpoint-4" / "ema-unet-phema.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # the validation-loss history (checkpointed in trainer.json) and its values are the same after a resume
    la = json.loads((straight / "final" / "training.json").read_text())["stages"][-1]["val_loss"]
    lb = json.loads((resumed / "final" / "training.json").read_text())["stages"][-1]["val_loss"]
    assert [r["step"] for r in la] == [2, 4] and la == lb
    assert all(r["val_loss"] != r["val_loss_raw"] for r in la)  # EMA and raw weights are both evaluated


def test_resuming_without_the_tracked_emas_is_refused(unet_overrides, tmp_path):
    stage2.main(load_config(UNetStageConfig, None, list(unet_overrides) + ["train.max_steps=2"]))
    later = load_config(UNetStageConfig, None, list(unet_overrides) + ["ema.posthoc_sigma_rels=[0.05,0.1]"])
    with pytest.raises(FileNotFoundError, match="has no ema-unet-phema.safetensors"):
        stage2.main(later)


def test_ldm_ema_writes_a_loadable_pipeline_and_sweeps_validation_loss(unet_overrides, shapes16, tmp_path, capsys):
    out = tmp_path / "unet"
    final = stage2.main(load_config(UNetStageConfig, None, _posthoc_overrides(unet_overrides, shapes16)))
    cli.main(["ema", "--model", str(out), "--sigma-rel", "0.07"])
    folder = out / "posthoc-ema-0.070"
    assert capsys.readouterr().out.strip().endswith(str(folder))
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    (expected,), step, _ = reconstruct(out / "ema-snapshots", [0.07])
    weights = pipe.unet.state_dict()
    assert step == 4 and all(torch.equal(weights[k], v) for k, v in expected.items())
    shipped = LatentDiffusionPipeline.from_pretrained(final).unet.state_dict()
    assert any(not torch.equal(weights[k], shipped[k]) for k in expected)  # not the classic EMA
    assert json.loads((folder / "training.json").read_text())["posthoc_ema"]["sigma_rel"] == 0.07
    images = pipe("a small red circle", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    # issue 22: a rerun replaces only its own folder; someone's folder at --out is refused and left as it was
    cli.main(["ema", "--model", str(out), "--sigma-rel", "0.07"])
    assert json.loads((folder / "training.json").read_text())["posthoc_ema"]["sigma_rel"] == 0.07
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ema", "--model", str(out), "--sigma-rel", "0.07", "--out", str(mine)])
    assert exit_info.value.code == 2 and "did not write (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"

    rows = sweep_sigma_rel(out, [0.05, 0.07])
    assert [r["sigma_rel"] for r in rows] == [None, 0.05, 0.07]
    logged = json.loads((final / "training.json").read_text())["stages"][-1]["val_loss"][-1]
    assert rows[0]["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6)  # final = the step-4 EMA weights
    assert len({r["val_loss"] for r in rows}) == 3 and all(math.isfinite(r["val_loss"]) for r in rows)
