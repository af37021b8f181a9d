"""FD, KID and CLIP score against direct computations; the CLIP feature space of a pipeline."""

import numpy as np
import pytest
import torch

from ldm.evaluation.fid import (clip_score, feature_statistics, frechet_distance, frechet_distance_features,
                                kernel_inception_distance, mmd2_unbiased, polynomial_kernel, sqrtm_psd,
                                trace_sqrt_product)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def denman_beavers_sqrtm(a, iterations=60):
    """Principal square root of a (not necessarily symmetric) matrix, Y_{k+1} = (Y_k + Z_k⁻¹)/2 (reference)."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iterations):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def test_trace_sqrt_product_matches_a_general_matrix_square_root_3x3():
    rng = np.random.default_rng(0)
    s1, s2 = random_spd(rng, 3), random_spd(rng, 3)
    reference = denman_beavers_sqrtm(s1 @ s2)  # Σ1Σ2 itself, not symmetric
    assert np.allclose(reference @ reference, s1 @ s2, atol=1e-9)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(reference), rel=1e-10)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy_linalg.sqrtm(s1 @ s2)).real, rel=1e-8)


def test_sqrtm_psd_squares_back_and_clips_rounding_negatives():
    rng = np.random.default_rng(1)
    s = random_spd(rng, 4)
    root = sqrtm_psd(s)
    assert np.allclose(root @ root, s, atol=1e-10) and np.allclose(root, root.T)
    singular = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])  # rank 1: eigenvalues 14, 0, 0 (±rounding)
    assert np.allclose(sqrtm_psd(singular) @ sqrtm_psd(singular), singular, atol=1e-10)


def test_frechet_distance_of_diagonal_gaussians_by_hand():
    # FD = Σ (μ1 − μ2)² + Σ (√a − √b)² for diagonal covariances diag(a), diag(b)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_on_features_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 3)), rng.normal(0.3, 1.5, size=(40, 3)) @ random_spd(rng, 3)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x.T), np.cov(y.T)
    root = denman_beavers_sqrtm(s1 @ s2)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert frechet_distance_features(x, y) == pytest.approx(direct, rel=1e-9)
    mu, sigma = feature_statistics(x)
    assert np.allclose(mu, mu1) and np.allclose(sigma, s1)


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 8))
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
    shifted = [frechet_distance_features(x, x + delta) for delta in (0.1, 0.5, 1.0)]
    # a pure shift by δ in each of 8 dims: FD = 8 δ² exactly (same covariance)
    assert shifted == pytest.approx([8 * 0.01, 8 * 0.25, 8 * 1.0], rel=1e-9)
    scaled = frechet_distance_features(x, 2 * x)  # a wider distribution is far too
    assert scaled > 1.0


def test_polynomial_kernel_and_unbiased_mmd_match_double_loops():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 5)), rng.normal(0.5, 1.0, size=(7, 5))
    d = x.shape[1]

    def k(u, v):
        return (u @ v / d + 1) ** 3

    assert polynomial_kernel(x, y)[2, 3] == pytest.approx(k(x[2], y[3]))
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_averages_mmd_over_subsets_and_separates_distributions():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 4)), rng.normal(size=(40, 4))
    mean, std = kernel_inception_distance(x, y, num_subsets=5, subset_size=40)  # every subset is the whole set
    assert mean == pytest.approx(mmd2_unbiased(x, y)) and std == pytest.approx(0.0, abs=1e-12)
    same, _ = kernel_inception_distance(x, y, num_subsets=50, subset_size=20, seed=1)
    near, _ = kernel_inception_distance(x, y + 0.5, num_subsets=50, subset_size=20, seed=1)
    far, _ = kernel_inception_distance(x, y + 2.0, num_subsets=50, subset_size=20, seed=1)
    assert abs(same) < near < far and far > 100 * abs(same)
    assert kernel_inception_distance(x, y, 10, 20, seed=7) == kernel_inception_distance(x, y, 10, 20, seed=7)


def test_clip_score_is_100_times_the_clipped_cosine():
    image = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    text = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert clip_score(image, text) == pytest.approx([100.0, 100 / np.sqrt(2), 0.0])
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(10, 16)), rng.normal(size=(10, 16))
    cos = [float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) for u, v in zip(a, b)]
    assert clip_score(a, b) == pytest.approx([100 * max(c, 0) for c in cos])


def test_a_pipeline_with_a_stage0_clip_is_measured_in_its_feature_space(tmp_path):
    """The pipeline folder's open_clip/ (copied at stage 2's save) is found and maps images and captions."""
    import json

    from ldm.config import CLIPModelConfig
    from ldm.evaluation.fid import find_stage0_clip, load_feature_space
    from ldm.models.text import build_open_clip, open_clip_config, save_open_clip

    config = open_clip_config(CLIPModelConfig(embed_dim=16, vision_layers=1, vision_width=32, vision_heads=2,
                                              vision_patch_size=8, text_context_length=16, text_width=32,
                                              text_heads=2, text_layers=1), 32)
    torch.manual_seed(0)
    text_encoder_dir = tmp_path / "te"
    save_open_clip(text_encoder_dir / "open_clip", build_open_clip(config), config)
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    assert find_stage0_clip(pipeline) is None and load_feature_space(pipeline) is None
    (pipeline / "training.json").write_text(json.dumps({"config": {"text_encoder": str(text_encoder_dir)}}))
    assert find_stage0_clip(pipeline) == text_encoder_dir / "open_clip"
    space = load_feature_space(pipeline)
    assert space.name.startswith("stage-0 CLIP image tower (") and space.name.endswith("/te/open_clip), 16-d at 32 px")
    assert str(tmp_path) not in space.name  # the report (and the model card) names no full local path
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1  # another resolution than the CLIP's: resized to 32
    features = space.images(pixels)
    assert features.shape == (3, 16) and np.isfinite(features).all()
    assert np.allclose(space.images(pixels[:1]), features[:1], atol=1e-5)
    assert space.texts(["a handwritten digit one", "a handwritten digit two"]).shape == (2, 16)
    named = load_feature_space(None, clip=str(text_encoder_dir / "open_clip"))
    assert np.allclose(named.images(pixels), features, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_feature_space(None, clip="ViT-B-32:/no/such/weights.safetensors")


def test_eval_pipeline_without_a_clip_says_so_and_reports_the_rest(tiny_pipeline_dir, shapes16, tmp_path, capsys):
    """No stage-0 CLIP and no --clip: no FD/KID/CLIP score, and the report says why; shapes data gets the judge."""
    import json

    from ldm.cli import main as cli

    out = tmp_path / "metrics.json"
    cli(["eval", "pipeline", "--model", str(tiny_pipeline_dir), "--data", str(shapes16), "--num", "6", "--steps", "2",
         "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["features"].startswith("none") and "--clip" in metrics["features"] and "fd" not in metrics
    assert metrics["data_kind"] == "shapes" and metrics["judge"]["num_images"] == 6
    assert 0 <= metrics["judge_accuracy"] <= 1 and metrics["bits_per_dim"] > 0 and metrics["heldout_loss"] > 0
    assert "features        none" in capsys.readouterr().out
