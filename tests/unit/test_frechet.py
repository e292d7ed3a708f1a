"""The Frechet distance against closed forms and an independent matrix square root, the feature classifier's
accuracy and determinism, the evaluator's ranking and error bars, and the PNG grids' sizes and pixels.

Shape legend: N images, C channels, H/W pixels, F features, K classes.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from megatron.evaluation.frechet import (
    FrechetEvaluator,
    feature_statistics,
    frechet_distance,
    frechet_distance_with_error,
    train_feature_classifier,
)
from megatron.evaluation.grids import save_image_grid

K, SIZE = 10, 8


def random_spd(rng: np.random.Generator, f: int) -> np.ndarray:
    a = rng.standard_normal((f, f))
    return a @ a.T / f + 0.1 * np.eye(f)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_spd(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.tensor(mu), torch.tensor(sigma), mu, sigma) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)])
def test_one_dimensional_gaussians(m1, s1, m2, s2):
    # the squared 2-Wasserstein distance of N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    fd = frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-9, abs=1e-12)


def test_diagonal_covariances_add_up_per_dimension():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = sum((a - b) ** 2 + (c - d) ** 2 for a, b, c, d in zip(m1, m2, s1, s2))
    assert frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-9)


def test_symmetric_and_matches_an_independent_square_root():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    s1, s2 = random_spd(rng, 12), random_spd(rng, 12)
    forward, backward = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert forward == pytest.approx(backward, rel=1e-9)
    # S1 S2 is similar to an SPD matrix, so its eigenvalues are real and positive: Tr sqrt(S1 S2) is the sum
    # of their square roots. Checked against scipy's general matrix square root when scipy is installed.
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    try:
        from scipy.linalg import sqrtm

        assert np.trace(sqrtm(s1 @ s2)).real == pytest.approx(trace_sqrt, rel=1e-8)
    except ImportError:
        pass
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert forward == pytest.approx(expected, rel=1e-8)


def test_feature_statistics_match_numpy():
    features_NF = np.random.default_rng(3).standard_normal((50, 6)) * np.arange(1, 7) + 2.0
    mu, sigma = feature_statistics(torch.tensor(features_NF, dtype=torch.float32))
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, features_NF.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features_NF, rowvar=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="feature_statistics"):
        feature_statistics(np.zeros((1, 6)))


def test_bootstrap_error_matches_the_spread_of_independent_draws():
    """The bootstrap standard error from one sample of N against the standard deviation of the FD over many
    independent samples of N: equal in expectation up to the bootstrap's own error, so within a factor 2."""
    rng = np.random.default_rng(4)
    reference_NF = rng.standard_normal((20000, 4))
    draw = lambda: rng.standard_normal((300, 4)) + 0.5
    spread = np.std([frechet_distance_with_error(draw(), reference_NF, num_splits=2)[0] for _ in range(60)], ddof=1)
    generated_NF = draw()
    fd, stderr = frechet_distance_with_error(generated_NF, reference_NF, num_splits=200, seed=1)
    assert fd == pytest.approx(frechet_distance(*feature_statistics(generated_NF), *feature_statistics(reference_NF)))
    assert 0.5 * spread < stderr < 2.0 * spread
    assert frechet_distance_with_error(generated_NF, reference_NF, num_splits=200, seed=1) == (fd, stderr)


# -- the classifier and the evaluator on class-dependent patterns plus noise ------------------------------------

PATTERNS_KCHW = F.interpolate(torch.rand(K, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8,
                              size=SIZE, mode="bilinear", align_corners=False)


def draw_images(n: int, seed: int, noise: float = 0.35) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels_N = torch.randint(0, K, (n,), generator=generator)
    images_NCHW = PATTERNS_KCHW[labels_N] + noise * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    return images_NCHW.clamp(-1, 1), labels_N


TRAIN = draw_images(600, seed=1)


@pytest.fixture(scope="module")
def evaluator() -> FrechetEvaluator:
    return FrechetEvaluator(*TRAIN, draw_images(400, seed=2)[0], K, seed=0, epochs=6, num_splits=50)


def test_classifier_learns_separable_classes_and_is_deterministic(evaluator):
    classifier, accuracy = train_feature_classifier(*TRAIN, K, epochs=6, seed=0)
    assert accuracy > 0.9
    assert accuracy == evaluator.classifier_accuracy  # the evaluator trained its own with the same seed
    theirs = evaluator.classifier.state_dict()
    for name, weight in classifier.state_dict().items():
        assert torch.equal(weight, theirs[name]), name
    images_NCHW = TRAIN[0][:5]
    assert classifier.features(images_NCHW).shape == (5, classifier.feature_dim)
    assert classifier(images_NCHW).shape == (5, K)
    other, _ = train_feature_classifier(*TRAIN, K, epochs=1, seed=1)
    assert not torch.equal(other.head.weight, classifier.head.weight)


def test_evaluator_ranks_a_fresh_draw_above_a_shifted_one(evaluator):
    fresh_NCHW, fresh_N = draw_images(400, seed=3)
    same = evaluator.evaluate(fresh_NCHW, fresh_N)
    noise_NCHW = torch.randn(fresh_NCHW.shape, generator=torch.Generator().manual_seed(4))
    shifted = evaluator.evaluate((fresh_NCHW + 0.3 + 0.3 * noise_NCHW).clamp(-1, 1), fresh_N)
    assert set(same) == {"fd", "fd_stderr", "classifier_accuracy_on_generated"}
    assert 5 * same["fd"] < shifted["fd"]
    for metrics in (same, shifted):
        assert 0 < metrics["fd_stderr"] < math.inf
    assert same["classifier_accuracy_on_generated"] > 0.9
    assert evaluator.evaluate(fresh_NCHW, (fresh_N + 1) % K)["classifier_accuracy_on_generated"] < 0.3
    assert evaluator.evaluate(fresh_NCHW, fresh_N) == same  # deterministic
    assert "classifier_accuracy_on_generated" not in evaluator.evaluate(fresh_NCHW)
    with pytest.raises(ValueError, match="evaluate"):
        evaluator.evaluate(torch.zeros(4, 1, SIZE + 1, SIZE))


# -- image grids ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_size_and_pixels(tmp_path, channels, mode):
    images_NCHW = -torch.ones(10, channels, SIZE, SIZE)
    images_NCHW[0] = 1.0  # the first image white, the rest black
    path = save_image_grid(images_NCHW, tmp_path / "nested" / "grid.png", nrow=4, padding=2)
    image = Image.open(path)
    scale = 4  # 8x8 images are enlarged to 32x32
    assert image.mode == mode
    assert image.size == (4 * SIZE * scale + 5 * 2, 3 * SIZE * scale + 4 * 2)  # (width, height): 4 cols, 3 rows
    pixels = np.asarray(image).reshape(image.size[1], image.size[0], channels)
    assert (pixels[0, 0] == 128).all()  # the padding is mid-gray
    assert (pixels[2:2 + 32, 2:2 + 32] == 255).all()  # the first cell
    assert (pixels[2:2 + 32, 36:36 + 32] == 0).all()  # the second
    assert (pixels[70:70 + 32, 104:104 + 32] == 128).all()  # the last row's empty cells stay padding


def test_save_image_grid_rejects_bad_channels(tmp_path):
    with pytest.raises(ValueError, match="save_image_grid"):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "grid.png")
