"""A digit classifier for generated digits: what the shapes judge is for shapes.

An RBF support-vector machine (scikit-learn ``SVC``) on the 8x8 ink map of an image: grayscale,
area-averaged down to 8x8, ink = 16 · (1 − gray / 255), the scale of ``load_digits``.

Built in (``fit_digit_classifier``): fitted on real digits rendered at the evaluated resolution exactly
as ``ldm data digits`` writes them; every fourth scan (index % 4 == 0, 450 of 1,797) is never fitted and
its accuracy there is the classifier's own held-out accuracy (~0.99).

On a user's data (``judge_digits``, what ``ldm eval pipeline`` uses) the classifier is checked on that
data's own real images before it reads generated ones (``ldm.evaluation.ceiling``):
    polarity  light ink on dark paper when the median of the real images' one-pixel frames is below
              mid-gray; then every image (real and generated) is inverted, gray -> 255 − gray, before reading
    fit       the scans rendered at the data's resolution, except any that is one of the checked images
              (nearest 8x8 ink map within ``SAME_SCAN``), + the data's own real images of half A
    ceiling   the accuracy on the real images of half B, which nothing was fitted on
Fitting takes about a second and is deterministic, so no weights are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ldm.data.digits import INK_LEVELS, NAMES, load_digits, render_digit
from ldm.evaluation.ceiling import ceiling, checked_reading

SAME_SCAN = 1.0  # ink-map distance (0-16 scale, 64-d) under which a rendered scan is one of the checked images
HINT = ("it is fitted on scikit-learn's 8x8 digit scans and this data's own real images; each image should be "
        "one centred digit, the one its caption names")


def to_arrays(images) -> list[np.ndarray]:
    """[N, H, W, 3] uint8 array or PIL images -> a list of (H, W, 3) uint8 arrays."""
    return [np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
            for image in images]


def digit_features(images, invert: bool = False) -> np.ndarray:
    """Images ([N, H, W, 3] uint8 array or PIL images) -> [N, 64] ink maps on the 0-16 scale.

    ink = 16 · (1 − g / 255), g the 8x8 area average of the gray image (of 255 − gray with ``invert``)."""
    rows = []
    for array in to_arrays(images):
        gray = np.asarray(Image.fromarray(array).convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
        rows.append(INK_LEVELS * (gray / 255.0 if invert else 1.0 - gray / 255.0))
    return np.stack(rows).reshape(len(rows), 64)


def light_ink_on_dark(images) -> bool:
    """True when the median gray of the images' one-pixel frames (the paper) is below mid-gray (127.5)."""
    frames = [np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]) for a in to_arrays(images)]
    return bool(np.median(np.concatenate(frames).mean(axis=-1)) < 127.5)


@dataclass(frozen=True)
class DigitClassifier:
    model: object  # a fitted sklearn SVC
    size: int  # the resolution its training images were rendered at
    heldout_accuracy: float  # on the real digits it never saw (index % 4 == 0)
    invert: bool = False  # the data is light ink on dark paper: images are inverted before reading

    def predict(self, images) -> np.ndarray:
        return self.model.predict(digit_features(images, self.invert))


@lru_cache(maxsize=4)
def scan_features(size: int) -> tuple[np.ndarray, np.ndarray]:
    """([1797, 64] ink maps of the scans rendered at ``size`` px, [1797] labels)."""
    scans, labels = load_digits()
    return digit_features([render_digit(scan, size) for scan in scans]), labels


def _svm():
    from sklearn.svm import SVC

    return SVC(C=10.0, gamma="scale")


@lru_cache(maxsize=4)
def fit_digit_classifier(size: int = 32) -> DigitClassifier:
    """Fit on 3/4 of the real digits rendered at ``size`` px; score on the other quarter."""
    features, labels = scan_features(size)
    heldout = np.arange(len(labels)) % 4 == 0
    model = _svm().fit(features[~heldout], labels[~heldout])
    accuracy = float((model.predict(features[heldout]) == labels[heldout]).mean())
    return DigitClassifier(model, size, accuracy)


def fit_on_data(size: int, fit_images, fit_labels, check_images, invert: bool) -> DigitClassifier:
    """The scans at ``size`` px that are none of ``check_images`` + the data's ``fit_images``, read with ``invert``;
    ``heldout_accuracy`` is NaN here (the caller measures it on ``check_images``)."""
    from sklearn.metrics import pairwise_distances

    features, labels = scan_features(size)
    keep = np.ones(len(labels), dtype=bool)
    if len(check_images):
        nearest = pairwise_distances(features, digit_features(check_images, invert)).min(axis=1)  # (1797,)
        keep = nearest > SAME_SCAN
    if len(fit_images):
        features = np.concatenate([features[keep], digit_features(fit_images, invert)])
        labels = np.concatenate([labels[keep], np.asarray(fit_labels, dtype=np.int64)])
    else:
        features, labels = features[keep], labels[keep]
    return DigitClassifier(_svm().fit(features, labels), size, float("nan"), invert)


def reading(classifier: DigitClassifier, images, labels: list[int]) -> dict:
    """Accuracy of ``classifier``'s reading of each image against the digit it should show (and per digit)."""
    predicted = classifier.predict(images)
    labels_array = np.asarray(labels)
    correct = predicted == labels_array
    per_digit = {NAMES[d]: float(correct[labels_array == d].mean()) for d in sorted(set(labels))}
    return {"accuracy": float(correct.mean()), "per_digit_accuracy": per_digit, "num_images": len(labels)}


def classify_digits(images, labels: list[int], size: int | None = None) -> dict:
    """The built-in classifier's accuracy on ``images`` against the digit each should show."""
    images = list(images)
    size = size or (images[0].width if isinstance(images[0], Image.Image) else np.asarray(images[0]).shape[1])
    classifier = fit_digit_classifier(size)
    return reading(classifier, images, labels) | {
        "classifier": f"RBF SVM on 8x8 ink maps, fitted on 1,347 real digits at {size} px",
        "classifier_heldout_real_accuracy": classifier.heldout_accuracy}


def judge_digits(generated, labels: list[int], fit: tuple[list, list[int]], check: tuple[list, list[int]],
                 size: int) -> dict:
    """The digit classifier's reading of ``generated`` (the digits ``labels`` asked for), checked first on the
    data's real images: fitted with ``fit`` (half A: images, labels), its ceiling measured on ``check`` (half B).
    Below a ceiling of 0.9 the reading is withheld (``ldm.evaluation.ceiling``)."""
    fit_images, check_images = to_arrays(fit[0]), to_arrays(check[0])
    invert = light_ink_on_dark(fit_images + check_images)
    classifier = fit_on_data(size, fit_images, fit[1], check_images, invert)
    correct = classifier.predict(check_images) == np.asarray(check[1]) if check_images else []
    polarity = "light ink on dark: inverted before reading" if invert else "dark ink on light"
    about = {"classifier": f"RBF SVM on 8x8 ink maps at {size} px, fitted on scikit-learn's digit scans (none of "
                           f"the checked images) and {len(fit_images)} real images of this data; {polarity}",
             "polarity": "light_on_dark" if invert else "dark_on_light"}
    return checked_reading(ceiling(list(correct)), "digit classifier", HINT,
                           lambda: reading(classifier, generated, labels)) | about
