"""A digit classifier for generated digits: what the shapes judge is for shapes.

An RBF support-vector machine (scikit-learn ``SVC``) on the 8x8 ink map of an image: grayscale,
area-averaged down to 8x8, ink = 16 · (1 − gray / 255), the scale of ``load_digits``. It is fitted
on real digits rendered at the evaluated resolution exactly as ``ldm data digits`` writes them and
read back through the same function, so it reads what a generator of those images should draw.
Every fourth digit (index % 4 == 0, 450 of 1,797) is never fitted: the accuracy on those is
reported with every evaluation as the classifier's own accuracy on held-out real digits (~0.99).
Fitting takes well under a second and is deterministic, so no weights are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ldm.data.digits import INK_LEVELS, NAMES, load_digits, render_digit


def digit_features(images) -> np.ndarray:
    """Images ([N, H, W, 3] uint8 array or PIL images) -> [N, 64] ink maps on the 0-16 scale."""
    rows = []
    for image in images:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        gray = np.asarray(pil.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
        rows.append(INK_LEVELS * (1.0 - gray / 255.0))
    return np.stack(rows).reshape(len(rows), 64)


@dataclass(frozen=True)
class DigitClassifier:
    model: object  # a fitted sklearn SVC
    size: int  # the resolution its training images were rendered at
    heldout_accuracy: float  # on the real digits it never saw (index % 4 == 0)

    def predict(self, images) -> np.ndarray:
        return self.model.predict(digit_features(images))


@lru_cache(maxsize=4)
def fit_digit_classifier(size: int = 32) -> DigitClassifier:
    """Fit on 3/4 of the real digits rendered at ``size`` px; score on the other quarter."""
    from sklearn.svm import SVC

    scans, labels = load_digits()
    features = digit_features([render_digit(scan, size) for scan in scans])
    heldout = np.arange(len(scans)) % 4 == 0
    model = SVC(C=10.0, gamma="scale").fit(features[~heldout], labels[~heldout])
    accuracy = float((model.predict(features[heldout]) == labels[heldout]).mean())
    return DigitClassifier(model, size, accuracy)


def classify_digits(images, labels: list[int], size: int | None = None) -> dict:
    """Accuracy of the classifier's reading of each image against the digit it should show."""
    images = list(images)
    size = size or (images[0].width if isinstance(images[0], Image.Image) else np.asarray(images[0]).shape[1])
    classifier = fit_digit_classifier(size)
    predicted = classifier.predict(images)
    labels_array = np.asarray(labels)
    correct = predicted == labels_array
    per_digit = {NAMES[d]: float(correct[labels_array == d].mean()) for d in sorted(set(labels))}
    return {"accuracy": float(correct.mean()), "per_digit_accuracy": per_digit, "num_images": len(images),
            "classifier": f"RBF SVM on 8x8 ink maps, fitted on 1,347 real digits at {size} px",
            "classifier_heldout_real_accuracy": classifier.heldout_accuracy}
