"""Defence benchmark: none / roclip / safeclip / otcclip against three attacks at once.

One poisoned CIFAR-10 set (from ``../shared/data/cifar10-jpg.zip``) carries a targeted
attack, a backdoor patch and a backdoor blend, each with its own target class. Every
defence is trained once on it with the same model, data and seed; ``none`` is also
trained on the clean data (the base rate) and, as ``oracle``, on the poisoned data without
its poisoned rows (what a perfect detector that drops them leaves: the backdoor images
replaced clean ones, so this is less data than the clean set). Each model is evaluated
on a held-out test slice: zero-shot top-1, linear probe, the three ASRs, and (for the
re-matching defences) detection precision/recall of the last re-match pass against
``poison_truth.csv``.

    python bench/defence.py --quick            # CPU size (~30 min on 2 cores)
    python bench/defence.py --device cuda      # full size, for a GPU

Prints one table and writes ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from otcclip.models.attacks import PoisonConfig, poison_many  # noqa: E402
from otcclip.models.checkpoint import load_checkpoint  # noqa: E402
from otcclip.models.config import from_dict  # noqa: E402
from otcclip.models.datasets import cifar10_manifest  # noqa: E402
from otcclip.models.evaluation import EvalConfig, evaluate  # noqa: E402
from otcclip.models.training import TrainConfig, train  # noqa: E402

ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip"
DEFENCES = ("none", "roclip", "safeclip", "otcclip")


@dataclass(frozen=True)
class Size:
    per_class: int  # training images per class
    test_per_class: int
    epochs: int
    n_targets: int
    targeted_per_target: int
    patch_rate: float  # share of the training images the patch backdoor replaces
    blend_rate: float  # the same for the blend backdoor
    model: str
    batch_size: int
    patch_frac: float = 0.25
    blend_alpha: float = 0.25
    lr: float = 1e-3


QUICK = Size(per_class=300, test_per_class=200, epochs=10, n_targets=4, targeted_per_target=25, patch_rate=0.08, blend_rate=0.08, model="otc-tiny", batch_size=128, blend_alpha=0.3)
FULL = Size(per_class=5000, test_per_class=1000, epochs=30, n_targets=16, targeted_per_target=100, patch_rate=0.01, blend_rate=0.01, model="otc-small", batch_size=256)
ATTACKS = (("targeted", "truck"), ("backdoor-patch", "airplane"), ("backdoor-blend", "frog"))


def build_data(work: Path, size: Size, seed: int) -> dict[str, Path]:
    data = work / "data"
    if (data / "done.json").is_file():
        return {k: Path(v) for k, v in json.loads((data / "done.json").read_text()).items()}
    shutil.rmtree(data, ignore_errors=True)
    train_m = cifar10_manifest(ZIP, data / "train", per_class=size.per_class, seed=seed)
    test_m = cifar10_manifest(ZIP, data / "test", split="test", per_class=size.test_per_class, seed=seed)
    pool_m = cifar10_manifest(ZIP, data / "pool", split="test", per_class=10, seed=seed, offset=size.test_per_class)
    n = size.per_class * 10
    cfgs = []
    for attack, target in ATTACKS:
        if attack == "targeted":
            cfgs.append(PoisonConfig(attack, target, n_poison=size.n_targets * size.targeted_per_target, n_targets=size.n_targets, target_pool=pool_m, seed=seed))
        else:
            rate = size.patch_rate if attack == "backdoor-patch" else size.blend_rate
            cfgs.append(PoisonConfig(attack, target, n_poison=max(1, round(rate * n)), seed=seed, patch_frac=size.patch_frac, blend_alpha=size.blend_alpha))
    res = poison_many(train_m, data / "poisoned", configs=cfgs)
    paths = {"train": train_m, "test": test_m, "poisoned": res.manifest_path, "truth": res.truth_path, "dir": data / "poisoned"}
    (data / "done.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def oracle_manifest(paths: dict[str, Path]) -> Path:
    """The poisoned manifest without its poisoned rows (``poison_truth.csv``): what a
    detector that finds every poisoned pair and drops it leaves to train on. The backdoor
    images replaced clean ones, so this is less data than the clean set."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from otcclip.models.manifest import read_manifest
    from otcclip.models.manifest_writer import write_manifest

    poisoned = paths["poisoned"]
    out = poisoned.with_name("oracle" + poisoned.suffix)
    if out.is_file():
        return out
    with paths["truth"].open() as f:
        bad = [r["id"] for r in csv.DictReader(f) if r["poisoned"] == "1"]
    like = read_manifest(poisoned, check_images=False)
    keep = pc.invert(pc.is_in(like.table.column("id"), value_set=pa.array(bad, pa.string())))
    return write_manifest(like, like.table.filter(keep), out)


def detection(run_dir: Path, truth: Path) -> dict[str, Any]:
    """Precision over all flagged pairs and recall per attack, from the last re-match pass."""
    import pyarrow.parquet as pq

    passes = sorted((run_dir / "rematch").glob("epoch_*/decisions.parquet"))
    if not passes:
        return {}
    t = pq.read_table(passes[-1]).to_pydict()
    flagged = {i for i, a in zip(t["id"], t["action"], strict=True) if a != "keep"}
    with truth.open() as f:
        rows = list(csv.DictReader(f))
    poisoned = {r["id"]: r["attack"] for r in rows if r["poisoned"] == "1"}
    tp = len(flagged & set(poisoned))
    out: dict[str, Any] = {"precision": tp / len(flagged) if flagged else 0.0, "n_flagged": len(flagged), "pass": passes[-1].parent.name}
    for attack, _ in ATTACKS:
        ids = {i for i, a in poisoned.items() if a == attack}
        out[f"recall_{attack}"] = len(flagged & ids) / len(ids) if ids else 0.0
    return out


def run_one(name: str, manifest: Path, paths: dict[str, Path], work: Path, cfg: TrainConfig) -> dict[str, Any]:
    run_dir = work / "runs" / name
    out_json = run_dir / "bench.json"
    cached_cfg = run_dir / "config.json"
    same = cached_cfg.is_file() and json.loads(cached_cfg.read_text()) == json.loads(json.dumps(cfg.to_dict()))
    if out_json.is_file() and same:  # a run is reused only with the very config asked for
        return dict(json.loads(out_json.read_text()))
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = train(manifest, run_dir, config=cfg)
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    bundle = load_checkpoint(res.final_checkpoint, device=cfg.device if cfg.device != "auto" else "cpu")
    pdir = paths["dir"]
    ev = evaluate(bundle, paths["test"], config=EvalConfig(targets=pdir / "targets.csv", trigger=sorted(pdir.glob("trigger-*.json"))))
    out = {
        "name": name,
        "defence": cfg.defence,
        "eval": ev.to_dict(),
        # all epochs' time over the scheduled epochs: a re-matching defence pays its passes
        # every K epochs (a median would leave them out), and a restarting one its
        # detection epochs on top of the schedule
        "epoch_s": sum(m["time_s"] for m in metrics) / cfg.epochs,
        "epoch_s_median": statistics.median(m["time_s"] for m in metrics),
        "wall_s": wall,
        "detection": detection(run_dir, paths["truth"]) if cfg.defence != "none" else {},
        "metrics": metrics,
    }
    out_json.write_text(json.dumps(out, indent=2))
    print(f"[{name}] zero-shot {ev.zero_shot_top1:.3f}  {wall:.0f}s", flush=True)
    return out


def table(results: list[dict[str, Any]]) -> str:
    w = max([26] + [len(r["name"]) + 2 for r in results])
    head = f"{'defence':<{w}}{'attack':<16}{'zero-shot':>10}{'lin.probe':>10}{'ASR':>8}{'det.P':>8}{'det.R':>8}{'s/epoch':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        ev, det = r["eval"], r["detection"]
        asr = {"targeted": ev["targeted"]["asr"] if ev["targeted"] else None}
        asr.update({b["attack"]: b["asr"] for b in ev["backdoor"]})
        for attack in ["clean"] + [a for a, _ in ATTACKS]:
            a = asr.get(attack)
            p = det.get("precision") if det and attack != "clean" else None
            rc = det.get(f"recall_{attack}") if det else None
            lines.append(
                f"{r['name']:<{w}}{attack:<16}{ev['zero_shot_top1']*100:>10.1f}{ev['linear_probe']*100:>10.1f}"
                f"{'' if a is None or attack == 'clean' else f'{a*100:.1f}':>8}"
                f"{'' if p is None else f'{p*100:.1f}':>8}{'' if rc is None else f'{rc*100:.1f}':>8}{r['epoch_s']:>9.1f}"
            )
    return "\n".join(lines)


def _overrides(opts: list[str]) -> dict[str, Any]:
    """``field=value`` and ``sanitize.decisions.field=value`` (dotted paths into TrainConfig) ->
    nested overrides; values are JSON (``true``, ``3``, ``["image_burst"]``) or plain strings."""
    over: dict[str, Any] = {}
    for key, value in (o.split("=", 1) for o in opts):
        *parents, leaf = key.split(".")
        node = over
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = json.loads(value)
        except json.JSONDecodeError:
            node[leaf] = value
    return over


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU size")
    ap.add_argument("--work", type=Path, default=Path("/tmp/otcclip-bench-defence"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--defences", default=",".join(("clean", "none", "oracle") + DEFENCES[1:]),
        help="runs, comma separated; 'clean' = none on clean data; 'oracle' = none on the poisoned data without its poisoned rows; 'NAME:field=value' overrides TrainConfig settings by dotted path (e.g. sanitize.decisions.margin_z=2), values as JSON",
    )
    ap.add_argument("--per-class", type=int, default=None, help="override the training images per class")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--patch-rate", type=float, default=None, help="override the patch backdoor's share of the training images")
    ap.add_argument("--blend-rate", type=float, default=None, help="override the blend backdoor's share of the training images")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.per_class:
        size = replace(size, per_class=args.per_class)
    if args.epochs:
        size = replace(size, epochs=args.epochs)
    if args.patch_rate is not None:
        size = replace(size, patch_rate=args.patch_rate)
    if args.blend_rate is not None:
        size = replace(size, blend_rate=args.blend_rate)
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_data(work, size, args.seed)
    base = TrainConfig(
        model=size.model, epochs=size.epochs, batch_size=size.batch_size, seed=args.seed, device=args.device,
        lr=size.lr, lr_warmup_steps=50,
    )
    results = []
    for name in args.defences.split(","):
        if name == "clean":
            results.append(run_one("none (clean)", paths["train"], paths, work, base))
        elif name == "oracle":
            results.append(run_one("none (poison removed)", oracle_manifest(paths), paths, work, base))
        else:  # "otcclip" or a variant such as "otcclip:warmup_epochs=1"
            defence, *opts = name.split(":")
            # each defence's own warm-up / re-match schedule (DEFAULT_SCHEDULE) unless overridden
            over = {"defence": defence, "warmup_epochs": -1, "rematch_every": -1, **_overrides(opts)}
            cfg = from_dict(TrainConfig, over, base=base)
            results.append(run_one(name, paths["poisoned"], paths, work, cfg))
    print()
    print(f"# defence bench, {dt.date.today().isoformat()}, size={'quick' if args.quick else 'full'} "
          f"({size.per_class * 10} train pairs, {size.test_per_class * 10} test, {size.model}, {size.epochs} epochs, seed {args.seed}), "
          f"total {time.perf_counter() - t0:.0f}s")
    print("# attacks: " + ", ".join(f"{a} -> {t}" for a, t in ATTACKS))
    print(table(results))
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
