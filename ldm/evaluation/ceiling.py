"""Judges that check themselves: a judge reads real held-out images before it reads generated ones.

    ceiling = (1/N) Σ_i 1[judge(x_i) = c_i]     over N real held-out images x_i and their captions c_i
    reading = the judge's accuracy on generated images    if ceiling ≥ 0.9, else withheld (null + reason)

A built-in judge (the shapes judge, the digit classifier) knows one kind of data. On other data (another
digit style, a palette it does not know, noise) its accuracy on generated images measures the judge, not
the generator, so below ``MIN_REAL_ACCURACY`` on the data's own real images no number is given: the
reading's ``accuracy`` is None and ``withheld`` says why. The ceiling is reported beside every reading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)
MIN_REAL_ACCURACY = 0.9


def ceiling(correct: Sequence[bool]) -> dict:
    """{"real_accuracy": mean of ``correct`` (None when empty), "real_images": N}."""
    return {"real_accuracy": float(np.mean(correct)) if len(correct) else None, "real_images": len(correct)}


def withheld_reason(limit: dict, judge: str, hint: str) -> str | None:
    """None when ``judge`` may read generated images (ceiling ≥ 0.9), else the sentence that says why not."""
    n, accuracy = limit["real_images"], limit["real_accuracy"]
    if n == 0:
        return f"the {judge} could not be checked: there are no real held-out images to check it on ({hint})"
    if accuracy < MIN_REAL_ACCURACY:
        return (f"the {judge} cannot read this data: it reads only {accuracy:.2f} of {n} real held-out images "
                f"correctly (at least {MIN_REAL_ACCURACY:.2f} is needed), so its reading of the generated images "
                f"would measure the judge, not the model ({hint})")
    return None


def checked_reading(limit: dict, judge: str, hint: str, read: Callable[[], dict]) -> dict:
    """``read()`` (the reading of generated images, with its ``accuracy``) beside the ceiling ``limit``; or,
    below the threshold, ``accuracy`` None and ``withheld`` (the reason); ``read`` is then not called."""
    reason = withheld_reason(limit, judge, hint)
    if reason is not None:
        logger.warning("withheld: %s", reason)
        return {"accuracy": None, "withheld": reason} | limit
    return read() | limit


def ceiling_text(reading: dict) -> str:
    """"0.99 on 250 real held-out images" (the report's words for a reading's ceiling)."""
    accuracy = reading.get("real_accuracy")
    value = "n/a" if accuracy is None else f"{accuracy:.2f}"
    return f"{value} on {reading.get('real_images', 0)} real held-out images"
