"""A judge for any data whose captions name a few classes ("a photo of gravel", "a photo of a cat", ...).

The caption is the label. An RBF support-vector machine reads an image's colour and texture:
    features(x) = [8x8 area-averaged RGB (192), per-channel mean and std (6),
                   per-channel mean |x − blur₃ₓ₃(x)| (3, fine texture), 8-bin histogram of the gray gradient
                   magnitude (8)],  each standardized on the fitting images
It is fitted on the real images of held-out half A, and its ceiling is its accuracy on half B, which it
never saw (``ldm.evaluation.ceiling``): below 0.9 there no reading of generated images is given. The
generated images are those of A's captions, so every class read was a class fitted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image, ImageFilter

from ldm.evaluation.ceiling import ceiling, checked_reading

MAX_CLASSES = 32  # more distinct captions than this are free text, not classes
MIN_PER_CLASS = 4  # a class needs this many held-out pairs on average to be fitted and checked
HINT = "it is fitted on this data's own held-out real images, one class per distinct caption"


def caption_classes(captions: list[str]) -> list[str] | None:
    """The sorted distinct captions when they form classes (2 to MAX_CLASSES of them, at least MIN_PER_CLASS
    pairs per class on average), else None."""
    counts = Counter(captions)
    if not 2 <= len(counts) <= MAX_CLASSES or len(captions) < MIN_PER_CLASS * len(counts):
        return None
    return sorted(counts)


def image_features(images) -> np.ndarray:
    """uint8 [N, H, W, 3] (or PIL images) -> [N, 209] colour and texture features (module docstring)."""
    rows = []
    for image in images:
        picture = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        x = np.asarray(picture, dtype=np.float64) / 255.0
        coarse = np.asarray(picture.resize((8, 8), Image.BOX), dtype=np.float64).ravel() / 255.0
        blurred = np.asarray(picture.filter(ImageFilter.BoxBlur(1)), dtype=np.float64) / 255.0
        gray = x.mean(axis=-1)
        gy, gx = np.gradient(gray)
        histogram = np.histogram(np.hypot(gx, gy), bins=8, range=(0.0, 0.5))[0] / gray.size
        rows.append(np.concatenate([coarse, x.mean(axis=(0, 1)), x.std(axis=(0, 1)),
                                    np.abs(x - blurred).mean(axis=(0, 1)), histogram]))
    return np.stack(rows)


def fit_classifier(images, labels: list[str]):
    """An sklearn pipeline (standardize, RBF SVC) fitted on ``images`` and their class ``labels``."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(C=10.0, gamma="scale")).fit(image_features(images), labels)


def judge_classes(generated, captions: list[str], fit: tuple[list, list[str]], check: tuple[list, list[str]]) -> dict:
    """The class classifier's reading of ``generated`` (made for ``captions``): fitted on ``fit`` (half A's real
    images and captions), its ceiling measured on ``check`` (half B). Withheld below a ceiling of 0.9."""
    classifier = fit_classifier(*fit)
    correct = classifier.predict(image_features(check[0])) == np.asarray(check[1]) if len(check[0]) else []

    def read() -> dict:
        predicted = classifier.predict(image_features(generated))
        wanted = np.asarray(captions)
        hits = predicted == wanted
        return {"accuracy": float(hits.mean()), "num_images": len(captions),
                "per_class_accuracy": {c: float(hits[wanted == c].mean()) for c in sorted(set(captions))}}

    about = {"classifier": f"RBF SVM on colour and texture features, fitted on {len(fit[0])} real held-out images "
                           f"of this data ({len(set(fit[1]))} classes: one per distinct caption)"}
    return checked_reading(ceiling(list(correct)), "class classifier", HINT, read) | about
