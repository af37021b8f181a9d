"""The shapes judge reads real shapes data right and rejects wrong prompts."""

import numpy as np
import pytest
from PIL import ImageFilter

from ldm.data.shapes import COLOURS, EXTRA_COLOURS, KINDS, make_scene, render, single_shape_scenes
from ldm.evaluation.judge import judge, largest_component, summarise


@pytest.mark.parametrize("size", [32, 48])
def test_judge_is_right_on_real_single_shape_images(size):
    scenes = single_shape_scenes(120, seed=7, size=size, colours=tuple(COLOURS) + tuple(EXTRA_COLOURS))
    verdicts = [judge(np.asarray(render(s, size)), s.shapes[0].colour, s.shapes[0].kind) for s in scenes]
    metrics = summarise(verdicts, [s.shapes[0].kind for s in scenes])
    assert metrics["accuracy"] >= 0.98 and set(metrics["per_kind_accuracy"]) == set(KINDS)


def test_judge_rejects_wrong_colour_and_wrong_kind():
    scenes = single_shape_scenes(60, seed=8, size=32)
    for s in scenes:
        image, shape = np.asarray(render(s, 32)), s.shapes[0]
        other_colour = "blue" if shape.colour != "blue" else "red"
        other_kind = KINDS[(KINDS.index(shape.kind) + 1) % len(KINDS)]
        assert not judge(image, other_colour, shape.kind).correct
        verdict = judge(image, shape.colour, other_kind)
        assert verdict.colour_found and not verdict.kind_ok


def test_judge_tolerates_blur_and_noise():
    rng = np.random.default_rng(0)
    scenes = single_shape_scenes(80, seed=9, size=32)
    right = 0
    for s in scenes:
        blurred = np.asarray(render(s, 32).filter(ImageFilter.GaussianBlur(0.7))).astype(float)
        noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
        right += judge(noisy, s.shapes[0].colour, s.shapes[0].kind).correct
    assert right / len(scenes) >= 0.9


def test_judge_on_two_shape_scene_finds_each_colour():
    scene = next(make_scene(i, 0, 48) for i in range(100) if len(make_scene(i, 0, 48).shapes) == 2)
    image = np.asarray(render(scene, 48))
    for shape in scene.shapes:
        assert judge(image, shape.colour, shape.kind).correct


def test_blank_image_and_unknown_colour():
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert not judge(blank, "red", "circle").colour_found
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        judge(blank, "mauve", "circle")


def test_largest_component():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = True
    mask[2:5, 2:4] = True
    assert largest_component(mask).sum() == 6 and not largest_component(mask)[0, 0]


@pytest.mark.parametrize("size", [32, 48])
def test_judge_reads_the_position_of_real_shapes_and_rejects_a_wrong_cell(size):
    scenes = single_shape_scenes(200, seed=11, size=size)
    assert {s.shapes[0].cell for s in scenes} == {(r, c) for r in range(3) for c in range(3)}
    verdicts = [judge(np.asarray(render(s, size)), s.shapes[0].colour, s.shapes[0].kind, cell=s.shapes[0].cell)
                for s in scenes]
    assert summarise(verdicts, [s.shapes[0].kind for s in scenes])["position_accuracy"] == 1.0
    for s in scenes[:40]:
        row, col = s.shapes[0].cell
        wrong = ((row + 1) % 3, col)
        verdict = judge(np.asarray(render(s, size)), s.shapes[0].colour, s.shapes[0].kind, cell=wrong)
        assert verdict.correct and verdict.position_ok is False  # kind and colour right, position wrong


def test_position_accuracy_counts_only_verdicts_asked_for_a_position():
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    asked, unasked = judge(blank, "red", "circle", cell=(1, 1)), judge(blank, "red", "circle")
    assert asked.position_ok is False and unasked.position_ok is None
    assert summarise([unasked], ["circle"])["position_accuracy"] is None
    assert summarise([asked, unasked], ["circle", "circle"])["position_accuracy"] == 0.0
