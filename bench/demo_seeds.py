"""The demo over seeds: `ldm demo --seed S` one after another, each judged by the project's judge (its own
metrics.json) and by the independent CNN of ``shapes_classifier.py``; one table with every run and the worst.

    python bench/demo_seeds.py --out runs/demo-seeds --seeds 0 1 2     # ~10-20 minutes per seed on 2 cores

Run it alone on the machine: the minutes are the demo's own wall clock.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table  # noqa: E402


def run_demo(out: Path, seed: int, extra: list[str]) -> dict:
    """``ldm demo`` in a fresh process (as a user runs it); returns its metrics.json."""
    subprocess.run([sys.executable, "-m", "ldm.cli", "demo", "--out", str(out), "--seed", str(seed), *extra],
                   check=True)
    return json.loads((out / "metrics.json").read_text())


def classifier_readings(pipeline: Path) -> tuple[float, float, float]:
    """(real-image accuracy, guidance 5, guidance 1) of the independent shapes classifier."""
    from bench.shapes_classifier import load_or_train, pipeline_accuracy, real_accuracy
    from ldm.sampling import load_pipeline

    classifier = load_or_train(Path("outputs") / "shapes_classifier.safetensors")
    pipe = load_pipeline(pipeline, scheduler="dpm++")
    return real_accuracy(classifier), pipeline_accuracy(classifier, pipe, 100, 5.0), \
        pipeline_accuracy(classifier, pipe, 100, 1.0)


def row(seed: int, metrics: dict, readings: tuple[float, float, float]) -> list[str]:
    g5, g1 = metrics["judge_guidance_5"], metrics["judge_guidance_1"]
    kinds = " ".join(f"{k[:3]} {v:.2f}" for k, v in sorted(g5["per_kind_accuracy"].items()))
    return [str(seed), f"{metrics['minutes']:.2f}", f"{g5['accuracy']:.2f}", f"{g5['colour_accuracy']:.2f}",
            f"{g5['position_accuracy']:.2f}", kinds, f"{g1['accuracy']:.2f}",
            f"{readings[1]:.2f} / {readings[2]:.2f} (real {readings[0]:.3f})"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo-seeds", help="each seed's demo goes to OUT/seed-S")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--demo-arg", action="append", default=[], help="passed on to `ldm demo` (repeatable)")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        metrics = run_demo(out, seed, args.demo_arg)
        rows.append(row(seed, metrics, classifier_readings(out / "pipeline")))
        print_table(["seed", "minutes", "judge g5", "colour", "position", "per kind", "judge g1",
                     "classifier g5 / g1"], rows)
    worst = min(rows, key=lambda r: float(r[2]))
    print(f"worst judge at guidance 5: {worst[2]} (seed {worst[0]}); longest run {max(float(r[1]) for r in rows):.2f} min")


if __name__ == "__main__":
    main()
