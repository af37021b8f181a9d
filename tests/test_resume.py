"""Production training: exact resume after SIGKILL, 2-process data parallel, non-finite steps.

The subprocess runs use the same entry points as users (`python -m train.<stage>` and torchrun).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import list_checkpoints, load_json, load_state_dict
from ldm.config import UNetStageConfig, load_config
from ldm.training import NonFiniteTrainingError
from train import unet as stage2

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _command(stage, overrides):
    args = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", f"train.{stage}", "--config", str(REPO / "configs" / stage / "shapes.yaml"), *args]


def _run(stage, overrides, env=ENV):
    done = subprocess.run(_command(stage, overrides), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_and_kill_after_checkpoint(stage, overrides, output_dir: Path, step: int):
    """Start a run, SIGKILL it as soon as checkpoint-<step> is complete; return the checkpoints left."""
    proc = subprocess.Popen(_command(stage, overrides), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(p.name == f"checkpoint-{step}" for p in list_checkpoints(output_dir)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (output_dir / "final").exists()  # it really died mid-run
    return list_checkpoints(output_dir)


def _assert_same_checkpoint(a: Path, b: Path, names):
    for name in names:
        sa, sb = load_state_dict(a / name), load_state_dict(b / name)
        assert sa.keys() == sb.keys()
        worst = max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)
        assert worst <= 1e-6, (name, worst)
    ta, tb = load_json(a / "trainer.json"), load_json(b / "trainer.json")
    assert ta["data_digest"] == tb["data_digest"] and ta["batches"] == tb["batches"]  # same samples, same order


def test_unet_resume_after_sigkill_is_exact(unet_overrides, tiny_open_clip_dir, tmp_path):
    base = [o for o in unet_overrides if not o.startswith(("output_dir", "train.max_steps", "train.checkpoint"))]
    base += ["train.max_steps=24", "train.checkpoint_every=4", "train.grad_accum_steps=2",
             "diffusion.offset_noise=0.1", "model.pooled_text=true",  # and alignment, off after step 12:
             "align.weight=0.5", "align.steps=12", f"align.encoder={tiny_open_clip_dir}"]
    _run("unet", base + [f"output_dir={tmp_path / 'straight'}"])
    left = _run_and_kill_after_checkpoint("unet", base + [f"output_dir={tmp_path / 'killed'}"],
                                          tmp_path / "killed", step=8)
    assert left and left[-1].name != "checkpoint-24"
    _run("unet", base + [f"output_dir={tmp_path / 'killed'}"])  # continues from the latest checkpoint
    _assert_same_checkpoint(tmp_path / "straight" / "checkpoint-24", tmp_path / "killed" / "checkpoint-24",
                            ["model-unet.safetensors", "ema-unet.safetensors", "optim-unet.safetensors",
                             "model-align.safetensors"])


def test_vae_resume_after_sigkill_with_discriminator_and_accumulation(shapes16, tmp_path):
    base = [f"data.path={shapes16}", "data.resolution=16", "model.block_out_channels=[8,16]",
            "model.norm_num_groups=4", "loss.disc_start=3", "loss.disc_channels=8", "train.batch_size=4",
            "train.grad_accum_steps=2", "train.max_steps=16", "train.checkpoint_every=4", "train.log_every=1",
            "train.image_every=1000", "calibration_samples=8", "train.lr_warmup_steps=0",
            "train.checkpoints_total_limit=null"]
    _run("vae", base + [f"output_dir={tmp_path / 'straight'}"])
    _run_and_kill_after_checkpoint("vae", base + [f"output_dir={tmp_path / 'killed'}"], tmp_path / "killed", step=8)
    _run("vae", base + [f"output_dir={tmp_path / 'killed'}"])
    straight, killed = tmp_path / "straight" / "checkpoint-16", tmp_path / "killed" / "checkpoint-16"
    _assert_same_checkpoint(straight, killed, ["model-autoencoder.safetensors", "model-discriminator.safetensors",
                                               "ema-autoencoder.safetensors", "optim-autoencoder.safetensors",
                                               "optim-discriminator.safetensors"])
    first = load_state_dict(tmp_path / "straight" / "checkpoint-4" / "model-discriminator.safetensors")
    last = load_state_dict(straight / "model-discriminator.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the discriminator was really trained


def test_two_processes_equal_one_process_with_twice_the_batch(unet_overrides, tmp_path):
    base = [o for o in unet_overrides if not o.startswith(("output_dir", "train.batch_size"))]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    two = subprocess.run(torchrun + _command("unet", base + ["train.batch_size=2", f"output_dir={tmp_path / 'two'}"])[1:],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "4 = 2 per device x 2 process(es) x 1 accumulation step(s)" in two.stderr
    _run("unet", base + ["train.batch_size=4", f"output_dir={tmp_path / 'one'}"])
    for name in ("model-unet.safetensors", "ema-unet.safetensors"):
        a = load_state_dict(tmp_path / "one" / "checkpoint-4" / name)
        b = load_state_dict(tmp_path / "two" / "checkpoint-4" / name)
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        # The all-reduce sums in another order (float noise ~1e-9); Adam's g/(|g|+eps) turns that into a
        # visible step only where |g| ~ eps: a handful of weights, each off by less than a tenth of one step.
        assert (diff > 1e-6).float().mean() < 1e-3 and diff.max() < 0.1 * 1e-3, (name, diff.max())
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint-4").glob("rng-*.safetensors")) == \
        ["rng-0.safetensors", "rng-1.safetensors"]
    # the 2-process run resumes (to 6 steps), and a 1-process run with its batch geometry is refused
    resumed = subprocess.run(torchrun + _command("unet", base + ["train.batch_size=2", "train.max_steps=6",
                                                                 f"output_dir={tmp_path / 'two'}"])[1:],
                             cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    assert load_json(tmp_path / "two" / "checkpoint-6" / "trainer.json")["step"] == 6
    cfg = load_config(UNetStageConfig, None, base + ["train.batch_size=2", "train.max_steps=8",
                                                     f"output_dir={tmp_path / 'two'}"])
    with pytest.raises(ValueError, match=r"trained with 2 process\(es\) x batch 2 .* this run has 1 x 2"):
        stage2.main(cfg)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(unet_overrides, tmp_path, caplog):
    cfg = load_config(UNetStageConfig, None, unet_overrides)
    stage2.main(cfg)
    newest = tmp_path / "unet" / "checkpoint-4" / "model-unet.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # as if the disk filled up mid-write
    caplog.set_level("INFO")
    stage2.main(load_config(UNetStageConfig, None, unet_overrides + ["train.max_steps=6"]))
    assert "ignoring incomplete checkpoint(s): checkpoint-4" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-2 at step 2" in caplog.text
    assert load_json(tmp_path / "unet" / "checkpoint-6" / "trainer.json")["step"] == 6


def test_non_finite_losses_are_skipped_counted_and_stop_training(unet_overrides, tmp_path, monkeypatch, caplog):
    calls, poisoned = [], {1, 2}
    original = stage2.training_loss

    def sometimes_nan(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) - 1 in poisoned else loss

    monkeypatch.setattr(stage2, "training_loss", sometimes_nan)
    cfg = load_config(UNetStageConfig, None, unet_overrides + ["train.max_steps=6", "train.lr_warmup_steps=4",
                                                               "train.checkpoint_every=6"])
    stage2.main(cfg)
    trainer = load_json(tmp_path / "unet" / "checkpoint-6" / "trainer.json")
    assert trainer["skipped"] == 2 and trainer["step"] == 6
    assert caplog.text.count("non-finite loss or gradient, update skipped") == 2
    scheduler = load_json(tmp_path / "unet" / "checkpoint-6" / "schedulers.json")["unet"]
    assert scheduler["last_epoch"] == 4  # the LR schedule advanced only on the 4 applied updates

    calls.clear()
    poisoned.update(range(3, 100))
    cfg = load_config(UNetStageConfig, None, unet_overrides + [f"output_dir={tmp_path / 'stop'}",
                                                               "train.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps had a non-finite loss or gradient .*"
                                                     "Check: the learning rate"):
        stage2.main(cfg)
