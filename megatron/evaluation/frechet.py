"""A Frechet distance between generated and real images, in the feature space of a small CNN trained here.

Shape legend: N images, C channels, H/W pixels, F features, K classes.

This is NOT Inception FID. FID's Inception-v3 weights cannot be downloaded on this machine, so the features
come from `FeatureClassifier`, a small CNN trained in a few seconds on the training images themselves. The
numbers are on a different scale from published FIDs and are only comparable between runs that use the same
classifier: the same training images, labels, seed and hyper-parameters (and the same reference set and
sample count, since the estimator's bias depends on N). Within that scope it ranks generators like FID does:
the distance between two Gaussians fitted to the features, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor


class FeatureClassifier(nn.Module):
    """Three 3x3 convs (two with stride 2), a 2x2 average pool, a dense feature layer and a linear head.

    Pooling to a 2x2 grid rather than to one vector keeps where the strokes are (top vs bottom of a digit),
    which a global average would throw away; the adaptive pool takes any input of at least 1x1 pixels.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim

    def features(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, [N, F]: the space the Frechet distance is measured in."""
        return self.body(x_NCHW)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_NCHW))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Runs the classifier on one intra-op thread, then restores the caller's setting.

    Its convolutions are too small to gain from threads, and on a busy 2-core machine two contending threads
    made training 10-40x slower (0.4 s against 15-28 s for tests/unit/test_frechet.py's classifier). One thread
    also fixes the order of every reduction, so the classifier and the FD do not depend on the caller's
    thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_images(where: str, images_NCHW: torch.Tensor, labels_N: torch.Tensor | None = None,
                  num_classes: int | None = None) -> None:
    if not isinstance(images_NCHW, torch.Tensor) or images_NCHW.dim() != 4 or not images_NCHW.is_floating_point():
        shape = tuple(images_NCHW.shape) if hasattr(images_NCHW, "shape") else type(images_NCHW).__name__
        raise ValueError(f"{where}: images must be a float tensor [N, C, H, W], got {shape}")
    if labels_N is None:
        return
    if labels_N.shape != (images_NCHW.shape[0],) or labels_N.is_floating_point():
        raise ValueError(f"{where}: labels must be an integer tensor [{images_NCHW.shape[0]}], "
                         f"got {labels_N.dtype} {tuple(labels_N.shape)}")
    if num_classes is not None and len(labels_N) and (labels_N.min() < 0 or labels_N.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got [{int(labels_N.min())}, "
                         f"{int(labels_N.max())}]")


@torch.no_grad()
@_one_thread()
def _classifier_outputs(classifier: FeatureClassifier, images_NCHW: torch.Tensor,
                        batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, F], logits [N, K]) in eval mode, in batches; the model's train/eval mode is restored."""
    was_training = classifier.training
    classifier.eval()
    features, logits = [], []
    for start in range(0, images_NCHW.shape[0], batch_size):
        f_NF = classifier.features(images_NCHW[start:start + batch_size])
        features.append(f_NF)
        logits.append(classifier.head(f_NF))
    classifier.train(was_training)
    return torch.cat(features), torch.cat(logits)


@_one_thread()
@torch.enable_grad()  # also when called from an evaluation under no_grad
def train_feature_classifier(images_NCHW: torch.Tensor, labels_N: torch.Tensor, num_classes: int,
                             epochs: int = 12, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                             holdout_fraction: float = 0.1, feature_dim: int = 64,
                             width: int = 32) -> tuple[FeatureClassifier, float]:
    """Trains a `FeatureClassifier` on all but a held-out `holdout_fraction` of the images; returns it and
    its accuracy on the held-out part.

    Deterministic for a given seed: the split, the initialisation and the batch order all come from
    generators seeded here, and the global torch RNG is left as it was. AdamW with a cosine-decayed learning
    rate; no augmentation, so the features stay sensitive to misplaced or blurred strokes.
    """
    _check_images("train_feature_classifier", images_NCHW, labels_N, num_classes)
    n = images_NCHW.shape[0]
    n_holdout = int(round(n * holdout_fraction))
    if not 0 <= holdout_fraction < 1 or n - n_holdout < 1:
        raise ValueError(f"train_feature_classifier: holdout_fraction {holdout_fraction} must be in [0, 1) and "
                         f"leave training images out of {n}")
    images_NCHW, labels_N = images_NCHW.float().cpu(), labels_N.long().cpu()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    holdout, train = order[:n_holdout], order[n_holdout:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = FeatureClassifier(images_NCHW.shape[1], num_classes, width=width, feature_dim=feature_dim)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * steps_per_epoch, 1))
    classifier.train()
    for _ in range(epochs):
        shuffled = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(shuffled), batch_size):
            index_B = shuffled[start:start + batch_size]
            loss = F.cross_entropy(classifier(images_NCHW[index_B]), labels_N[index_B])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    classifier.eval()
    if n_holdout == 0:
        return classifier, float("nan")
    _, logits_NK = _classifier_outputs(classifier, images_NCHW[holdout])
    return classifier, float((logits_NK.argmax(dim=1) == labels_N[holdout]).double().mean())


def _float64(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else np.asarray(x), dtype=torch.float64,
                           device="cpu")


def _statistics(f_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu_F = f_NF.mean(dim=0)
    centred_NF = f_NF - mu_F
    return mu_F, centred_NF.T @ centred_NF / (f_NF.shape[0] - 1)


@_one_thread()
def feature_statistics(features_NF: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], unbiased covariance [F, F]) in float64, the Gaussian the Frechet distance compares."""
    f_NF = _float64(features_NF)
    if f_NF.dim() != 2 or f_NF.shape[0] < 2:
        raise ValueError(f"feature_statistics: features must be [N >= 2, F], got {tuple(f_NF.shape)}")
    mu_F, sigma_FF = _statistics(f_NF)
    return mu_F.numpy(), sigma_FF.numpy()


def _psd_sqrt(sigma_FF: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance; eigenvalues rounded below zero count as zero."""
    eigvals, eigvecs = torch.linalg.eigh((sigma_FF + sigma_FF.T) / 2)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def _frechet_from_sqrt(mu1: torch.Tensor, sigma1: torch.Tensor, sqrt_sigma1: torch.Tensor, mu2: torch.Tensor,
                       sigma2: torch.Tensor) -> float:
    """Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): the second matrix is symmetric PSD, so its
    eigenvalues are real and a symmetric eigensolver gives them stably (no complex sqrtm, no S1 inverse)."""
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = float(diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * trace_sqrt)
    return max(value, 0.0)  # a distance; only float rounding takes it below zero


@_one_thread()
def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the squared 2-Wasserstein distance between two
    Gaussians, in float64 (numpy arrays or tensors)."""
    mu1, mu2, sigma1, sigma2 = _float64(mu1), _float64(mu2), _float64(sigma1), _float64(sigma2)
    f = mu1.shape[0] if mu1.dim() == 1 else -1
    if mu1.shape != mu2.shape or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"frechet_distance: expected means [F] and covariances [F, F] of one F, got "
                         f"{[tuple(x.shape) for x in (mu1, sigma1, mu2, sigma2)]}")
    return _frechet_from_sqrt(mu1, sigma1, _psd_sqrt(sigma1), mu2, sigma2)


@_one_thread()
def frechet_distance_with_error(features_generated: ArrayLike, features_reference: ArrayLike,
                                num_splits: int = 100, seed: int = 0) -> tuple[float, float]:
    """(FD of all generated vs all reference features, its bootstrap standard error).

    The error estimator: `num_splits` bootstrap resamples of the generated features (N drawn with
    replacement, from a generator seeded by `seed`), each scored against the fixed reference statistics;
    the standard error is the standard deviation (ddof 1) of those FDs. It measures how much the FD would
    move with another draw of the same number of generated samples; the reference set's own sampling error
    is not included. The FD estimator is biased upward at finite N (the bias shrinks roughly as 1/N) and the
    bootstrap does not correct that, so compare FDs computed from the same number of samples.
    """
    gen_NF, ref_NF = _float64(features_generated), _float64(features_reference)
    shapes_ok = gen_NF.dim() == ref_NF.dim() == 2 and gen_NF.shape[1] == ref_NF.shape[1]
    if not shapes_ok or min(len(gen_NF), len(ref_NF)) < 2:
        raise ValueError(f"frechet_distance_with_error: expected features [N >= 2, F] of one F, got "
                         f"{tuple(gen_NF.shape)} and {tuple(ref_NF.shape)}")
    if num_splits < 2:
        raise ValueError(f"frechet_distance_with_error: num_splits must be >= 2, got {num_splits}")
    mu_ref, sigma_ref = _statistics(ref_NF)
    sqrt_ref = _psd_sqrt(sigma_ref)  # computed once: every resample is measured against the same reference

    def fd_against_reference(f_NF: torch.Tensor) -> float:
        return _frechet_from_sqrt(mu_ref, sigma_ref, sqrt_ref, *_statistics(f_NF))

    generator = torch.Generator().manual_seed(seed)
    n = gen_NF.shape[0]
    resampled = [fd_against_reference(gen_NF[torch.randint(0, n, (n,), generator=generator)])
                 for _ in range(num_splits)]
    return fd_against_reference(gen_NF), float(np.std(resampled, ddof=1))


class FrechetEvaluator:
    """Scores generated images against a reference set, with a classifier trained once on the training set.

    Built once per run; `evaluate` is deterministic (eval-mode features, seeded bootstrap), so two calls on
    the same samples return the same numbers. `classifier_accuracy` is the classifier's accuracy on its own
    held-out split (NaN when the classifier is passed in). The reference set should not be the classifier's
    training images: the classifier's features of images it was fitted to are more extreme than of new
    ones, which would count against any generator that does not memorise them.
    """

    def __init__(self, train_images_NCHW: torch.Tensor, train_labels_N: torch.Tensor,
                 reference_images_NCHW: torch.Tensor, num_classes: int, seed: int = 0,
                 classifier: FeatureClassifier | None = None, epochs: int = 12, num_splits: int = 100):
        _check_images("FrechetEvaluator", train_images_NCHW, train_labels_N, num_classes)
        _check_images("FrechetEvaluator reference", reference_images_NCHW)
        if reference_images_NCHW.shape[1:] != train_images_NCHW.shape[1:] or len(reference_images_NCHW) < 2:
            raise ValueError(f"FrechetEvaluator: expected at least 2 reference images of the training images' "
                             f"shape {tuple(train_images_NCHW.shape[1:])}, got {tuple(reference_images_NCHW.shape)}")
        self.seed, self.num_splits, self.num_classes = seed, num_splits, num_classes
        self.image_shape = tuple(train_images_NCHW.shape[1:])
        if classifier is None:
            classifier, accuracy = train_feature_classifier(train_images_NCHW, train_labels_N, num_classes,
                                                            epochs=epochs, seed=seed)
        else:
            accuracy = float("nan")
        self.classifier, self.classifier_accuracy = classifier.eval(), accuracy
        self.reference_features_NF = self.features(reference_images_NCHW)
        self.mu_ref, self.sigma_ref = feature_statistics(self.reference_features_NF)

    def features(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """Classifier features of images clipped to [-1, 1], as they would be when saved as pixels."""
        return _classifier_outputs(self.classifier, images_NCHW.float().cpu().clamp(-1, 1))[0]

    def evaluate(self, images_NCHW: torch.Tensor, labels_N: torch.Tensor | None = None) -> dict[str, float]:
        """{"fd", "fd_stderr"} and, given the labels the samples were conditioned on,
        "classifier_accuracy_on_generated": how often the classifier recognises the intended class."""
        _check_images("FrechetEvaluator.evaluate", images_NCHW, labels_N, self.num_classes)
        if tuple(images_NCHW.shape[1:]) != self.image_shape or images_NCHW.shape[0] < 2:
            raise ValueError(f"FrechetEvaluator.evaluate: expected at least 2 images of shape {self.image_shape}, "
                             f"got {tuple(images_NCHW.shape)}")
        images_NCHW = images_NCHW.float().cpu().clamp(-1, 1)
        features_NF, logits_NK = _classifier_outputs(self.classifier, images_NCHW)
        fd, stderr = frechet_distance_with_error(features_NF, self.reference_features_NF, self.num_splits,
                                                 seed=self.seed)
        metrics = {"fd": fd, "fd_stderr": stderr}
        if labels_N is not None:
            correct = logits_NK.argmax(dim=1) == labels_N.cpu().long()
            metrics["classifier_accuracy_on_generated"] = float(correct.double().mean())
        return metrics
