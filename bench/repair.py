"""Repair benchmark: how well the sanitizer re-pairs swapped captions, OT-fused against global-only.

Data: CIFAR-10 (``../shared/data/cifar10-jpg.zip``, read through
:func:`otcclip.models.datasets.cifar10_manifest`). Models: ``otc-tiny`` trained from
scratch (plain CLIP) on a training slice of correct captions, at two strengths (a weak
and a stronger model; epochs in the table). Evaluation sets: a disjoint slice of the
train split, once with every caption correct and once with a share of the captions
swapped to a caption of another class (a caption generated for a uniformly drawn other
class, so swapped pairs have a known true class).

Each model encodes each set once; the match stage runs twice on the same features and
the same shortlist (``k`` nearest captions by global cosine, which does not depend on
``alpha``): with the engine's fused score (``alpha`` of the default settings) and with
global scores only (``alpha=1``, the RoCLIP/SafeCLIP-style re-pairing). Decisions use
the default :class:`~otcclip.models.config.DecisionSettings`.

Printed per run:

- false change rate: share of correctly captioned pairs re-assigned or dropped;
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
    """Sizes of one benchmark configuration."""

    train_per_class: int
    eval_per_class: int
    weak_epochs: int
    strong_epochs: int
    swap: float
    weak_lr: float = 5e-4
    strong_lr: float = 2e-3


QUICK = Size(train_per_class=200, eval_per_class=50, weak_epochs=3, strong_epochs=15, swap=0.1)
FULL = Size(train_per_class=1000, eval_per_class=200, weak_epochs=3, strong_epochs=30, swap=0.1)


def train_model(work: Path, size: Size, epochs: int, lr: float, seed: int, *, device: str = "cpu") -> Path:
    """Train (or reuse) an ``otc-tiny`` model on correct captions; returns its checkpoint."""
    from otcclip.models.config import TrainConfig
    from otcclip.models.datasets import cifar10_manifest
    from otcclip.models.manifest import read_manifest
    from otcclip.models.training import train

    run = work / f"model-tiny-{size.train_per_class}pc-e{epochs}-s{seed}" if lr == 5e-4 else (
        work / f"model-tiny-{size.train_per_class}pc-e{epochs}-lr{lr:g}-s{seed}")
    done = run / "DONE"
    if done.exists():
        return Path(done.read_text().strip())
    data = work / f"train-{size.train_per_class}pc-s{seed}"
    man = data / "manifest.csv"
    if not man.exists():
        man = cifar10_manifest(ZIP, data, split="train", per_class=size.train_per_class, seed=seed)
    t0 = time.perf_counter()
    res = train(read_manifest(man), run, config=TrainConfig(model="otc-tiny", defence="none", epochs=epochs,
                                                           batch_size=128, lr=lr, device=device, seed=seed))
    print(f"trained otc-tiny for {epochs} epochs (lr {lr:g}) on {10 * size.train_per_class} pairs in {time.perf_counter() - t0:.0f} s")
    done.write_text(str(res.final_checkpoint))
    return Path(res.final_checkpoint)


def eval_sets(work: Path, size: Size, seed: int) -> dict[str, tuple[Path, np.ndarray, list[str]]]:
    """The clean evaluation slice and its swapped copy: ``{name: (manifest, swapped, labels)}``."""
    from otcclip.models.datasets import CIFAR10_CLASSES, cifar10_manifest, make_caption

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
            other = rng.choice([c for c in CIFAR10_CLASSES if c != r["label"]])
            r = {**r, "caption": make_caption(other, rng)}
        new_rows.append(r)
    path = data / f"manifest-swap{int(100 * size.swap)}.csv"
    if not path.exists():
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(new_rows)
    out[f"swap{int(100 * size.swap)}"] = (path, swapped, labels)
    return out


def caption_class(caption: str) -> str:
    """The CIFAR-10 class a generated caption names."""
    from otcclip.models.datasets import CIFAR10_CLASSES

    words = caption.rstrip(".").split()
    return next((c for c in CIFAR10_CLASSES if c in words), "")


def evaluate(manifest_path: Path, swapped: np.ndarray, labels: list[str], checkpoint: Path, *,
             device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Run the engine with fused and global-only scores on one set, each with the decision
    step abstaining (the default) and acting on every proposal; metrics per variant."""
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
        new_cls = np.array([caption_class(caps[j]) if j >= 0 else "" for j in d.new_caption_index.tolist()])
        right = new_cls == np.array(labels)
        clean = ~swapped
        changed = act != "keep"
        q = d.model_quality
        out[f"{name}|{abstain}"] = {
            "pairs": len(man),
            "false_change": float(changed[clean].mean()) if clean.any() else float("nan"),
            "precision": float(right[re].mean()) if re.any() else float("nan"),
            "reassigned": int(re.sum()),
            "recall": float((re & right)[swapped].mean()) if swapped.any() else float("nan"),
            "drop": float((act == "drop").mean()),
            "review": int(d.review.sum()),
            "verdict": q.get("verdict", ""),
            "auc": q.get("control_auc", float("nan")) if q else float("nan"),
        }
    return out


def fmt(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f} %"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU size (about 6 minutes on 2 cores, trained models cached)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/otcclip-bench-repair"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (training and sanitizing)")
    ap.add_argument("--train-only", action="store_true", help="only train (or find) the models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ZIP.exists():
        print(f"{ZIP} missing")
        return 2
    size = QUICK if args.quick else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = {f"weak ({size.weak_epochs} ep, lr {size.weak_lr:g})":
              train_model(args.work, size, size.weak_epochs, size.weak_lr, args.seed, device=args.device),
              f"strong ({size.strong_epochs} ep, lr {size.strong_lr:g})":
              train_model(args.work, size, size.strong_epochs, size.strong_lr, args.seed, device=args.device)}
    if args.train_only:
        return 0
    sets = eval_sets(args.work, size, args.seed)
    print(f"\notc-tiny trained on {10 * size.train_per_class} CIFAR-10 pairs; evaluated on "
          f"{10 * size.eval_per_class} other pairs, {int(100 * size.swap)} % of captions swapped across classes "
          f"in the swap set\n")
    print("| model | set | scores | abstain | false change (clean pairs) | re-assign precision | recall of swapped | "
          "drop rate | re-assigned | review | verdict (control AUC) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mname, ckpt in models.items():
        for sname, (path, swapped, labels) in sets.items():
            for key, r in evaluate(path, swapped, labels, ckpt, device=args.device).items():
                var, abstain = key.split("|")
                print(f"| {mname} | {sname} | {var} | {abstain} | {fmt(r['false_change'])} | {fmt(r['precision'])} | "
                      f"{fmt(r['recall'])} | {fmt(r['drop'])} | {r['reassigned']} | {r['review']} | "
                      f"{r['verdict'] or '-'} ({r['auc']:.3f}) |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
