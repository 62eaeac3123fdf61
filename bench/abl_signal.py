"""Diagnostic: does a "learnt too fast" (Anti-Backdoor Learning) signal separate poisoned pairs?

Trains plain CLIP (``none``) on each attack split of ``bench/defence.py`` at its quick size,
with the full run's learning-rate schedule, stops after ``--warmup`` epochs, and scores every
pair with each warm-up checkpoint:

- ``loss``: the pair's image-to-caption loss against the distinct captions of the set
  (low = learnt easily; ABL isolates the lowest-loss share);
- ``loss z``: the robust z of ``loss`` over all pairs (what the ``fast_fit`` detector
  thresholds, at its own temperature 0.07 where this uses the model's: about the same
  early in training);
- ``z``: robust z of the own-caption score within the pairs sharing its caption text
  (high = fits its caption far better than its caption's other images).

Selection rule of ``fast_fit`` (fixed before its training use; validation split only):
the smallest ``loss z`` threshold of the grid whose clean false-flag rate is at most 1 %,
at the first warm-up epoch where one exists.

Prints precision, recall per attack and the clean false-flag rate at a few shares and
thresholds, and writes ``WORK/quick/abl_signal.json``.

    python bench/abl_signal.py --work /tmp/abl --splits validation,heldout --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defence import QUICK, SPLITS, build_clean, build_split  # noqa: E402

from otcclip.models.checkpoint import load_checkpoint  # noqa: E402
from otcclip.models.detectors import robust_z  # noqa: E402
from otcclip.models.evaluation import encode_images  # noqa: E402
from otcclip.models.progress import Cancelled  # noqa: E402
from otcclip.models.training import TrainConfig, train  # noqa: E402
from otcclip.models.training.data import ImageSource, read_rows  # noqa: E402


def warmup_checkpoints(manifest: Path, run: Path, cfg: TrainConfig, epochs: int) -> list[Path]:
    """Train ``cfg`` for its first ``epochs`` epochs (its full schedule), keep every checkpoint."""
    want = [run / "checkpoints" / f"epoch_{e:03d}" for e in range(1, epochs + 1)]
    if all((p / "train_state.pt").is_file() for p in want):
        return want
    done = {"n": 0}

    def on_epoch(rec: dict) -> None:
        done["n"] = int(rec["epoch"])

    try:
        train(manifest, run, config=cfg, on_epoch=on_epoch, should_stop=lambda: done["n"] >= epochs)
    except Cancelled:
        pass
    return want


@torch.no_grad()
def pair_signals(ckpt: Path, manifest: Path) -> dict[str, np.ndarray]:
    """Per-pair ``loss`` and ``z`` (module docstring) under one checkpoint."""
    bundle = load_checkpoint(ckpt, device="cpu")
    bundle.model.eval()
    rows = read_rows(manifest, need=("image", "caption"))
    src = ImageSource(rows, bundle.image_size)
    assert src.cached is not None
    img = encode_images(bundle, src.cached)
    caps = rows.col("caption")
    uniq = sorted(set(caps))
    cidx = np.array([uniq.index(c) for c in caps])
    txt = F.normalize(bundle.model.encode_text(bundle.tokenizer(uniq)), dim=-1)
    scale = float(bundle.model.logit_scale.exp())
    logits = scale * img @ txt.t()
    loss = -(logits.log_softmax(1)[torch.arange(len(caps)), torch.from_numpy(cidx)]).numpy()
    own = (img * txt[torch.from_numpy(cidx)]).sum(1).numpy()
    z = np.zeros_like(own)
    for g in range(len(uniq)):
        m = cidx == g
        med = np.median(own[m])
        mad = 1.4826 * np.median(np.abs(own[m] - med)) + 1e-6
        z[m] = (own[m] - med) / mad
    return {"loss": loss, "z": z, "ids": np.array(rows.ids)}


def report(flag: np.ndarray, attack: np.ndarray, attacks: list[str]) -> dict[str, float]:
    clean = attack == ""
    out = {"n": int(flag.sum()), "precision": float((flag & ~clean).sum() / max(1, flag.sum())),
           "clean_fp": float((flag & clean).sum() / clean.sum())}
    for a in attacks:
        out[a] = float((flag & (attack == a)).sum() / max(1, (attack == a).sum()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/abl"))
    ap.add_argument("--splits", default="validation,heldout")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = QUICK
    work = args.work / "quick"
    work.mkdir(parents=True, exist_ok=True)
    clean = build_clean(work, size, args.seed)
    cfg = TrainConfig(model=size.model, epochs=size.epochs, batch_size=size.batch_size, seed=args.seed, device="cpu",
                      lr=size.lr, lr_warmup_steps=50, defence="none", checkpoint_every=1, keep_checkpoints=0)
    results: dict[str, dict] = {}
    for split in args.splits.split(","):
        paths = build_split(work, clean, size, args.seed, split)
        with paths["truth"].open() as f:
            truth = {r["id"]: (r["attack"] if r["poisoned"] == "1" else "") for r in csv.DictReader(f)}
        attacks = [a for a, _ in SPLITS[split]]
        for ck in warmup_checkpoints(paths["poisoned"], work / "abl_runs" / split, cfg, args.warmup):
            sig = pair_signals(ck, paths["poisoned"])
            attack = np.array([truth.get(i, "") for i in sig["ids"]])
            key = f"{split}/{ck.name}"
            results[key] = {}
            print(f"\n## {key}: {len(attack)} pairs, " + ", ".join(f"{a} {(attack == a).sum()}" for a in attacks))
            print(f"{'rule':<16}{'n':>6}{'prec':>7}{'cleanFP':>9}" + "".join(f"{a[:18]:>20}" for a in attacks))
            rules: dict[str, np.ndarray] = {}
            for q in (0.01, 0.02, 0.05, 0.10):
                rules[f"loss low {q:.0%}"] = sig["loss"] <= np.quantile(sig["loss"], q)
                rules[f"z high {q:.0%}"] = sig["z"] >= np.quantile(sig["z"], 1 - q)
            for t in (2.0, 3.0, 4.0):
                rules[f"z >= {t:g}"] = sig["z"] >= t
            loss_z = robust_z(sig["loss"])
            for t in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
                rules[f"loss z <= -{t:g}"] = loss_z <= -t
            for name, flag in rules.items():
                r = report(flag, attack, attacks)
                results[key][name] = r
                print(f"{name:<16}{r['n']:>6}{r['precision']*100:>7.1f}{r['clean_fp']*100:>9.2f}"
                      + "".join(f"{r[a]*100:>20.1f}" for a in attacks), flush=True)
    (work / "abl_signal.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
