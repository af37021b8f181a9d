"""DreamBooth (ldm.dreambooth): the prior-preservation loss, class images generated once and reused, a tiny
LoRA run that stock diffusers loads, and bad inputs refused before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm import dreambooth
from ldm.config import ConfigError, UNetStageConfig, load_config
from ldm.data.images import collate
from ldm.data.shapes import Scene, Shape, render
from ldm.models.text import encode_prompts
from ldm.sampling import load_pipeline
from train import unet as stage2

REPO = Path(__file__).resolve().parents[1]
INSTANCE = "a large red sks circle in the center on a gray background"
CLASS = "a large red circle in the center on a gray background"
TINY = ["data.resolution=16", "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=4",
        "train.log_every=1", "train.lr_warmup_steps=0", "train.learning_rate=1e-2", "train.ema_decay=0.5",
        "validation.every=1000", "validation.steps=2", "dreambooth.num_class_images=3",
        "dreambooth.class_steps=2", "lora.rank=4"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def rings(tmp_path_factory):
    """3 red rings at 16 px, plain images without captions (as a user's subject folder would be)."""
    folder = tmp_path_factory.mktemp("rings")
    for i in range(3):
        side = 9.0 + i
        render(Scene((Shape("ring", "red", "large", (1, 1), 8.0 + 0.5 * i, 8.0, side),), "gray"), 16).save(
            folder / f"ring{i}.png")
    return folder


def _cfg(tmp_path, base, instance, *extra, out="db"):
    return load_config(UNetStageConfig, REPO / "configs/unet/dreambooth.yaml",
                       TINY + [f"pretrained={base}", f"dreambooth.instance_data={instance}",
                               f"output_dir={tmp_path / out}", *extra])


def _parts(cfg):
    from ldm.models.unet import load_components

    return load_components(cfg)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def test_prior_preservation_loss_is_the_instance_mean_plus_weighted_class_mean():
    losses = torch.tensor([1.0, 2.0, 6.0, 10.0, 20.0])
    prior = torch.tensor([False, False, False, True, True])
    # (1 + 2 + 6) / 3 + 0.5 * (10 + 20) / 2 = 3 + 7.5
    assert dreambooth.dreambooth_loss(losses, prior, 0.5).item() == pytest.approx(10.5)
    assert dreambooth.dreambooth_loss(losses, prior, 0.0).item() == pytest.approx(3.0)
    assert dreambooth.dreambooth_loss(losses, torch.zeros(5, dtype=torch.bool), 0.5).item() == pytest.approx(7.8)


def test_training_loss_of_a_dreambooth_batch_combines_its_halves(tmp_path, tiny_pipeline_dir, rings):
    """The stage's loss on [instance; class] examples = loss(instance half) + λ · loss(class half): the same
    per-example draws and predictions, combined as in the docstring's equation."""
    cfg = _cfg(tmp_path, tiny_pipeline_dir, rings)
    parts = _parts(cfg)
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    items = [{"pixel_values": pixels[i], "caption": c, "index": i, "seed": 100 + i}
             for i, c in enumerate([INSTANCE, INSTANCE, CLASS, CLASS])]
    empty = encode_prompts(parts.text_encoder, parts.tokenizer, [""])[0]
    args = (parts.vae, parts.text_encoder, parts.tokenizer, empty, parts.scheduler.alphas_cumprod, cfg.diffusion,
            parts.scheduler.config)
    with torch.no_grad():
        both = collate(items) | {"prior": torch.tensor([False, False, True, True])}
        combined = stage2.training_loss(parts.unet, both, *args, 0.3)
        first = stage2.training_loss(parts.unet, collate(items[:2]), *args)
        second = stage2.training_loss(parts.unet, collate(items[2:]), *args)
    assert combined.item() == pytest.approx((first + 0.3 * second).item(), rel=1e-5)
    assert abs(second.item()) > 1e-3  # the class half does contribute


# --------------------------------------------------------------------------------------------
# Class images
# --------------------------------------------------------------------------------------------
def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_class_images_are_deterministic_and_reused(tmp_path, tiny_pipeline_dir, rings, monkeypatch, caplog):
    cfg = _cfg(tmp_path, tiny_pipeline_dir, rings, out="a")
    parts = _parts(cfg)
    folder = dreambooth.prepare_class_images(cfg, parts, "cpu")
    assert folder == tmp_path / "a" / "class_images"
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert {r["text"] for r in rows} == {CLASS}
    first = _pngs(folder)
    assert len(set(first.values())) == 3  # three different seeds, three different images

    other = dreambooth.prepare_class_images(_cfg(tmp_path, tiny_pipeline_dir, rings, out="b"), parts, "cpu")
    assert _pngs(other) == first  # same seeds, same images (byte for byte)

    # more images wanted: only the missing ones are generated, the first three stay as they are
    more = _cfg(tmp_path, tiny_pipeline_dir, rings, "dreambooth.num_class_images=5", out="a")
    with caplog.at_level("INFO", logger="ldm.dreambooth"):
        dreambooth.prepare_class_images(more, parts, "cpu")
    assert "generating class images 3-4 of 5" in caplog.text
    now = _pngs(folder)
    assert len(now) == 5 and all(now[name] == data for name, data in first.items())

    # a second run finds them all: nothing is generated
    monkeypatch.setattr(dreambooth, "generate_class_images", lambda *a, **k: pytest.fail("regenerated"))
    assert dreambooth.prepare_class_images(more, parts, "cpu") == folder
    assert dreambooth.prepare_class_images(cfg, parts, "cpu") == folder  # fewer wanted: the first 3 are used
    import shutil

    # the same weights elsewhere: loaded from the copy, their recomputed hashes match, so the images are reused
    moved = shutil.copytree(tiny_pipeline_dir, tmp_path / "moved")
    moved_cfg = _cfg(tmp_path, moved, rings, out="a")
    moved_parts = _parts(moved_cfg)
    assert all(getattr(moved_parts, name) is not getattr(parts, name) for name in ("vae", "text_encoder", "unet"))
    assert dreambooth.prepare_class_images(moved_cfg, moved_parts, "cpu") == folder
    assert json.loads((folder / dreambooth.MANIFEST).read_text())["base_model"] == str(moved)
    with torch.no_grad():  # other weights: refused, and the message says which model differs
        next(moved_parts.unet.parameters()).add_(1.0)
    with pytest.raises(dreambooth.DreamBoothError, match=r"other models \(other unet weights\)"):
        dreambooth.prepare_class_images(moved_cfg, moved_parts, "cpu")

    # made for another prompt: refused, not mixed
    changed = _cfg(tmp_path, tiny_pipeline_dir, rings, "dreambooth.class_prompt='a small red circle'", out="a")
    with pytest.raises(dreambooth.DreamBoothError, match="generated with other class_prompt"):
        dreambooth.prepare_class_images(changed, parts, "cpu")


def test_a_folder_of_own_class_images_is_used_as_is(tmp_path, tiny_pipeline_dir, rings):
    own = tmp_path / "own"
    own.mkdir()
    for i in range(2):
        render(Scene((Shape("circle", "red", "large", (1, 1), 8.0, 8.0, 9.0),), "gray"), 16).save(own / f"{i}.png")
    cfg = _cfg(tmp_path, tiny_pipeline_dir, rings, f"dreambooth.class_data={own}", "dreambooth.num_class_images=2")
    assert dreambooth.prepare_class_images(cfg, None, "cpu") == own and not (own / dreambooth.MANIFEST).exists()
    with pytest.raises(dreambooth.DreamBoothError, match="holds 2 images of your own"):
        dreambooth.prepare_class_images(_cfg(tmp_path, tiny_pipeline_dir, rings, f"dreambooth.class_data={own}"),
                                        None, "cpu")


def _prepare_on_rank(rank, port, cfg, parts, results):
    """One of 2 forked gloo processes: prepare the class images as train.unet does, then its barrier."""
    import datetime
    from types import SimpleNamespace

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    dist = SimpleNamespace(process_index=rank, num_processes=2, is_main_process=rank == 0,
                           wait_for_everyone=torch.distributed.barrier)
    try:
        dreambooth.prepare_class_images(cfg, parts if rank == 0 else None, "cpu", dist)
        dist.wait_for_everyone()
        results.put((rank, "ok"))
    except Exception as err:  # noqa: BLE001 (reported to the test)
        results.put((rank, f"{type(err).__name__}: {err}"))


def test_a_refused_class_folder_raises_the_same_error_on_every_process(tmp_path, tiny_pipeline_dir, rings):
    """2 processes: the main one checks the manifest and broadcasts its error, so the other raises it too
    (it neither reads the folder nor hashes models itself: its parts are None) instead of waiting at the
    barrier for ever."""
    import multiprocessing
    import socket

    cfg = _cfg(tmp_path, tiny_pipeline_dir, rings)
    parts, folder = _parts(cfg), dreambooth.class_folder(cfg)
    folder.mkdir(parents=True)
    stale = dreambooth.class_manifest(cfg, parts) | {"class_prompt": "a small red circle"}
    (folder / dreambooth.MANIFEST).write_text(json.dumps(stale))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_prepare_on_rank, args=(rank, port, cfg, parts, results))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        answers = dict(results.get(timeout=90) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert answers[0] == answers[1] and answers[0].startswith("DreamBoothError: ")
    assert "generated with other class_prompt" in answers[0]


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def test_dreambooth_lora_run_loads_in_stock_diffusers_and_resumes_exactly_without_regenerating(
        tmp_path, tiny_pipeline_dir, rings, monkeypatch):
    """A 4-step run, loaded by stock diffusers, then resumed to 6 steps, equals an uninterrupted 6-step run:
    the same examples (seeds, prompts, prior flags) in every batch and the same weights, EMA and optimizer."""
    from safetensors.torch import load_file

    seen = []
    original = stage2.training_loss

    def spy(unet, batch, *args, **kwargs):
        seen.append((batch["seed"].tolist(), list(batch["caption"]), batch["prior"].tolist(), args[-1]))
        return original(unet, batch, *args, **kwargs)

    monkeypatch.setattr(stage2, "training_loss", spy)
    weight = "dreambooth.prior_loss_weight=0.7"
    straight_final = stage2.main(_cfg(tmp_path, tiny_pipeline_dir, rings, weight, "train.max_steps=6", out="straight"))
    straight, seen[:] = list(seen), []
    assert len(straight) == 6 and len({tuple(s[0]) for s in straight}) == 6  # six different batches

    final = stage2.main(_cfg(tmp_path, tiny_pipeline_dir, rings, weight))
    assert sorted(p.name for p in final.iterdir()) == ["pytorch_lora_weights.safetensors", "training.json"]
    assert len(seen) == 4 and all(s[1:] == ([INSTANCE] * 2 + [CLASS] * 2, [False, False, True, True], 0.7)
                                  for s in seen)
    assert len(list((tmp_path / "db" / "class_images").glob("*.png"))) == 3

    def images(pipe):
        return pipe(INSTANCE, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    stock = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, requires_safety_checker=False)
    base = images(stock)
    stock.load_lora_weights(final)
    ours, theirs = images(load_pipeline(final)), images(stock)
    assert np.abs(ours - theirs).max() <= 1e-4 and np.abs(ours - base).max() > 1e-3

    monkeypatch.setattr(dreambooth, "generate_class_images", lambda *a, **k: pytest.fail("regenerated"))
    resumed_final = stage2.main(_cfg(tmp_path, tiny_pipeline_dir, rings, weight, "train.max_steps=6"))
    assert seen == straight  # per-example seeds, prompts and prior flags of all 6 batches
    a, b = tmp_path / "straight" / "checkpoint-6", tmp_path / "db" / "checkpoint-6"
    ta, tb = (json.loads((c / "trainer.json").read_text()) for c in (a, b))
    assert tb["step"] == 6 and (ta["data_digest"], ta["batches"]) == (tb["data_digest"], tb["batches"])
    for name in ["model-unet.safetensors", "ema-unet.safetensors", "optim-unet.safetensors"]:
        sa, sb = load_file(a / name), load_file(b / name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    la, lb = (load_file(f / "pytorch_lora_weights.safetensors") for f in (straight_final, resumed_final))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_full_fine_tune_dreambooth_saves_a_pipeline_with_a_changed_unet(tmp_path, tiny_pipeline_dir, rings):
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    final = stage2.main(_cfg(tmp_path, tiny_pipeline_dir, rings, "lora.rank=0", "train.ema_decay=null",
                             "train.max_steps=2"))
    before = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet.state_dict()
    after = LatentDiffusionPipeline.from_pretrained(final).unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((final / "training.json").read_text())["config"]["dreambooth"]["instance_prompt"] == INSTANCE


def test_without_prior_preservation_batches_hold_only_instances(tmp_path, tiny_pipeline_dir, rings, monkeypatch):
    seen = []
    original = stage2.training_loss
    monkeypatch.setattr(stage2, "training_loss",
                        lambda unet, batch, *a, **k: seen.append(batch["prior"].tolist()) or original(unet, batch, *a))
    stage2.main(_cfg(tmp_path, tiny_pipeline_dir, rings, "dreambooth.prior_preservation=false",
                     "dreambooth.class_prompt=''", "train.batch_size=4", "train.max_steps=2"))
    assert seen == [[False] * 4] * 2 and not (tmp_path / "db" / "class_images").exists()


# --------------------------------------------------------------------------------------------
# Bad inputs: named errors before any work
# --------------------------------------------------------------------------------------------
def test_missing_or_empty_instance_folder_is_refused_before_any_work(tmp_path, tiny_pipeline_dir):
    with pytest.raises(dreambooth.DreamBoothError, match=r"instance_data .*nowhere is not a folder"):
        stage2.main(_cfg(tmp_path, tiny_pipeline_dir, tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(dreambooth.DreamBoothError, match="holds no images.*at least 1 image"):
        stage2.main(_cfg(tmp_path, tiny_pipeline_dir, empty))
    assert not (tmp_path / "db").exists()  # nothing was written


@pytest.mark.parametrize("instance, classes, message", [
    ("subject", "subject/classes", r"class_data .*subject/classes is inside dreambooth.instance_data"),
    ("classes/subject", "classes", r"instance_data .*classes/subject is inside dreambooth.class_data"),
    ("subject", "subject", r"class_data .*subject is the instance folder"),
])
def test_class_folder_nested_with_the_instance_folder_is_refused_before_any_work(tmp_path, tiny_pipeline_dir,
                                                                                 instance, classes, message):
    subject, class_data = tmp_path / instance, f"dreambooth.class_data={tmp_path / classes}"
    subject.mkdir(parents=True)
    render(Scene((Shape("ring", "red", "large", (1, 1), 8.0, 8.0, 9.0),), "gray"), 16).save(subject / "ring.png")
    with pytest.raises(dreambooth.DreamBoothError, match=message):
        stage2.main(_cfg(tmp_path, tiny_pipeline_dir, subject, class_data))
    assert not (tmp_path / "db").exists()
    # without prior preservation there are no class images to mix in
    dreambooth.check_inputs(_cfg(tmp_path, tiny_pipeline_dir, subject, "dreambooth.prior_preservation=false",
                                 "dreambooth.class_prompt=''", class_data))


@pytest.mark.parametrize("override, message", [
    ("dreambooth.prior_loss_weight=-0.5", r"dreambooth.prior_loss_weight must be a finite number >= 0"),
    ("dreambooth.class_prompt=''", r"dreambooth.class_prompt is needed with dreambooth.prior_preservation"),
    ("dreambooth.instance_prompt=''", r"dreambooth.instance_prompt must name the subject"),
    (f"dreambooth.class_prompt='{INSTANCE}'", r"dreambooth.class_prompt must differ"),
    ("dreambooth.num_class_images=0", r"dreambooth.num_class_images must be >= 1"),
    ("pretrained=null", r"dreambooth.instance_data needs `pretrained`"),
    ("data.path=somewhere", r"data.path must be empty with dreambooth.instance_data"),
])
def test_bad_dreambooth_settings_name_the_key(tmp_path, tiny_pipeline_dir, rings, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, tiny_pipeline_dir, rings, override)


def test_the_instance_folder_inside_output_dir_is_refused(tmp_path, tiny_pipeline_dir):
    (tmp_path / "db" / "subject").mkdir(parents=True)
    with pytest.raises(ConfigError, match="overlaps dreambooth.instance_data"):
        _cfg(tmp_path, tiny_pipeline_dir, tmp_path / "db" / "subject")


# --------------------------------------------------------------------------------------------
# Prior prompts: the prior covers what the base model knew beyond the class
# --------------------------------------------------------------------------------------------
def test_prior_prompts_alternate_with_the_class_prompt_and_train_under_their_own_prompt(tmp_path, tiny_pipeline_dir,
                                                                                        rings):
    from types import SimpleNamespace

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small blue square in the top left on a white background\n\n"
                       "a large green cross in the center on a black background\n"
                       "a small blue square in the top left on a white background\n")  # blank and repeated: skipped
    cfg = _cfg(tmp_path, tiny_pipeline_dir, rings, f"dreambooth.prior_prompts={prompts}",
               "dreambooth.num_class_images=5", "train.batch_size=5")
    folder = dreambooth.prepare_class_images(cfg, _parts(cfg), "cpu")
    square, cross = prompts.read_text().splitlines()[0], prompts.read_text().splitlines()[2]
    texts = [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert texts == [CLASS, square, CLASS, cross, CLASS]
    assert json.loads((folder / dreambooth.MANIFEST).read_text())["prior_prompts"] == [square, cross]

    batches, source = dreambooth.training_batches(SimpleNamespace(num_processes=1, process_index=0), cfg, 0)
    batch = next(batches)
    prior = batch["prior"].tolist()
    assert prior == [False] * 5 + [True] * 5 and "prompts.txt's prompts" in source
    assert sorted(c for c, p in zip(batch["caption"], prior) if p) == sorted(texts)  # each under its own prompt
    assert {c for c, p in zip(batch["caption"], prior) if not p} == {INSTANCE}

    prompts.write_text("a small red triangle in the bottom right on a gray background\n")
    with pytest.raises(dreambooth.DreamBoothError, match="generated with other prior_prompts"):
        dreambooth.prepare_class_images(cfg, _parts(cfg), "cpu")


def test_prior_prompts_can_be_the_captions_of_an_imagefolder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n"
                                                   for i, t in enumerate(["a cat", "a dog", "a cat", " "])))
    assert dreambooth.read_prior_prompts(str(folder)) == ["a cat", "a dog"]
    with pytest.raises(dreambooth.DreamBoothError, match="neither a file nor a folder with metadata.jsonl"):
        dreambooth.read_prior_prompts(str(tmp_path / "nowhere"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(dreambooth.DreamBoothError, match="holds no prompts"):
        dreambooth.read_prior_prompts(str(tmp_path / "empty.txt"))


def test_bad_prior_prompts_are_refused_before_any_work(tmp_path, tiny_pipeline_dir, rings):
    with pytest.raises(dreambooth.DreamBoothError, match=r"prior_prompts .*nowhere.txt is neither"):
        stage2.main(_cfg(tmp_path, tiny_pipeline_dir, rings, f"dreambooth.prior_prompts={tmp_path / 'nowhere.txt'}"))
    assert not (tmp_path / "db").exists()
    with pytest.raises(ConfigError, match="dreambooth.prior_prompts is set but dreambooth.prior_preservation is false"):
        _cfg(tmp_path, tiny_pipeline_dir, rings, "dreambooth.prior_preservation=false", "dreambooth.class_prompt=''",
             f"dreambooth.prior_prompts={tmp_path}")
