"""Detectors of the sanitize pass on the validation and held-out attacks of ``bench/defence.py``.

For each attack split, the poisoned manifest is scored once with a plain CLIP trained on
it (``bench/defence.py --defences none``; the sanitize engine's encode and match stages,
spilled to ``WORK/<split>/shards`` and reused by a re-run), and the same
:class:`~otcclip.models.scores.MatchScores` are then judged

- by each registered detector alone (its raw flags; the ``spectral`` detector on a grid of
  ``outlier_z`` x ``group_size``), and
- by the decision step (:func:`~otcclip.models.decisions.decide_pairs`, then the
  trigger-template search): the default detector set, and the default set with the chosen
  ``spectral`` setting. A pair counts as flagged when its action is not ``keep``; pairs
  kept for review are counted apart.

Every row reports flagged pairs, precision, recall per attack (``poison_truth.csv``) and
the clean pairs flagged (the false-flag rate, over all clean pairs).

Selection, on ``validation`` only (:func:`choose_spectral`, :func:`earns_place`): the
``spectral`` setting with the best recall over all poisoned pairs whose raw false-flag
rate is at most ``--max-false-flag`` (1 %); it earns a place in the default set only when
its flags, added to the union of the default detectors' own flags, catch more poisoned
pairs while adding at most that rate of the clean pairs. ``heldout`` is then reported with
the validation choice and never tuned on (run alone, it reads the choice from an earlier
``--out/results.json``).

The ``collapse`` detector is selected by the same rule on its own grid
(``COLLAPSE_KNN`` x ``COLLAPSE_Z`` x ``COLLAPSE_SHARE``, :func:`choose_collapse`), measured
against the union of the other default detectors; the decision rows show the default set
without it, and with it kept for review or acting under a weak model.

    python bench/detectors.py --work /tmp/dbench/quick        # both splits of the quick bench
    python bench/detectors.py --work /tmp/dbench/quick --splits validation

Expects ``WORK/data/<split>/done.json`` and ``WORK/runs/<split>/none/final`` (what
``bench/defence.py --quick --work /tmp/dbench --splits <split> --defences none`` builds).
Writes ``--out`` (JSON of every row).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from otcclip.models.checkpoint import load_checkpoint  # noqa: E402
from otcclip.models.config.detectors import (  # noqa: E402
    DEFAULT_DETECTORS,
    DETECTORS,
    CollapseSettings,
    SpectralSettings,
)
from otcclip.models.config.sanitize import SanitizeConfig  # noqa: E402
from otcclip.models.decisions import Decisions, decide_pairs  # noqa: E402
from otcclip.models.detectors import REGISTRY, DetectorEnv  # noqa: E402
from otcclip.models.manifest import read_manifest  # noqa: E402
from otcclip.models.sanitize import sanitize, search_trigger_templates  # noqa: E402
from otcclip.models.scores import MatchScores  # noqa: E402
from otcclip.models.shards import ScoreShard  # noqa: E402

#: The spectral grid searched on validation.
OUTLIER_Z = (2.0, 3.0, 4.0, 6.0)
GROUP_SIZE = (50, 100, 200, 400)
#: The collapse grid searched on validation (the other settings at their defaults).
COLLAPSE_KNN = (5, 10, 20)
COLLAPSE_Z = (2.0, 3.0, 4.0)
COLLAPSE_SHARE = (0.6, 0.9)


@dataclass
class Split:
    """One attack split: its pairs' ids, the truth and the scores of its plain model."""

    name: str
    ids: list[str]
    attack: dict[str, str]  # poisoned id -> attack
    attacks: list[str]
    scores: MatchScores
    manifest: Any
    bundle: Any
    default: Decisions  # the sanitize pass with its default config (template search included)
    quality: dict[str, Any]


def load_split(work: Path, split: str, out_dir: Path, config: SanitizeConfig) -> Split:
    """Score ``split``'s poisoned set once (cached shards) and run the default sanitize pass."""
    paths = json.loads((work / "data" / split / "done.json").read_text())
    ckpt = work / "runs" / split / "none" / "final"
    if not (ckpt / "open_clip_config.json").is_file():
        raise SystemExit(f"{ckpt}: no checkpoint; run bench/defence.py --splits {split} --defences none first")
    manifest = read_manifest(Path(paths["poisoned"]), local=True)
    with open(paths["truth"]) as f:
        rows = list(csv.DictReader(f))
    attack = {r["id"]: r["attack"] for r in rows if r["poisoned"] == "1"}
    attacks = sorted(set(attack.values()))
    shards = out_dir / split / "shards"
    key = {"checkpoint": str(ckpt.resolve()), "ckpt_mtime": (ckpt / "open_clip_config.json").stat().st_mtime,
           "manifest": paths["poisoned"], "config": config.to_dict()}
    meta = shards / "key.json"
    if meta.is_file() and json.loads(meta.read_text()) != json.loads(json.dumps(key)):
        shutil.rmtree(shards)
    shards.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(key))
    bundle = load_checkpoint(ckpt, device="cpu")
    t0 = time.perf_counter()
    res = sanitize(manifest, bundle, config=config, work_dir=shards)
    print(f"[{split}] {len(manifest)} pairs scored and decided in {time.perf_counter() - t0:.0f} s "
          f"({ckpt}); model: {res.decisions.model_quality.get('verdict')} "
          f"(control AUC {res.decisions.model_quality.get('control_auc', float('nan')):.3f}, "
          f"d' {res.decisions.model_quality.get('control_d_prime', float('nan')):.2f})", flush=True)
    scores = MatchScores.concat([ScoreShard.load(p).scores for p in sorted(shards.glob("scores_*.npz"))])
    return Split(split, list(manifest.ids), attack, attacks, scores, manifest, bundle, res.decisions,
                 res.decisions.model_quality)


def measure(sp: Split, flagged: np.ndarray, review: np.ndarray | None = None) -> dict[str, Any]:
    """Flagged count, precision, recall per attack and clean pairs flagged of an (N,) bool flag."""
    bad = np.array([i in sp.attack for i in sp.ids])
    att = np.array([sp.attack.get(i, "") for i in sp.ids], dtype=object)
    n_clean = int((~bad).sum())
    out: dict[str, Any] = {
        "flagged": int(flagged.sum()),
        "precision": float((flagged & bad).sum() / flagged.sum()) if flagged.any() else float("nan"),
        "recall_all": float((flagged & bad).sum() / bad.sum()),
        "clean_flagged": int((flagged & ~bad).sum()),
        "false_flag_rate": float((flagged & ~bad).sum() / max(n_clean, 1)),
        "n_clean": n_clean,
    }
    for a in sp.attacks:
        sel = att == a
        out[f"recall_{a}"] = float((flagged & sel).sum() / sel.sum())
    if review is not None:
        out["review"] = int(review.sum())
        out["review_poisoned"] = int((review & bad).sum())
        out["review_clean"] = int((review & ~bad).sum())
        either = flagged | review
        out["recall_all_incl_review"] = float((either & bad).sum() / bad.sum())
        out["false_flag_rate_incl_review"] = float((either & ~bad).sum() / max(n_clean, 1))
    return out


def raw_flags(sp: Split, name: str, settings: Any, env: DetectorEnv) -> np.ndarray:
    """One detector's own (N,) bool flags on the split's scores (unreadable images never flagged)."""
    return np.asarray(REGISTRY[name].fn(sp.scores, settings, env)) & sp.scores.ok


def decisions_with(sp: Split, config: SanitizeConfig, env: DetectorEnv) -> Decisions:
    """The decide stage and the template search on the split's cached scores."""
    d = decide_pairs(sp.scores, settings=config.decisions, env=env)
    return search_trigger_templates(sp.manifest, sp.bundle, d, config=config)


def acted(d: Decisions) -> tuple[np.ndarray, np.ndarray]:
    """(flagged: action other than keep, kept for review), each (N,) bool."""
    return np.asarray(d.action != "keep"), np.asarray(d.review, dtype=bool)


def spectral_grid(sp: Split, env: DetectorEnv) -> list[tuple[SpectralSettings, dict[str, Any]]]:
    """Raw spectral flags for every setting of the grid."""
    out = []
    for gs in GROUP_SIZE:
        for z in OUTLIER_Z:
            st = SpectralSettings(group_size=gs, outlier_z=z)
            out.append((st, measure(sp, raw_flags(sp, "spectral", st, env))))
    return out


def choose_spectral(grid: list[tuple[SpectralSettings, dict[str, Any]]], max_ffr: float) -> SpectralSettings | None:
    """The setting with the best recall over all poisoned pairs among those whose raw
    false-flag rate is at most ``max_ffr`` (ties: fewer clean flags, then the larger
    ``outlier_z``); None when none qualifies or none finds anything."""
    ok = [(st, m) for st, m in grid if m["false_flag_rate"] <= max_ffr and m["recall_all"] > 0]
    if not ok:
        return None
    return max(ok, key=lambda t: (t[1]["recall_all"], -t[1]["clean_flagged"], t[0].outlier_z))[0]


def earns_place(base: np.ndarray, spectral: np.ndarray, sp: Split, max_ffr: float) -> tuple[bool, dict[str, Any]]:
    """Spectral joins the defaults when its flags, added to the union of the default
    detectors' own flags (``base``, (N,) bool), catch more poisoned pairs while adding at
    most ``max_ffr`` of the clean pairs as new false flags. Returns the verdict and the
    union's measures."""
    before, after = measure(sp, base), measure(sp, base | spectral)
    added_ffr = (after["clean_flagged"] - before["clean_flagged"]) / max(before["n_clean"], 1)
    return bool(after["recall_all"] > before["recall_all"] and added_ffr <= max_ffr), after


def collapse_grid(sp: Split, env: DetectorEnv) -> list[tuple[CollapseSettings, dict[str, Any]]]:
    """Raw collapse flags for every setting of the collapse grid."""
    return [(st, measure(sp, raw_flags(sp, "collapse", st, env)))
            for st in (CollapseSettings(knn=k, tight_z=z, caption_share=c)
                       for k in COLLAPSE_KNN for z in COLLAPSE_Z for c in COLLAPSE_SHARE)]


def choose_collapse(grid: list[tuple[CollapseSettings, dict[str, Any]]], max_ffr: float) -> CollapseSettings | None:
    """The collapse setting with the best recall over all poisoned pairs among those whose
    raw false-flag rate is at most ``max_ffr`` (ties: fewer clean flags, then the larger
    ``tight_z``, the larger ``caption_share``, the smaller ``knn``); None when none
    qualifies or none finds anything."""
    ok = [(st, m) for st, m in grid if m["false_flag_rate"] <= max_ffr and m["recall_all"] > 0]
    if not ok:
        return None
    return max(ok, key=lambda t: (t[1]["recall_all"], -t[1]["clean_flagged"], t[0].tight_z, t[0].caption_share,
                                  -t[0].knn))[0]


def _col(st: CollapseSettings) -> str:
    return f"collapse knn={st.knn} tight_z={st.tight_z:g} share={st.caption_share:g}"


def _pct(x: float) -> str:
    return "" if x != x else f"{100 * x:.1f}"


def table(rows: list[dict[str, Any]], attacks: list[str], title: str) -> str:
    """Rows labelled split / kind / row; recall per attack; review columns when present."""
    head = (f"{'split':<11}{'kind':<10}{'row':<44}{'flagged':>8}{'prec.%':>8}"
            + "".join(f"{'R ' + a:>22}" for a in attacks) + f"{'R all%':>8}{'clean fl.':>10}{'FFR%':>7}{'review(p/c)':>13}"
            + (f"{'R+rev%':>10}{'FFR+rev%':>10}" if any("review" in r["m"] for r in rows) else ""))
    lines = [f"## {title}", head, "-" * len(head)]
    for r in rows:
        m = r["m"]
        rev = f"{m['review']}({m['review_poisoned']}/{m['review_clean']})" if "review" in m else ""
        lines.append(
            f"{r['split']:<11}{r['kind']:<10}{r['row']:<44}{m['flagged']:>8}{_pct(m['precision']):>8}"
            + "".join(f"{_pct(m.get('recall_' + a, float('nan'))):>22}" for a in attacks)
            + f"{_pct(m['recall_all']):>8}{m['clean_flagged']:>10}{_pct(m['false_flag_rate']):>7}{rev:>13}"
            + (f"{_pct(m['recall_all_incl_review']):>10}{_pct(m['false_flag_rate_incl_review']):>10}" if "review" in m else "")
        )
    return "\n".join(lines)


def _spec(st: SpectralSettings) -> str:
    return f"spectral group_size={st.group_size} outlier_z={st.outlier_z:g}"


def search_rows(split: str, sp: Split, env: DetectorEnv, name: str, *, grid: Callable[[Split, DetectorEnv], Any],
                choose: Callable[[Any, float], Any], default: Any, best: Any, label: Callable[[Any], str],
                base: np.ndarray, base_name: str, max_ffr: float) -> tuple[list[dict[str, Any]], Any, bool | None]:
    """One detector's settings search: on validation its grid's rows and its choice (best
    recall at a raw false-flag rate of at most ``max_ffr``); on held-out the rows of the
    validation choice and of its defaults. With a choice, also the row of ``base`` (the
    other detectors' union) plus its flags, and on validation whether it earns its place.

    Returns
    -------
    rows, best, adopt
        ``adopt`` is None off validation (the choice is never made there).
    """
    rows: list[dict[str, Any]] = []
    if split == "validation":
        found = grid(sp, env)
        rows += [{"split": split, "kind": "raw", "row": label(st), "m": m} for st, m in found]
        best = choose(found, max_ffr)
    else:
        shown = [st for st in (best, default) if st is not None]
        rows += [{"split": split, "kind": "raw", "row": label(st), "m": measure(sp, raw_flags(sp, name, st, env))}
                 for st in dict.fromkeys(shown)]
    adopt = None
    if best is not None:
        ok, after = earns_place(base, raw_flags(sp, name, best, env), sp, max_ffr)
        rows.append({"split": split, "kind": "raw", "row": f"{base_name} + " + label(best), "m": after})
        if split == "validation":
            adopt = ok
    return rows, best, adopt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dbench/quick"), help="bench/defence.py's WORK/quick or WORK/full")
    ap.add_argument("--splits", default="validation,heldout", help="validation first: it chooses, heldout reports")
    ap.add_argument("--out", type=Path, default=Path("/tmp/otcclip-bench-detectors"), help="score shards and results.json")
    ap.add_argument("--max-false-flag", type=float, default=0.01, help="largest false-flag rate a chosen setting may have")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = [s for s in args.splits.split(",") if s]
    config = SanitizeConfig(device="cpu")
    env = DetectorEnv(index=config.index, seed=config.seed)
    base_dec = config.decisions
    chosen: SpectralSettings | None = None
    adopt = False
    best_val: SpectralSettings | None = None
    best_col: CollapseSettings | None = None
    col_adopt = False
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    print(f"# detectors bench, {dt.date.today().isoformat()}, work {args.work}, default detectors: {', '.join(DEFAULT_DETECTORS)}")
    previous = args.out / "results.json"
    if "validation" not in splits and previous.is_file():
        prev = json.loads(previous.read_text()).get("best_spectral_validation")
        best_val = None if prev is None else SpectralSettings(**prev)
        print(f"validation choice read from {previous}: {None if best_val is None else _spec(best_val)}")
        prev_c = json.loads(previous.read_text()).get("best_collapse_validation")
        best_col = None if prev_c is None else CollapseSettings(**prev_c)
        print(f"collapse choice read from {previous}: {None if best_col is None else _col(best_col)}")
    for split in splits:
        sp = load_split(args.work, split, args.out, config)
        raw: list[dict[str, Any]] = []
        union = np.zeros(len(sp.ids), dtype=bool)
        others = np.zeros(len(sp.ids), dtype=bool)  # the defaults but collapse: what collapse must add to
        for name in DETECTORS:
            if name == "spectral":
                continue
            f = raw_flags(sp, name, base_dec.detector(name), env)
            if name in base_dec.detectors:
                union |= f
                if name != "collapse":
                    others |= f
            raw.append({"split": split, "kind": "raw", "row": f"{name} (defaults)", "m": measure(sp, f)})
        raw.append({"split": split, "kind": "raw", "row": "union of the defaults but collapse", "m": measure(sp, others)})
        raw.append({"split": split, "kind": "raw", "row": "union of the default detectors", "m": measure(sp, union)})
        searches = (("spectral", spectral_grid, choose_spectral, SpectralSettings(), best_val, _spec, union, "union"),
                    ("collapse", collapse_grid, choose_collapse, CollapseSettings(), best_col, _col, others,
                     "union but collapse"))
        found: dict[str, tuple[Any, bool | None]] = {}
        for name, grid, choose, default, best, label, base, base_name in searches:
            rows, best, ok = search_rows(split, sp, env, name, grid=grid, choose=choose, default=default, best=best,
                                         label=label, base=base, base_name=base_name, max_ffr=args.max_false_flag)
            raw += rows
            found[name] = (best, ok)
        best_val, ok = found["spectral"]
        if ok is not None:
            adopt = ok
            chosen = best_val if adopt else None
        best_col, ok = found["collapse"]
        if ok is not None:
            col_adopt = ok
        flagged, review = acted(sp.default)
        dec = [{"split": split, "kind": "decision", "row": "default set (sanitize pass)", "m": measure(sp, flagged, review)}]
        if best_val is not None:
            cfg = replace(config, decisions=replace(base_dec, detectors=tuple(dict.fromkeys((*base_dec.detectors, "spectral"))),
                                                    spectral=best_val))
            f2, r2 = acted(decisions_with(sp, cfg, env))
            dec.append({"split": split, "kind": "decision", "row": "default set + " + _spec(best_val), "m": measure(sp, f2, r2)})
        without_c = tuple(d for d in base_dec.detectors if d != "collapse")
        weak_wo = tuple(d for d in base_dec.weak_model_detectors if d != "collapse")
        cfg = replace(config, decisions=replace(base_dec, detectors=without_c, weak_model_detectors=weak_wo))
        f3, r3 = acted(decisions_with(sp, cfg, env))
        dec.append({"split": split, "kind": "decision", "row": "default set without collapse", "m": measure(sp, f3, r3)})
        if best_col is not None:
            with_c = (*without_c, "collapse")
            for weak in (weak_wo, (*weak_wo, "collapse")):
                cfg = replace(config, decisions=replace(base_dec, detectors=with_c, collapse=best_col, weak_model_detectors=weak))
                f3, r3 = acted(decisions_with(sp, cfg, env))
                label = "acts" if "collapse" in weak else "review"
                dec.append({"split": split, "kind": "decision", "row": f"others + {_col(best_col)} (weak model: {label})",
                            "m": measure(sp, f3, r3)})
        print(f"[{split}] model quality: {sp.quality.get('message', '')}")
        print(table(raw, sp.attacks, f"{split}: each detector's own flags"))
        print()
        print(table(dec, sp.attacks, f"{split}: sanitize decisions (flagged = action not keep; review = kept for review)"))
        print()
        if split == "validation":
            if best_val is None:
                print(f"[selection] no spectral setting flags a poisoned pair at a false-flag rate <= {100 * args.max_false_flag:g} %: "
                      "spectral stays off")
            else:
                print(f"[selection] best spectral setting on validation: {_spec(best_val)}; "
                      + ("it earns its place in the default set" if adopt else
                         "it does not earn a place in the default set (it adds no poisoned pair to the default detectors' "
                         "flags, or too many clean ones): spectral stays off"))
            if best_col is None:
                print(f"[selection] no collapse setting flags a poisoned pair at a false-flag rate <= {100 * args.max_false_flag:g} %: "
                      "collapse stays off")
            else:
                print(f"[selection] best collapse setting on validation: {_col(best_col)}; "
                      + ("it earns its place in the default set" if col_adopt else
                         "it does not earn a place in the default set (it adds no poisoned pair to the default detectors' "
                         "flags, or too many clean ones): collapse stays off"))
            print()
        results += [dict(r, attacks=sp.attacks) for r in raw + dec]
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"date": dt.date.today().isoformat(), "work": str(args.work), "max_false_flag": args.max_false_flag,
               "best_spectral_validation": None if best_val is None else best_val.to_dict(),
               "spectral_adopted": adopt,
               "best_collapse_validation": None if best_col is None else best_col.to_dict(), "collapse_adopted": col_adopt, "chosen": None if chosen is None else chosen.to_dict(), "rows": results,
               "seconds": time.perf_counter() - t0}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
