"""Multi-caption (COCO-style) data: what ``sanitize`` does to clean pairs and to a targeted attack.

Data: scikit-learn's digits (``otcclip.models.datasets.digits_manifest``, train split).
The first ``--images`` images each go on 5 rows with 5 distinct correct captions of
their digit (5 of the 6 digit templates, drawn per image). Variants:

- ``clean``: only those rows;
- ``+burst``: plus one unseen test-split image on 25 rows under 11 distinct captions of
  another digit (the 6 digit templates and 5 more, in turn);
- ``+poison N``: ``otcclip poison --attack targeted --n-poison N --n-targets 1`` on the
  clean set (the 12 default caption templates, drawn at random per row).

Model: ``otc-micro`` trained ``--epochs`` epochs with no defence on the whole train split
(one caption per image). Printed per variant: pairs, clean pairs changed (reassigned or
dropped) and why, poisoned pairs dropped, pairs marked for review.

Usage::

    .venv/bin/python bench/multi_caption.py [--work DIR] [--images 300] [--epochs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

EXTRA = ("a picture of the digit {}.", "the handwritten number {}.", "a {} drawn with a pen.",
         "digit {} on white paper.", "a sketch of the number {}.")


def build(work: Path, n_images: int) -> tuple[Path, Path, Path]:
    """Write the digits splits and the clean and +burst multi-caption manifests."""
    from otcclip.models.datasets import DIGIT_TEMPLATES, digits_manifest

    base = digits_manifest(work / "base", split="train", seed=0)
    test = digits_manifest(work / "test", split="test", seed=0)
    rng = random.Random(1)
    rows = []
    for r in list(csv.DictReader(base.open()))[:n_images]:
        for j, t in enumerate(rng.sample(DIGIT_TEMPLATES, 5)):
            rows.append({"id": f"{r['id']}-c{j}", "image": "base/" + r["image"], "caption": t.format(r["label"]),
                         "label": r["label"], "poison": 0})
    target = next(iter(csv.DictReader(test.open())))
    adv = "seven" if target["label"] != "seven" else "three"
    texts = [t.format(adv) for t in DIGIT_TEMPLATES + EXTRA]
    burst = [{"id": f"burst-{j}", "image": "test/" + target["image"], "caption": texts[j % len(texts)],
              "label": adv, "poison": 1} for j in range(25)]
    out = []
    for name, extra in (("clean", []), ("burst", burst)):
        rs = rows + extra
        random.Random(2).shuffle(rs)
        path = work / f"{name}.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rs[0]))
            w.writeheader()
            w.writerows(rs)
        out.append(path)
    return out[0], out[1], test


def otcclip(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "otcclip", *args], check=True, capture_output=True, text=True).stdout


def tally(decisions: Path, poisoned: dict[str, bool]) -> dict[str, object]:
    import pyarrow.parquet as pq

    d = pq.read_table(decisions).to_pylist()
    clean_changed = collections.Counter(f"{r['action']}/{r['reason']}" for r in d
                                        if not poisoned[r["id"]] and r["action"] != "keep")
    n_clean = sum(not poisoned[r["id"]] for r in d)
    n_poison = sum(poisoned[r["id"]] for r in d)
    return {"pairs": len(d), "clean_changed": sum(clean_changed.values()), "n_clean": n_clean,
            "why": dict(clean_changed), "poison_dropped": sum(poisoned[r["id"]] and r["action"] == "drop" for r in d),
            "n_poison": n_poison, "review": sum(bool(r["review"]) for r in d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(".otcclip/bench-multi-caption"))
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    clean, burst, test = build(a.work, a.images)
    ckpt = a.work / "run" / "final"
    if not ckpt.exists():
        otcclip("train", str(a.work / "base" / "manifest.csv"), "--out", str(a.work / "run"), "--model", "otc-micro",
                "--defence", "none", "--epochs", str(a.epochs), "--batch-size", "128", "--lr", "1e-3",
                "--device", "cpu", "--no-progress")
    variants: list[tuple[str, Path, dict[str, bool]]] = []
    for name, path in (("clean", clean), ("+burst (25 rows, 11 texts)", burst)):
        variants.append((name, path, {r["id"]: r["poison"] == "1" for r in csv.DictReader(path.open())}))
    for n in (25, 100):
        out = a.work / f"poison{n}"
        if not out.exists():
            otcclip("poison", str(clean), "--attack", "targeted", "--target-class", "seven", "--n-poison", str(n),
                    "--n-targets", "1", "--targets-from", str(test), "--out", str(out))
        truth = {r["id"]: r["poisoned"] in ("1", "true", "True") for r in csv.DictReader((out / "poison_truth.csv").open())}
        variants.append((f"+poison {n} (targeted, 12 templates)", out / clean.name, truth))
    print(f"\nmulti-caption digits: {a.images} images x 5 captions, otc-micro {a.epochs} epochs (no defence)\n")
    print("| set | pairs | clean pairs changed | why | poisoned pairs dropped | marked for review | verdict |")
    print("|---|---|---|---|---|---|---|")
    for name, path, truth in variants:
        out = a.work / ("out-" + "".join(c for c in name if c.isalnum()))
        summary = json.loads(otcclip("sanitize", str(path), "--checkpoint", str(ckpt), "--out", str(out),
                                     "--device", "cpu", "--no-progress", "--json"))
        verdict = json.loads((out / "report.json").read_text())["model_quality"]["verdict"]
        t = tally(out / "decisions.parquet", truth)
        why = ", ".join(f"{k} {v}" for k, v in sorted(t["why"].items())) or "-"  # type: ignore[attr-defined]
        print(f"| {name} | {summary['pairs']} | {t['clean_changed']} of {t['n_clean']} | {why} | "
              f"{t['poison_dropped']} of {t['n_poison']} | {t['review']} | {verdict} |")
    print(f"\n{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
