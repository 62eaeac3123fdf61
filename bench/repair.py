"""Repair benchmark: how well the sanitizer re-pairs swapped captions, OT-fused against global-only.

Data (``--dataset``): CIFAR-10 (the default; ``../shared/data/cifar10-jpg.zip``, read
through :func:`otcclip.models.datasets.cifar10_manifest`) or scikit-learn's 8x8 digits
(``digits``: :func:`otcclip.models.datasets.digits_manifest`, the demo's data, 16 px).
Models: trained from scratch (plain CLIP) on a training slice of correct captions, at
two strengths (a weak and a strong model; epochs in the table): ``otc-tiny`` on CIFAR-10,
the demo's ``otc-micro`` (batch 64, lr 2e-3) on digits. Evaluation sets: a disjoint slice (CIFAR-10:
other images of the train split; digits: the held-out split of ``--seed``, 450 images),
once with every caption correct and once with a share of the captions swapped to a
caption of another class (a caption generated for a uniformly drawn other class, so
swapped pairs have a known true class).

Each model encodes each set once; the match stage runs twice on the same features and
the same shortlist (``k`` nearest captions by global cosine, which does not depend on
``alpha``): with the engine's fused score (``alpha`` of the default settings) and with
global scores only (``alpha=1``, the RoCLIP/SafeCLIP-style re-pairing). Decisions use
the default :class:`~otcclip.models.config.DecisionSettings`.

Printed per run:

- false change rate: share of correctly captioned pairs re-assigned or dropped, and of
  those the share the ``duplicates`` check dropped (``keep_one``: near-identical images,
  not a verdict on the caption);
- re-assignment precision: share of re-assignments whose new caption names the image's
  class;
- recall: share of swapped pairs re-assigned to a caption of the image's class;
- drop rate: share of all pairs dropped; review: pairs kept for review;
- the model-quality verdict of the run.

Each variant runs with the decision step abstaining (``abstain`` on, the default) and
acting on every proposal (off): the second shows what the model's scores alone would
have changed.

Usage::

    .venv/bin/python bench/repair.py --quick [--work DIR] [--threads 2]
    .venv/bin/python bench/repair.py --dataset digits [--seed 2] [--reasons]   # about a minute on one core

``--work`` caches the data slices and trained models (re-runs skip training).
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ZIP = REPO.parent / "shared" / "data" / "cifar10-jpg.zip"


@dataclass(frozen=True)
class Size:
    """Sizes of one benchmark configuration (``*_per_class`` are unused for digits, whose
    slices are :func:`~otcclip.models.datasets.digits_manifest`'s fixed split)."""

    train_per_class: int
    eval_per_class: int
    weak_epochs: int
    strong_epochs: int
    swap: float
    weak_lr: float = 5e-4
    strong_lr: float = 2e-3
    dataset: str = "cifar10"
    model: str = "otc-tiny"
    batch_size: int = 128


QUICK = Size(train_per_class=200, eval_per_class=50, weak_epochs=3, strong_epochs=15, swap=0.1)
FULL = Size(train_per_class=1000, eval_per_class=200, weak_epochs=3, strong_epochs=30, swap=0.1)
#: The demo's data and model: 1,347 training and 450 evaluation digits (split by ``--seed``).
DIGITS = Size(train_per_class=0, eval_per_class=0, weak_epochs=3, strong_epochs=30, swap=0.1, weak_lr=2e-3,
              strong_lr=2e-3, dataset="digits", model="otc-micro", batch_size=64)


def classes_of(size: Size) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(class names, caption templates)`` of the benchmark's dataset."""
    from otcclip.models.datasets import (
        CAPTION_TEMPLATES,
        CIFAR10_CLASSES,
        DIGIT_CLASSES,
        DIGIT_TEMPLATES,
    )

    return (DIGIT_CLASSES, DIGIT_TEMPLATES) if size.dataset == "digits" else (CIFAR10_CLASSES, CAPTION_TEMPLATES)


def train_manifest(work: Path, size: Size, seed: int) -> Path:
    """The training slice's manifest (written on first use)."""
    from otcclip.models.datasets import cifar10_manifest, digits_manifest

    if size.dataset == "digits":
        data = work / f"digits-train-s{seed}"
        man = data / "manifest.csv"
        return man if man.exists() else digits_manifest(data, split="train", seed=seed)
    data = work / f"train-{size.train_per_class}pc-s{seed}"
    man = data / "manifest.csv"
    return man if man.exists() else cifar10_manifest(ZIP, data, split="train", per_class=size.train_per_class, seed=seed)


def train_model(work: Path, size: Size, epochs: int, lr: float, seed: int, *, device: str = "cpu") -> Path:
    """Train (or reuse) a model (``size.model``) on correct captions; returns its checkpoint."""
    from otcclip.models.config import TrainConfig
    from otcclip.models.manifest import read_manifest
    from otcclip.models.training import train

    if size.dataset == "digits":
        run = work / f"model-digits-{size.model}-e{epochs}-lr{lr:g}-b{size.batch_size}-s{seed}"
    else:
        run = work / f"model-tiny-{size.train_per_class}pc-e{epochs}-s{seed}" if lr == 5e-4 else (
            work / f"model-tiny-{size.train_per_class}pc-e{epochs}-lr{lr:g}-s{seed}")
    done = run / "DONE"
    if done.exists():
        return Path(done.read_text().strip())
    man = read_manifest(train_manifest(work, size, seed))
    t0 = time.perf_counter()
    res = train(man, run, config=TrainConfig(model=size.model, defence="none", epochs=epochs,
                                             batch_size=size.batch_size, lr=lr, device=device, seed=seed))
    print(f"trained {size.model} for {epochs} epochs (lr {lr:g}) on {len(man)} pairs in {time.perf_counter() - t0:.0f} s")
    done.write_text(str(res.final_checkpoint))
    return Path(res.final_checkpoint)


def eval_sets(work: Path, size: Size, seed: int) -> dict[str, tuple[Path, np.ndarray, list[str]]]:
    """The clean evaluation slice and its swapped copy: ``{name: (manifest, swapped, labels)}``."""
    from otcclip.models.datasets import cifar10_manifest, digits_manifest, make_caption

    classes, templates = classes_of(size)
    if size.dataset == "digits":
        data = work / f"digits-eval-s{seed}"
        clean = data / "manifest.csv"
        if not clean.exists():
            clean = digits_manifest(data, split="test", seed=seed)
    else:
        data = work / f"eval-{size.eval_per_class}pc-s{seed}"
        clean = data / "manifest.csv"
        if not clean.exists():
            clean = cifar10_manifest(ZIP, data, split="train", per_class=size.eval_per_class, seed=seed,
                                     offset=size.train_per_class)
    with clean.open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [r["label"] for r in rows]
    out = {"clean": (clean, np.zeros(len(rows), dtype=bool), labels)}
    rng = random.Random(seed + 1)
    n_swap = int(round(size.swap * len(rows)))
    swapped = np.zeros(len(rows), dtype=bool)
    swapped[rng.sample(range(len(rows)), n_swap)] = True
    new_rows = []
    for r, s in zip(rows, swapped.tolist(), strict=True):
        if s:
            other = rng.choice([c for c in classes if c != r["label"]])
            r = {**r, "caption": make_caption(other, rng, templates=templates)}
        new_rows.append(r)
    path = data / f"manifest-swap{int(100 * size.swap)}.csv"
    if not path.exists():
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(new_rows)
    out[f"swap{int(100 * size.swap)}"] = (path, swapped, labels)
    return out


def caption_class(caption: str, classes: tuple[str, ...]) -> str:
    """The class a generated caption names."""
    words = caption.rstrip(".").split()
    return next((c for c in classes if c in words), "")


def evaluate(manifest_path: Path, swapped: np.ndarray, labels: list[str], checkpoint: Path, *,
             classes: tuple[str, ...], device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Run the engine with fused and global-only scores on one set, each with the decision
    step abstaining (the default) and acting on every proposal; metrics per variant
    (``reasons``: the changed clean pairs per ``action/reason``)."""
    from otcclip.models.checkpoint import load_checkpoint
    from otcclip.models.config import SanitizeConfig
    from otcclip.models.manifest import read_manifest
    from otcclip.models.sanitize import build_caption_index, decide, encode_shard, match_shard

    man = read_manifest(manifest_path)
    bundle = load_checkpoint(checkpoint, device=device)
    base = SanitizeConfig(device=device, shard_size=max(len(man), 4))
    feats = encode_shard(man, bundle, 0, len(man), config=base)
    cidx = build_caption_index([feats], config=base)
    caps = man.captions
    out: dict[str, dict[str, Any]] = {}
    off = replace(base.decisions, abstain=False)
    runs = []
    for name, cfg in (("OT-fused", base), ("global-only", replace(base, alpha=1.0))):
        sc = match_shard(feats, cidx, config=cfg)
        runs.append((name, "on", sc, cfg))
        runs.append((name, "off", sc, replace(cfg, decisions=off)))
    for name, abstain, sc, cfg in runs:
        d = decide([sc], config=cfg)
        act = d.action
        re = act == "reassign"
        new_cls = np.array([caption_class(caps[j], classes) if j >= 0 else "" for j in d.new_caption_index.tolist()])
        right = new_cls == np.array(labels)
        clean = ~swapped
        changed = act != "keep"
        q = d.model_quality
        reasons: dict[str, int] = {}
        for a_, r_ in zip(act[changed & clean].tolist(), d.reason[changed & clean].tolist(), strict=True):
            reasons[f"{a_}/{r_}"] = reasons.get(f"{a_}/{r_}", 0) + 1
        out[f"{name}|{abstain}"] = {
            "pairs": len(man),
            "false_change": float(changed[clean].mean()) if clean.any() else float("nan"),
            "dup_drop": float((d.reason == "duplicate")[clean].mean()) if clean.any() else float("nan"),
            "precision": float(right[re].mean()) if re.any() else float("nan"),
            "reassigned": int(re.sum()),
            "recall": float((re & right)[swapped].mean()) if swapped.any() else float("nan"),
            "drop": float((act == "drop").mean()),
            "review": int(d.review.sum()),
            "verdict": q.get("verdict", ""),
            "auc": q.get("control_auc", float("nan")) if q else float("nan"),
            "d_prime": q.get("control_d_prime", float("nan")) if q else float("nan"),
            "reasons": dict(sorted(reasons.items())),
        }
    return out


def fmt(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f} %"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("cifar10", "digits"), default="cifar10",
                    help="cifar10 (default; --quick for the CPU size) or digits (the demo's data and model)")
    ap.add_argument("--quick", action="store_true", help="CPU size (about 6 minutes on 2 cores, trained models cached)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/otcclip-bench-repair"))
    ap.add_argument("--seed", type=int, default=0, help="seeds the slices, the swaps and training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (training and sanitizing)")
    ap.add_argument("--train-only", action="store_true", help="only train (or find) the models")
    ap.add_argument("--reasons", action="store_true", help="also print the changed clean pairs per action/reason")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dataset == "digits":
        size = DIGITS
    else:
        if not ZIP.exists():
            print(f"{ZIP} missing")
            return 2
        size = QUICK if args.quick else FULL
    classes, _ = classes_of(size)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = {f"weak ({size.weak_epochs} ep, lr {size.weak_lr:g})":
              train_model(args.work, size, size.weak_epochs, size.weak_lr, args.seed, device=args.device),
              f"strong ({size.strong_epochs} ep, lr {size.strong_lr:g})":
              train_model(args.work, size, size.strong_epochs, size.strong_lr, args.seed, device=args.device)}
    if args.train_only:
        return 0
    sets = eval_sets(args.work, size, args.seed)
    n_train = sum(1 for _ in train_manifest(args.work, size, args.seed).open()) - 1
    n_eval = len(next(iter(sets.values()))[2])
    print(f"\n{size.model} (batch {size.batch_size}) trained on {n_train} {size.dataset} pairs (seed {args.seed}); evaluated on "
          f"{n_eval} other pairs, {int(100 * size.swap)} % of captions swapped across classes in the swap set\n")
    print("| model | set | scores | abstain | false change (clean pairs) | of which duplicates | re-assign precision | "
          "recall of swapped | drop rate | re-assigned | review | verdict (control AUC, d') |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for mname, ckpt in models.items():
        for sname, (path, swapped, labels) in sets.items():
            for key, r in evaluate(path, swapped, labels, ckpt, classes=classes, device=args.device).items():
                var, abstain = key.split("|")
                print(f"| {mname} | {sname} | {var} | {abstain} | {fmt(r['false_change'])} | {fmt(r['dup_drop'])} | "
                      f"{fmt(r['precision'])} | "
                      f"{fmt(r['recall'])} | {fmt(r['drop'])} | {r['reassigned']} | {r['review']} | "
                      f"{r['verdict'] or '-'} ({r['auc']:.3f}, {r['d_prime']:.1f}) |", flush=True)
                notes.append(f"{mname} | {sname} | {var} | abstain {abstain}: {r['reasons'] or 'none'}")
    if args.reasons:
        print("\nchanged clean pairs per action/reason:")
        for line in notes:
            print(f"- {line}")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
