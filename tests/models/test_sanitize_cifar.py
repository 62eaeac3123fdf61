"""Integration: a tiny CLIP trained on clean CIFAR-10 pairs re-assigns swapped captions."""

from __future__ import annotations

import csv
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from otcclip.models.checkpoint import load_checkpoint
from otcclip.models.datasets import cifar10_manifest
from otcclip.models.manifest import read_manifest
from otcclip.models.sanitize import SanitizeConfig, sanitize

CLASSES = ("airplane", "automobile", "frog", "horse", "ship")


def _swap_captions(src: Path, dst: Path, rate: float, seed: int) -> set[str]:
    """Give ``rate`` of the pairs a caption of another class; returns the swapped ids."""
    rows = list(csv.DictReader(src.open()))
    rng = random.Random(seed)
    by_class: dict[str, list[str]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r["caption"])
    swapped = rng.sample(range(len(rows)), int(len(rows) * rate))
    for i in swapped:
        other = rng.choice(sorted(c for c in by_class if c != rows[i]["label"]))
        rows[i]["caption"] = rng.choice(by_class[other])
    with dst.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {rows[i]["id"] for i in swapped}


@pytest.mark.slow
@pytest.mark.cifar
def test_swapped_captions_are_reassigned_to_their_true_class(tmp_path: Path, cifar_zip: Path) -> None:
    from otcclip.models.training import TrainConfig, train

    clean = cifar10_manifest(cifar_zip, tmp_path / "data", split="train", per_class=200, seed=0, classes=CLASSES)
    run = train(read_manifest(clean), tmp_path / "run", config=TrainConfig(
        model="otc-micro", defence="none", epochs=20, batch_size=64, lr=2e-3, device="cpu", seed=0))
    swapped_ids = _swap_captions(clean, tmp_path / "data" / "swapped.csv", rate=0.1, seed=0)
    man = read_manifest(tmp_path / "data" / "swapped.csv")
    bundle = load_checkpoint(run.final_checkpoint, device=torch.device("cpu"))
    # the model's own proposals (abstain off); the default run, on the same shards, judges the model first
    cfg = SanitizeConfig(k=16, device="cpu")
    d = sanitize(man, bundle, config=replace(cfg, decisions=replace(cfg.decisions, abstain=False)),
                 work_dir=tmp_path / "work").decisions
    judged = sanitize(man, bundle, config=cfg, work_dir=tmp_path / "work").decisions

    labels, caps, ids = man.labels, man.captions, man.ids
    sw = [i for i, x in enumerate(ids) if x in swapped_ids]
    cl = [i for i, x in enumerate(ids) if x not in swapped_ids]
    fixed = [i for i in sw if d.action[i] == "reassign" and labels[i] in caps[int(d.new_caption_index[i])]]
    moved = [i for i in sw if d.action[i] == "reassign"]
    removed = [i for i in sw if d.action[i] == "drop"]
    kept = [i for i in cl if d.action[i] == "keep"]
    fixed_rate, kept_rate = len(fixed) / len(sw), len(kept) / len(cl)
    right_rate = len(fixed) / max(1, len(moved))
    print(f"swapped pairs re-assigned to a caption of their true class: {fixed_rate:.2f} ({len(sw)} pairs), "
          f"dropped {len(removed) / len(sw):.2f}; re-assignments of swapped pairs that are right: {right_rate:.2f}; "
          f"untouched pairs kept: {kept_rate:.2f} ({len(cl)} pairs); actions {d.counts()['action']}, "
          f"reasons {d.counts()['reason']}")
    # the wrong caption is gone (fixed, or the pair dropped) for most swapped pairs, and a
    # re-assignment is mostly to the true class (chance: 1 in 4 other classes)
    assert (len(fixed) + len(removed)) / len(sw) > 0.55
    assert right_rate > 0.6
    assert kept_rate > 0.8
    # judged: a change is made only by a model judged ok, on a calibrated margin; a weak
    # model's proposals for the swapped pairs are kept and marked for review
    q = judged.model_quality
    print(f"verdict {q['verdict']}: {q['message']}")
    changed = {i for i, a in enumerate(judged.action) if a == "reassign"}
    assert changed <= {i for i, a in enumerate(d.action) if a == "reassign"}
    if q["verdict"] == "weak":
        assert not changed and all(judged.review[i] for i in moved)
