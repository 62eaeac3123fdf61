"""Duplicates benchmark: the near-duplicate threshold chosen on one construction, measured on another.

Data: CIFAR-10 test-split slices (``../shared/data/cifar10-jpg.zip``), disjoint by
``offset``: a *validation* slice chooses ``near_threshold`` and ``near_relative``, a
*report* slice measures them. In each slice a share of the images gets near-duplicate
copies (JPEG re-compressed at quality 50 / 75 / 90, resized to 24 / 40 / 64 px); a
copy's cosine to its original is a positive, the cosine of every original image to
its nearest *distinct* original is a negative (a distinct image that a threshold
would wrongly group).

Printed for the validation slice, per ``near_threshold`` x ``near_relative``: recall of
the copies (cosine >= the effective threshold ``max(near_threshold, 1 - near_relative
x median distance to the nearest distinct image)``) and the share of distinct images
wrongly grouped with their nearest neighbour. The rule that picks the defaults: the
highest recall with at most 0.5 % of distinct images grouped, at the floor ``near_threshold``
(0.97, the ``image_burst`` detector's near-duplicate cosine) that a model with widely
spread embeddings meets first. Then the report slice with the chosen values, and the same on a randomly
initialised model (what the scale-free test is for).

End to end on the report slice (``otcclip.models.sanitize``, default settings but the
chosen duplicates values): the slice plus 20 byte-identical copies of one image all
captioned "a photo of a truck" and the near-duplicate copies; printed: groups found,
the pairs grouped that should be (recall) and those that should not (false members),
and what ``keep_one`` kept and dropped.

Usage::

    .venv/bin/python bench/duplicates.py --checkpoint DIR [--work DIR] [--threads 2]

``--checkpoint`` is an ``otc-tiny`` (or any) checkpoint trained on CIFAR-10 (e.g. a
``bench/repair.py`` or ``bench/defence.py`` model).
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ZIP = REPO.parent / "shared" / "data" / "cifar10-jpg.zip"
VARIANTS = (("jpeg", 50), ("jpeg", 75), ("jpeg", 90), ("resize", 24), ("resize", 40), ("resize", 64))
MAX_FALSE = 0.005


def variant(img: Image.Image, kind: str, arg: int) -> bytes:
    """One near-duplicate copy of ``img`` as JPEG bytes."""
    out = io.BytesIO()
    if kind == "jpeg":
        img.save(out, format="JPEG", quality=arg)
    else:
        img.resize((arg, arg), Image.BICUBIC).save(out, format="JPEG", quality=95)
    return out.getvalue()


def build(work: Path, offset: int, per_class: int, share: float, seed: int) -> tuple[Path, list[int]]:
    """A slice plus near-duplicate copies of ``share`` of its images (rows appended,
    ``dup_of`` names the original's id). Returns the manifest and the originals' rows."""
    from otcclip.models.datasets import cifar10_manifest

    man = cifar10_manifest(ZIP, work, split="test", per_class=per_class, seed=seed, offset=offset)
    with man.open() as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(rows), int(share * len(rows)), replace=False).tolist())
    out = []
    for r in rows:
        out.append({**r, "dup_of": ""})
    (work / "copies").mkdir(exist_ok=True)
    for i in picked:
        img = Image.open(work / rows[i]["image"]).convert("RGB")
        for kind, arg in VARIANTS:
            rel = f"copies/{rows[i]['id']}-{kind}{arg}.jpg"
            (work / rel).write_bytes(variant(img, kind, arg))
            out.append({**rows[i], "id": f"{rows[i]['id']}-{kind}{arg}", "image": rel, "dup_of": rows[i]["id"]})
    path = work / "with_copies.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    return path, picked


def encode(manifest_path: Path, bundle: object) -> tuple[list[dict[str, str]], np.ndarray]:
    """Rows and their L2-normalised image globals (N, d)."""
    from otcclip.models.features import image_features
    from otcclip.models.images import load_image_batch
    from otcclip.models.manifest import read_manifest

    m = read_manifest(manifest_path)
    feats = []
    with torch.no_grad():
        for s in range(0, len(m), 256):
            b = load_image_batch(m, range(s, min(s + 256, len(m))), bundle.preprocess)  # type: ignore[attr-defined]
            feats.append(image_features(bundle.model, b.pixels).global_.float())  # type: ignore[attr-defined]
    g = torch.cat(feats).numpy()
    with manifest_path.open() as f:
        rows = list(csv.DictReader(f))
    return rows, g / np.linalg.norm(g, axis=1, keepdims=True)


def curves(rows: list[dict[str, str]], g: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Positive cosines (copy, original), each original's cosine to its nearest distinct
    original, and the median distance to the nearest distinct image (all rows)."""
    index = {r["id"]: i for i, r in enumerate(rows)}
    orig = np.array([i for i, r in enumerate(rows) if not r["dup_of"]])
    pos = np.array([float(g[i] @ g[index[r["dup_of"]]]) for i, r in enumerate(rows) if r["dup_of"]])
    sims = g[orig] @ g[orig].T
    np.fill_diagonal(sims, -np.inf)
    neg = sims.max(axis=1)
    # what duplicate_groups measures: every row's nearest image that is not its own copy family
    fam = np.array([r["dup_of"] or r["id"] for r in rows])
    allsim = g @ g.T
    allsim[fam[:, None] == fam[None, :]] = -np.inf
    typical = float(np.median(1.0 - allsim.max(axis=1)))
    return pos, neg, typical


def grid(pos: np.ndarray, neg: np.ndarray, typical: float) -> list[tuple[float, float, float, float, float]]:
    """(threshold, relative, effective threshold, recall, false share) over the grid."""
    out = []
    for t in (0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995):
        for r in (0.0, 0.1, 0.25, 0.5, 1.0):
            eff = max(t, 1.0 - r * typical)
            out.append((t, r, eff, float((pos >= eff).mean()), float((neg >= eff).mean())))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/otcclip-duplicates"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--near-thumbnail", type=float, default=0.99,
                    help="the end-to-end run's thumbnail gate (the default's value; -1: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from otcclip.models.checkpoint import load_checkpoint
    from otcclip.models.config import DecisionSettings, DuplicatesSettings, SanitizeConfig
    from otcclip.models.factory import create_model
    from otcclip.models.manifest import read_manifest
    from otcclip.models.sanitize import sanitize

    t0 = time.perf_counter()
    bundle = load_checkpoint(args.checkpoint)
    random_bundle = create_model(bundle.name, device="cpu", seed=0)
    sets = {}
    for name, offset in (("validation", 0), ("report", 2 * args.per_class)):
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        sets[name] = build(work, offset, args.per_class, 0.1, args.seed)
    rows, g = encode(sets["validation"][0], bundle)
    pos, neg, typical = curves(rows, g)
    print(f"validation: {len(neg)} images, {len(pos)} near-duplicate copies; median distance to the nearest distinct "
          f"image {typical:.4f}; copy cosine p01/p05/median {np.quantile(pos, 0.01):.4f} / {np.quantile(pos, 0.05):.4f} / "
          f"{np.median(pos):.4f}; nearest-distinct cosine p99/max {np.quantile(neg, 0.99):.4f} / {neg.max():.4f}")
    print("| near_threshold | near_relative | effective | copies grouped | distinct images grouped |")
    print("|---|---|---|---|---|")
    table = grid(pos, neg, typical)
    for t, r, eff, rec, fal in table:
        print(f"| {t} | {r} | {eff:.4f} | {100 * rec:.1f} % | {100 * fal:.1f} % |")
    floor = DuplicatesSettings().near_threshold
    ok = [row for row in table if row[4] <= MAX_FALSE and row[0] == floor]
    best = max(ok, key=lambda row: (row[3], -row[1]))
    t_best, r_best = best[0], best[1]
    print(f"chosen at the floor near_threshold {floor} (highest recall with <= {100 * MAX_FALSE:g} % distinct "
          f"grouped): near_relative {r_best}")
    for label, b in (("trained", bundle), ("random init", random_bundle)):
        rows, g = encode(sets["report"][0], b)
        pos, neg, typical = curves(rows, g)
        eff = max(t_best, 1.0 - r_best * typical)
        print(f"report slice, {label} model: effective threshold {eff:.4f}; copies grouped {100 * (pos >= eff).mean():.1f} %, "
              f"distinct images grouped {100 * (neg >= eff).mean():.1f} % (at {t_best} alone: "
              f"{100 * (pos >= t_best).mean():.1f} % / {100 * (neg >= t_best).mean():.1f} %)")

    # end to end: the report slice + a burst of 20 identical copies under one wrong caption
    work = args.work / "report"
    path, picked = sets["report"]
    with path.open() as f:
        rows = list(csv.DictReader(f))
    burst_src = next(r for r in rows if not r["dup_of"] and r["label"] != "truck")
    blob = (work / burst_src["image"]).read_bytes()
    (work / "burst").mkdir(exist_ok=True)
    for k in range(20):
        (work / "burst" / f"{k:02d}.jpg").write_bytes(blob)
        rows.append({**burst_src, "id": f"burst-{k:02d}", "image": f"burst/{k:02d}.jpg", "caption": "a photo of a truck",
                     "dup_of": burst_src["id"]})
    e2e = work / "e2e.csv"
    with e2e.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = SanitizeConfig(device="cpu", decisions=DecisionSettings(
        duplicates=DuplicatesSettings(near_threshold=t_best, near_relative=r_best, near_thumbnail=args.near_thumbnail)))
    m = read_manifest(e2e)
    d = sanitize(m, bundle, config=cfg).decisions
    fam = [r["dup_of"] or r["id"] for r in rows]
    should = np.array([sum(1 for x in fam if x == f) > 1 for f in fam])
    grouped = d.dup_group >= 0
    families = {f for f, s in zip(fam, should, strict=True) if s}
    same = all(len({int(d.dup_group[i]) for i in range(len(rows)) if fam[i] == f}) == 1 for f in families)
    print(f"end to end ({len(rows)} pairs, {len(families)} duplicate families incl. the 20-copy burst): "
          f"{int(d.dup_group.max()) + 1} groups; members grouped {int((grouped & should).sum())} of {int(should.sum())}; "
          f"false members {int((grouped & ~should).sum())}; every family one group: {same}")
    burst = np.array([r["id"].startswith("burst-") or r["id"] == burst_src["id"] for r in rows])
    acts = {f"{a}/{r}": int(((d.action == a) & (d.reason == r) & burst).sum()) for a, r in set(zip(d.action[burst], d.reason[burst], strict=True))}
    print(f"burst (21 pairs: 20 copies as 'a photo of a truck' + its original): {acts}; model verdict "
          f"{d.model_quality.get('verdict')}; dropped as duplicate overall {int((d.reason == 'duplicate').sum())}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
