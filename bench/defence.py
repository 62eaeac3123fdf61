"""Defence benchmark: none / roclip / safeclip / otcclip / otcclip+ on three attack splits.

Three poisoned CIFAR-10 sets (from ``../shared/data/cifar10-jpg.zip``), built from the same
clean training slice, each carry three attacks at once, each with its own target class:

- ``validation``: targeted poisoning, a noise-patch backdoor and a blended-noise backdoor.
  These are the attacks every default of the defences was chosen on.
- ``heldout``: targeted poisoning with an augmented near-copy per poisoned pair, a
  low-frequency colour-shift backdoor and a WaNet warp. No default was chosen on them;
  report them, never tune on them.
- ``heldout-b``: a second held-out set of BackdoorBench families added after the defaults
  were set: a SIG sinusoid backdoor, an ISSBA-style sample-specific invisible backdoor and
  a text-side trigger (a rare token in captions; ASR by text-to-image retrieval). Nothing
  was ever tuned on it.

Rows (:data:`ROWS`; ``NAME:field=value`` adds TrainConfig overrides, e.g. ablations):

- ``none``: plain CLIP; ``clean``: ``none`` on the clean data (the base rate); ``oracle``:
  ``none`` on the poisoned data without its poisoned rows; ``clean/ROW``: a row (with its
  overrides) trained on the clean data (what a defence costs where there is no poison);
- ``roclip``, ``safeclip``: the peers (:mod:`otcclip.models.training.defences`);
- ``otcclip``: the paper's mechanism alone: OT-based score re-assignment at every pass
  (``score_rematch``), no detectors, no trigger-template search, no restart, no unlikelihood;
- ``otcclip+``: the trainer's default: image-burst and trigger-sensitivity detectors,
  template search, restart and unlikelihood on quarantined pairs, score proposals ignored;
- ``otcclip+collapse`` (not a default): ``otcclip+`` whose passes also run the ``collapse``
  detector, dropping and quarantining what it flags.
- ``otcclip+abl`` (not a default): ``otcclip+`` with two warm-up epochs whose first pass
  also runs ``fast_fit`` (Anti-Backdoor Learning's isolation of the pairs learnt far
  faster than the rest), dropping and quarantining (unlearning) what it flags.

Each model is evaluated on a held-out test slice: zero-shot top-1, linear probe, each
attack's ASR (and, for backdoors, the clean base rate: the share of untriggered test
images already predicted as the target; for the text trigger, the share of token-free
queries whose top-1 image is of the target), and, for the defences that write re-match
decisions, detection precision/recall of the last pass against ``poison_truth.csv``.

    python bench/defence.py --quick                      # CPU size (see docs/benchmarks.md)
    python bench/defence.py --quick --splits validation  # only the validation attacks
    python bench/defence.py --device cuda                # full size, for a GPU

Prints one table per split and writes ``WORK/results.json``.
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

from otcclip.models.attacks import TARGETED, TEXT_BACKDOORS, PoisonConfig, poison_many  # noqa: E402
from otcclip.models.checkpoint import load_checkpoint  # noqa: E402
from otcclip.models.config import from_dict  # noqa: E402
from otcclip.models.datasets import cifar10_manifest  # noqa: E402
from otcclip.models.evaluation import EvalConfig, evaluate  # noqa: E402
from otcclip.models.training import TrainConfig, train  # noqa: E402

ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip"
#: TrainConfig overrides of each benchmark row (the defence's own schedule unless overridden).
ROWS: dict[str, dict[str, Any]] = {
    "none": {"defence": "none"},
    "roclip": {"defence": "roclip"},
    "safeclip": {"defence": "safeclip"},
    "otcclip": {
        "defence": "otcclip", "score_rematch": True, "template_search": False, "restart": False, "lam_unlearn": 0.0,
        "drop_reasons": [], "sticky_reasons": [], "sanitize": {"decisions": {"detectors": []}},
    },
    "otcclip+": {"defence": "otcclip"},
    # not a default: otcclip+ whose passes also run the collapse detector and drop (and
    # quarantine) what it flags
    "otcclip+collapse": {
        "defence": "otcclip", "drop_reasons": ["image_burst", "caption_burst", "trigger_sensitivity", "collapse"],
        "sticky_reasons": ["image_burst", "trigger_sensitivity", "collapse"],
        "sanitize": {"decisions": {"detectors": ["image_burst", "trigger_sensitivity", "collapse"]}},
    },
    # not a default: otcclip+ with Anti-Backdoor Learning's isolation: two warm-up epochs, and
    # the first pass also runs fast_fit (pairs learnt far faster than the rest), trusted under
    # the warm-up's weak model, whose flags are dropped and unlearnt (quarantine)
    "otcclip+abl": {
        "defence": "otcclip", "warmup_epochs": 2,
        "drop_reasons": ["image_burst", "caption_burst", "trigger_sensitivity", "fast_fit"],
        "sticky_reasons": ["image_burst", "trigger_sensitivity", "fast_fit"],
        "sanitize": {"decisions": {"detectors": ["image_burst", "trigger_sensitivity", "fast_fit"],
                                   "weak_model_detectors": ["image_burst", "fast_fit"]}},
    },
}


@dataclass(frozen=True)
class Size:
    per_class: int  # training images per class
    test_per_class: int
    epochs: int
    n_targets: int
    targeted_per_target: int
    patch_rate: float  # share of the training images the patch backdoor replaces
    blend_rate: float  # the same for the blend backdoor (and every other image backdoor)
    model: str
    batch_size: int
    patch_frac: float = 0.25
    blend_alpha: float = 0.25
    lr: float = 1e-3
    #: text-trigger: share of the training pairs re-captioned (all of them images of its
    #: target class, a tenth of the data: 0.04 re-captions 40 % of that class)
    text_rate: float = 0.04


QUICK = Size(per_class=300, test_per_class=200, epochs=10, n_targets=4, targeted_per_target=25, patch_rate=0.08, blend_rate=0.08, model="otc-tiny", batch_size=128, blend_alpha=0.3)
FULL = Size(per_class=5000, test_per_class=1000, epochs=30, n_targets=16, targeted_per_target=100, patch_rate=0.01, blend_rate=0.01, model="otc-small", batch_size=256)
#: Attack splits: (attack, target class). Defaults are chosen on ``validation`` only.
SPLITS: dict[str, tuple[tuple[str, str], ...]] = {
    "validation": (("targeted", "truck"), ("backdoor-patch", "airplane"), ("backdoor-blend", "frog")),
    "heldout": (("targeted-augmented", "ship"), ("backdoor-hue", "cat"), ("backdoor-warp", "deer")),
    # added after every default was set; nothing is tuned on it
    "heldout-b": (("backdoor-sig", "horse"), ("backdoor-issba", "automobile"), ("text-trigger", "bird")),
}


def build_clean(work: Path, size: Size, seed: int) -> dict[str, Path]:
    """The clean training, test and target-pool slices shared by both splits."""
    data = work / "data"
    if (data / "clean.json").is_file():
        return {k: Path(v) for k, v in json.loads((data / "clean.json").read_text()).items()}
    for d in ("train", "test", "pool"):
        shutil.rmtree(data / d, ignore_errors=True)
    paths = {
        "train": cifar10_manifest(ZIP, data / "train", per_class=size.per_class, seed=seed),
        "test": cifar10_manifest(ZIP, data / "test", split="test", per_class=size.test_per_class, seed=seed),
        "pool": cifar10_manifest(ZIP, data / "pool", split="test", per_class=10, seed=seed, offset=size.test_per_class),
    }
    (data / "clean.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def build_split(work: Path, clean: dict[str, Path], size: Size, seed: int, split: str) -> dict[str, Path]:
    """The poisoned set of one attack split (cached under ``WORK/data/<split>``)."""
    data = work / "data" / split
    if (data / "done.json").is_file():
        return {k: Path(v) for k, v in json.loads((data / "done.json").read_text()).items()}
    shutil.rmtree(data, ignore_errors=True)
    n = size.per_class * 10
    cfgs = []
    for attack, target in SPLITS[split]:
        if attack in TARGETED:
            cfgs.append(PoisonConfig(attack, target, n_poison=size.n_targets * size.targeted_per_target, n_targets=size.n_targets, target_pool=clean["pool"], seed=seed))
        elif attack in TEXT_BACKDOORS:
            cfgs.append(PoisonConfig(attack, target, n_poison=max(1, round(size.text_rate * n)), seed=seed))
        else:
            rate = size.patch_rate if attack == "backdoor-patch" else size.blend_rate
            cfgs.append(PoisonConfig(attack, target, n_poison=max(1, round(rate * n)), seed=seed, patch_frac=size.patch_frac, blend_alpha=size.blend_alpha))
    res = poison_many(clean["train"], data / "poisoned", configs=cfgs)
    paths = {**clean, "poisoned": res.manifest_path, "truth": res.truth_path, "dir": data / "poisoned"}
    data.mkdir(parents=True, exist_ok=True)
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


def detection(run_dir: Path, truth: Path, attacks: tuple[tuple[str, str], ...]) -> dict[str, Any]:
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
    for attack, _ in attacks:
        ids = {i for i, a in poisoned.items() if a == attack}
        out[f"recall_{attack}"] = len(flagged & ids) / len(ids) if ids else 0.0
    return out


def trained(run_dir: Path, manifest: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Train (or reuse a run trained with this very config): final checkpoint, metrics, wall time."""
    out_json = run_dir / "trained.json"
    cached_cfg = run_dir / "config.json"
    same = cached_cfg.is_file() and json.loads(cached_cfg.read_text()) == json.loads(json.dumps(cfg.to_dict()))
    if out_json.is_file() and same:
        return dict(json.loads(out_json.read_text()))
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = train(manifest, run_dir, config=cfg)
    out = {
        "final": str(res.final_checkpoint),
        "metrics": [json.loads(x) for x in res.metrics_path.read_text().splitlines()],
        "wall_s": time.perf_counter() - t0,
    }
    out_json.write_text(json.dumps(out, indent=2))
    return out


def _trained_before(run_dir: Path, manifest: Path, cfg: TrainConfig) -> dict[str, Any]:
    """``--eval-only``: the run trained earlier in ``run_dir``, whatever config it had."""
    out_json = run_dir / "trained.json"
    if not out_json.is_file():
        raise SystemExit(f"--eval-only: {run_dir} has no trained run (train it without --eval-only first)")
    return dict(json.loads(out_json.read_text()))


def run_one(name: str, run_dir: Path, manifest: Path, paths: dict[str, Path], split: str, cfg: TrainConfig, *,
            eval_only: bool = False) -> dict[str, Any]:
    """Train ``name`` (cached; with ``eval_only`` the earlier run, whatever its config) and
    evaluate it against ``split``'s attacks."""
    tr = _trained_before(run_dir, manifest, cfg) if eval_only else trained(run_dir, manifest, cfg)
    metrics = tr["metrics"]
    bundle = load_checkpoint(Path(tr["final"]), device=cfg.device if cfg.device != "auto" else "cpu")
    pdir = paths["dir"]
    targets = pdir / "targets.csv"
    ev = evaluate(bundle, paths["test"], config=EvalConfig(targets=targets if targets.is_file() else None,
                                                             trigger=sorted(pdir.glob("trigger-*.json"))))
    out = {
        "name": name,
        "split": split,
        "defence": cfg.defence,
        "eval": ev.to_dict(),
        # all epochs' time over the scheduled epochs: a re-matching defence pays its passes
        # every K epochs (a median would leave them out), and a restarting one its
        # detection epochs on top of the schedule
        "epoch_s": sum(m["time_s"] for m in metrics) / cfg.epochs,
        "epoch_s_median": statistics.median(m["time_s"] for m in metrics),
        # the same in CPU seconds of the training process (steadier than wall time on a shared machine)
        "epoch_cpu_s": sum(m.get("cpu_s", float("nan")) for m in metrics) / cfg.epochs,
        "wall_s": tr["wall_s"],
        "detection": detection(run_dir, paths["truth"], SPLITS[split]) if manifest == paths.get("poisoned") else {},
        "metrics": metrics,
    }
    print(f"[{split}/{name}] zero-shot {ev.zero_shot_top1:.3f}  {tr['wall_s']:.0f}s", flush=True)
    return out


def table(results: list[dict[str, Any]], split: str) -> str:
    """One line per row and attack of ``split``; ``base`` is a backdoor's clean base rate
    (for a text trigger, the share of token-free queries that retrieve the target),
    ``learnt`` marks the attacks where ``none`` reaches an ASR of at least 50 %; ``x none``
    is a row's s/epoch over ``none``'s (empty without a ``none`` row), wall time and then
    the training process's CPU time (steadier on a shared machine)."""
    rows = [r for r in results if r["split"] == split]
    attacks = [a for a, _ in SPLITS[split]]

    def asr_of(r: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
        ev = r["eval"]
        out: dict[str, tuple[float, float | None]] = {}
        if ev["targeted"]:
            out[next(a for a in attacks if a in TARGETED)] = (ev["targeted"]["asr"], None)
        out.update({b["attack"]: (b["asr"], b.get("clean_rate")) for b in ev["backdoor"] + ev.get("text_backdoor", [])})
        return out

    none = next((asr_of(r) for r in rows if r["name"] == "none"), {})
    # s/epoch over none's, both trained by this invocation (a ratio across runs or loads means little)
    none_s = next((r["epoch_s"] for r in rows if r["name"] == "none"), None)
    none_cpu = next((r.get("epoch_cpu_s") for r in rows if r["name"] == "none"), None)
    w = max([26] + [len(r["name"]) + 2 for r in rows])
    head = f"{'row':<{w}}{'attack':<20}{'zero-shot':>10}{'lin.probe':>10}{'ASR':>8}{'base':>7}{'det.P':>8}{'det.R':>8}{'s/epoch':>9}{'x none':>8}{'cpu s/ep':>9}{'x none':>8}"
    lines = [f"## {split}: " + ", ".join(f"{a} -> {t}" for a, t in SPLITS[split]), head, "-" * len(head)]
    for r in rows:
        ev, det, asr = r["eval"], r["detection"], asr_of(r)
        for attack in ["clean"] + attacks:
            a, base = asr.get(attack, (None, None))
            p = det.get("precision") if det and attack != "clean" else None
            rc = det.get(f"recall_{attack}") if det else None
            ratio = f"{r['epoch_s'] / none_s:.2f}" if none_s else ""
            cpu_ratio = f"{r['epoch_cpu_s'] / none_cpu:.2f}" if none_cpu and "epoch_cpu_s" in r else ""
            learnt = "" if attack == "clean" or attack not in none else ("" if none[attack][0] >= 0.5 else " (none <50%)")
            lines.append(
                f"{r['name']:<{w}}{attack:<20}{ev['zero_shot_top1']*100:>10.1f}{ev['linear_probe']*100:>10.1f}"
                f"{'' if a is None or attack == 'clean' else f'{a*100:.1f}':>8}{'' if base is None else f'{base*100:.1f}':>7}"
                f"{'' if p is None else f'{p*100:.1f}':>8}{'' if rc is None else f'{rc*100:.1f}':>8}{r['epoch_s']:>9.1f}{ratio:>8}{r.get('epoch_cpu_s', float('nan')):>9.1f}{cpu_ratio:>8}{learnt}"
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


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` updated by ``b``, nested dicts merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU size")
    ap.add_argument("--work", type=Path, default=Path("/tmp/otcclip-bench-defence"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--splits", default="validation,heldout", help="attack splits, comma separated: " + ", ".join(SPLITS))
    ap.add_argument("--results", type=Path, default=None,
                    help="where to write the results JSON (default WORK/results.json; give another file when "
                         "benchmarks of other splits share WORK)")
    ap.add_argument(
        "--defences", default=",".join(("clean", "oracle", *ROWS)),
        help="rows, comma separated: " + ", ".join(("clean", "oracle", *ROWS)) + "; 'ROW:field=value' adds TrainConfig "
             "overrides by dotted path (e.g. otcclip+:template_search=false, otcclip:sanitize.decisions.margin_z=2), "
             "values as JSON; 'clean/ROW[:field=value]' trains the row on the clean data",
    )
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate the runs already trained under WORK (their trained.json), even where the code's "
                         "TrainConfig has changed since; a row without a trained run is an error")
    ap.add_argument("--per-class", type=int, default=None, help="override the training images per class")
    ap.add_argument("--test-per-class", type=int, default=None, help="override the test images per class")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--patch-rate", type=float, default=None, help="override the patch backdoor's share of the training images")
    ap.add_argument("--blend-rate", type=float, default=None, help="override the other backdoors' share of the training images")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.per_class:
        size = replace(size, per_class=args.per_class)
    if args.test_per_class:
        size = replace(size, test_per_class=args.test_per_class)
    if args.epochs:
        size = replace(size, epochs=args.epochs)
    if args.patch_rate is not None:
        size = replace(size, patch_rate=args.patch_rate)
    if args.blend_rate is not None:
        size = replace(size, blend_rate=args.blend_rate)
    splits = [x for x in args.splits.split(",") if x]
    unknown = [x for x in splits if x not in SPLITS]
    if unknown:
        ap.error(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clean = build_clean(work, size, args.seed)
    base = TrainConfig(
        model=size.model, epochs=size.epochs, batch_size=size.batch_size, seed=args.seed, device=args.device,
        lr=size.lr, lr_warmup_steps=50,
    )
    results = []
    for split in splits:
        paths = build_split(work, clean, size, args.seed, split)
        for name in args.defences.split(","):
            if name == "clean":  # trained once, evaluated against each split
                results.append(run_one("none (clean)", work / "runs" / "clean", paths["train"], paths, split, base, eval_only=args.eval_only))
            elif name == "oracle":
                results.append(run_one("none (poison removed)", work / "runs" / split / "oracle", oracle_manifest(paths), paths, split, base, eval_only=args.eval_only))
            else:  # a row of ROWS, optionally with overrides: "otcclip+:restart=false"
                on_clean = name.startswith("clean/")
                row, *opts = name.removeprefix("clean/").split(":")
                if row not in ROWS:
                    ap.error(f"unknown row {row!r}; choose from {list(ROWS)}")
                # each defence's own warm-up / re-match schedule (DEFAULT_SCHEDULE) unless overridden
                over = _merge({"warmup_epochs": -1, "rematch_every": -1, **ROWS[row]}, _overrides(opts))
                cfg = from_dict(TrainConfig, over, base=base)
                if on_clean:  # like "clean": trained once, evaluated against each split
                    run_dir, manifest = work / "runs" / "clean" / name.removeprefix("clean/").replace("/", "_"), paths["train"]
                else:
                    run_dir, manifest = work / "runs" / split / name.replace("/", "_"), paths["poisoned"]
                results.append(run_one(name, run_dir, manifest, paths, split, cfg, eval_only=args.eval_only))
    print()
    print(f"# defence bench, {dt.date.today().isoformat()}, size={'quick' if args.quick else 'full'} "
          f"({size.per_class * 10} train pairs, {size.test_per_class * 10} test, {size.model}, {size.epochs} epochs, seed {args.seed}), "
          f"total {time.perf_counter() - t0:.0f}s, device {args.device}")
    for split in splits:
        print(table(results, split))
        print()
    (args.results or work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
