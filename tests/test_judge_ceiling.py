"""Judges that check themselves: the built-in judges read the data's real held-out images first, report
that accuracy (their ceiling) beside their reading of generated images, and withhold the reading below 0.9."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

from ldm.cli import main as cli  # noqa: E402
from ldm.data.digits import NAMES, caption, load_digits, render_digit, write_digits_dataset  # noqa: E402
from ldm.evaluation.ceiling import MIN_REAL_ACCURACY, checked_reading  # noqa: E402
from ldm.evaluation.digits import classify_digits, judge_digits, light_ink_on_dark  # noqa: E402

WITHHELD = "cannot read this data"


@pytest.fixture(scope="module")
def inverted_digits(tmp_path_factory):
    """The first 200 digits as `ldm data digits` writes them at 16 px, ink inverted: light ink on dark paper."""
    folder = write_digits_dataset(tmp_path_factory.mktemp("inverted"), size=16, num=200)
    for png in folder.glob("*.png"):
        Image.fromarray(255 - np.asarray(Image.open(png).convert("RGB"))).save(png)
    return folder


def _drawn_digits(captions, size=16, invert=True):
    """A generator that draws each caption's digit right (a scan not in the data), light on dark: uint8 [N, H, W, 3]."""
    scans, labels = load_digits()
    pool = {d: [s for s, lab in zip(scans[1000:], labels[1000:]) if lab == d] for d in range(10)}
    images = [np.asarray(render_digit(pool[NAMES.index(c.split()[-1])][i % 5], size)) for i, c in enumerate(captions)]
    return 255 - np.stack(images) if invert else np.stack(images)


def _folder(path, images, captions):
    path.mkdir()
    with open(path / "metadata.jsonl", "w") as meta:
        for i, (image, text) in enumerate(zip(images, captions)):
            Image.fromarray(image).save(path / f"{i:03d}.png")
            meta.write(json.dumps({"file_name": f"{i:03d}.png", "text": text}) + "\n")
    return path


def test_the_gate_reads_only_above_the_ceiling_and_says_why():
    calls = []

    def read():
        calls.append(1)
        return {"accuracy": 0.5}

    assert checked_reading({"real_accuracy": 0.95, "real_images": 20}, "judge", "hint", read) == {
        "accuracy": 0.5, "real_accuracy": 0.95, "real_images": 20}
    low = checked_reading({"real_accuracy": 0.85, "real_images": 20}, "judge", "its hint", read)
    assert low["accuracy"] is None and low["real_accuracy"] == 0.85 and len(calls) == 1  # not read at all
    assert low["withheld"].startswith(f"the judge {WITHHELD}: it reads only 0.85 of 20 real held-out images")
    assert "(its hint)" in low["withheld"] and f"{MIN_REAL_ACCURACY:.2f}" in low["withheld"]
    none = checked_reading({"real_accuracy": None, "real_images": 0}, "judge", "hint", read)
    assert none["accuracy"] is None and "no real held-out images" in none["withheld"]


def test_inverted_digits_are_read_right_where_the_built_in_classifier_read_them_wrong(inverted_digits):
    images = [np.asarray(Image.open(inverted_digits / f"{i:05d}.png")) for i in range(200)]
    _, labels = load_digits()
    labels = labels[:200].tolist()
    assert light_ink_on_dark(images) and not light_ink_on_dark([255 - x for x in images])
    assert classify_digits(images, labels)["accuracy"] < 0.3  # the known failure: it assumed dark ink on white
    drawn = _drawn_digits([caption(d) for d in labels[:100]])
    reading = judge_digits(drawn, labels[:100], (images[:100], labels[:100]), (images[100:], labels[100:]), 16)
    assert reading["real_accuracy"] >= 0.9 and reading["real_images"] == 100  # its ceiling, on unfitted images
    assert reading["accuracy"] >= 0.9 and reading["num_images"] == 100 and reading["polarity"] == "light_on_dark"
    assert "withheld" not in reading


def test_eval_pipeline_on_inverted_digits_reports_the_ceiling_and_the_right_accuracy(tiny_pipeline_dir,
                                                                                   inverted_digits, tmp_path,
                                                                                   capsys, monkeypatch):
    """The generator is replaced by one that draws every caption's digit right, as the data does (light on
    dark): the right accuracy is ~1 (the built-in classifier alone read such digits as 0.08)."""
    import ldm.evaluation.pipeline as evaluation

    monkeypatch.setattr(evaluation, "generate", lambda pipe, captions, *args, **kw: _drawn_digits(captions))
    out = tmp_path / "metrics.json"
    cli(["eval", "pipeline", "--model", str(tiny_pipeline_dir), "--data", str(inverted_digits), "--num", "200",
         "--steps", "2", "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["data_kind"] == "digits" and metrics["classifier"]["polarity"] == "light_on_dark"
    assert metrics["classifier_real_accuracy"] >= 0.9 and metrics["classifier"]["real_images"] == 100
    assert metrics["classifier_accuracy"] >= 0.9 and metrics["classifier"]["num_images"] == 100
    printed = capsys.readouterr().out
    assert f"classifier      {metrics['classifier_accuracy']:.2f} of generated digits" in printed
    assert f"(its ceiling: {metrics['classifier_real_accuracy']:.2f} on 100 real held-out images)" in printed


def test_digits_captions_on_shapes_images_withhold_the_reading(tiny_pipeline_dir, shapes16, tmp_path, capsys):
    rows = [json.loads(line) for line in (shapes16 / "metadata.jsonl").read_text().splitlines()]
    images = [np.asarray(Image.open(shapes16 / r["file_name"]).convert("RGB")) for r in rows]
    data = _folder(tmp_path / "digit_captions", images, [caption(i % 10) for i in range(len(images))])
    out = tmp_path / "metrics.json"
    cli(["eval", "pipeline", "--model", str(tiny_pipeline_dir), "--data", str(data), "--num", "40", "--steps", "2",
         "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["data_kind"] == "digits" and metrics["classifier_accuracy"] is None
    assert metrics["classifier"]["accuracy"] is None and metrics["classifier_real_accuracy"] < 0.9
    assert metrics["classifier"]["withheld"].startswith(f"the digit classifier {WITHHELD}: it reads only")
    assert f"classifier      withheld: the digit classifier {WITHHELD}" in capsys.readouterr().out


def test_shapes_captions_on_noise_withhold_the_judge(tiny_pipeline_dir, shapes16, tmp_path, capsys):
    captions = [json.loads(line)["text"] for line in (shapes16 / "metadata.jsonl").read_text().splitlines()]
    noise = np.random.default_rng(0).integers(0, 256, (len(captions), 16, 16, 3), dtype=np.uint8)
    data = _folder(tmp_path / "noise", noise, captions)
    out = tmp_path / "metrics.json"
    cli(["eval", "pipeline", "--model", str(tiny_pipeline_dir), "--data", str(data), "--num", "20", "--steps", "2",
         "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["data_kind"] == "shapes" and metrics["judge_accuracy"] is None
    assert metrics["judge_real_accuracy"] < 0.9 and metrics["judge"]["real_images"] == 20
    assert metrics["judge"]["withheld"].startswith(f"the shapes judge {WITHHELD}: it reads only")
    assert "num_images" not in metrics["judge"]  # no generated image was judged
    assert f"judge accuracy  withheld: the shapes judge {WITHHELD}" in capsys.readouterr().out



def test_demo_metrics_carry_the_ceiling_and_keep_the_judge_reading(tiny_pipeline_dir, shapes16, tmp_path, monkeypatch):
    """The demo's judge readings come with the judge's accuracy on the held-out real images; on the same
    generated images the reading is the one the judge always gave."""
    import torch

    import ldm.evaluation.pipeline as evaluation
    import ldm.evaluation.retrieval
    import ldm.evaluation.vae
    from ldm.config import DataConfig
    from ldm.demo import judge_line, measure
    from ldm.evaluation.judge import judge, summarise
    from ldm.sampling import load_pipeline

    monkeypatch.setattr(ldm.evaluation.vae, "evaluate_vae", lambda *a, **kw: {"psnr": 0.0})
    monkeypatch.setattr(ldm.evaluation.retrieval, "evaluate_text_encoder", lambda *a, **kw: {})
    monkeypatch.setattr(evaluation, "latent_bits_per_dim", lambda *a, **kw: 1.0)
    metrics = measure(tmp_path, tmp_path / "vae", tmp_path / "te", tiny_pipeline_dir, shapes16, judge_prompts=4)
    real = evaluation.folder_ceiling(DataConfig(path=str(shapes16), resolution=32))
    guided, unguided = metrics["judge_guidance_5"], metrics["judge_guidance_1"]
    assert real["real_images"] == 48 and real["real_accuracy"] >= 0.9
    for reading in (guided, unguided):
        assert reading["real_accuracy"] == real["real_accuracy"] and reading["real_images"] == 48
    pipe = load_pipeline(tiny_pipeline_dir, scheduler="dpm++")
    scenes = evaluation.single_shape_scenes(4, evaluation.HELD_OUT_SEED, 16)
    images = pipe([s.caption for s in scenes], num_inference_steps=20, guidance_scale=5.0, output_type="np",
                  generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    verdicts = [judge((x * 255).round().astype(np.uint8), s.shapes[0].colour, s.shapes[0].kind)
                for x, s in zip(images, scenes)]
    assert guided["accuracy"] == summarise(verdicts, [s.shapes[0].kind for s in scenes])["accuracy"]
    assert judge_line(guided, unguided).endswith(f"its ceiling: {real['real_accuracy']:.2f} on 48 real held-out "
                                                 "images)")
    withheld = {"accuracy": None, "withheld": "the shapes judge cannot read this data: ..."}
    assert judge_line(withheld, withheld) == "judge accuracy  withheld: the shapes judge cannot read this data: ..."


def test_eval_pipeline_reads_class_captions_with_a_judge_fitted_on_the_data(tiny_pipeline_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """Captions that name a few classes get the class judge: ceiling on half B, reading of generated images."""
    import ldm.evaluation.pipeline as evaluation

    rng = np.random.default_rng(0)
    colours = {"a red tile": (200, 40, 40), "a blue tile": (40, 40, 200), "a dark tile": (30, 30, 30)}

    def tiles(captions):
        return np.stack([np.clip(np.array(colours[c]) + rng.normal(0, 15, (16, 16, 3)), 0, 255).astype(np.uint8)
                         for c in captions])

    captions = [list(colours)[i % 3] for i in range(60)]
    data = _folder(tmp_path / "tiles", tiles(captions), captions)
    monkeypatch.setattr(evaluation, "generate", lambda pipe, wanted, *args, **kw: tiles(list(wanted)))
    out = tmp_path / "metrics.json"
    cli(["eval", "pipeline", "--model", str(tiny_pipeline_dir), "--data", str(data), "--num", "60", "--steps", "2",
         "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["data_kind"] == "classes" and metrics["classifier"]["real_images"] == 30
    assert metrics["classifier_real_accuracy"] == 1.0 and metrics["classifier_accuracy"] == 1.0
    assert "classifier      1.00 of generated images read as their caption's class" in capsys.readouterr().out
