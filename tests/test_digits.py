"""`ldm data digits`: scikit-learn's real handwritten digits as an imagefolder; the digit classifier."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

from ldm.cli import main as cli  # noqa: E402
from ldm.data.digits import NAMES, caption, label_of, load_digits, render_digit  # noqa: E402
from ldm.evaluation.digits import classify_digits, fit_digit_classifier  # noqa: E402
from ldm.evaluation.pipeline import data_kind  # noqa: E402


def test_ldm_data_digits_writes_all_1797_images_with_their_captions(tmp_path, capsys):
    cli(["data", "digits", "--out", str(tmp_path / "digits"), "--size", "32"])
    assert "wrote 1797 handwritten digits" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "digits" / "metadata.jsonl").read_text().splitlines()]
    _, labels = load_digits()
    assert len(rows) == 1797 == len(list((tmp_path / "digits").glob("*.png")))
    assert [r["label"] for r in rows] == labels.tolist()
    assert all(r["text"] == f"a handwritten digit {NAMES[r['label']]}" for r in rows)
    assert rows[7]["text"] == "a handwritten digit seven"  # load_digits starts 0, 1, 2, ..., 9
    image = Image.open(tmp_path / "digits" / rows[0]["file_name"])
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels.min() < 60  # white paper, dark ink


def test_captions_round_trip_and_the_data_is_recognised():
    assert [label_of(caption(d)) for d in range(10)] == list(range(10))
    assert label_of("a handwritten digit eleven") is None and label_of("a red circle") is None
    assert data_kind([caption(3), caption(4)]) == "digits"
    assert data_kind(["a small red circle in the top left on a gray background"]) == "shapes"
    assert data_kind([caption(3), "a photo of a cat"]) is None


def test_the_classifier_reads_real_digits_and_scores_generated_ones():
    classifier = fit_digit_classifier(32)
    assert classifier.heldout_accuracy >= 0.97  # on the quarter of the scans it never saw
    scans, labels = load_digits()
    heldout = np.arange(len(scans)) % 4 == 0
    images = [render_digit(s, 32) for s in scans[heldout][:40]]
    result = classify_digits(images, labels[heldout][:40].tolist())
    assert result["accuracy"] >= 0.95 and result["num_images"] == 40
    blank = [Image.new("RGB", (32, 32), "white")] * 10  # a generator that draws nothing is mostly wrong
    assert classify_digits(blank, list(range(10)))["accuracy"] <= 0.2
    arrays = np.stack([np.asarray(i) for i in images])  # uint8 [N, H, W, 3] works as PIL does
    assert classify_digits(arrays, labels[heldout][:40].tolist())["accuracy"] == result["accuracy"]
