"""Where the decide stage's memory goes, per pair, on synthetic score shards.

Writes ``N`` synthetic pairs as score shards (``ScoreShard.save``: K = k + 1 candidate
columns, float16 globals of width ``d``) to a temporary directory, then runs
:func:`otcclip.models.sanitize.decide` on the saved paths (what a job does) and prints,
per size: the decide step's peak traced (numpy / Python) memory and its peak RSS above
the process's RSS before it (``VmHWM`` reset through ``/proc/self/clear_refs``), both
per pair, and its peak anonymous RSS above the start (``RssAnon``, sampled every 10 ms:
RSS without the file-backed pages of memory-mapped arrays, which the kernel can drop);
``--breakdown`` adds the traced memory per component. Each size runs in a fresh process.
With two sizes or more it ends with each peak's growth per extra pair between the two
largest sizes (above ``gmm_sample`` = 200,000 readable pairs the GMM's sample stops
growing), and calls a peak ``bounded`` when that growth is below ``--bound``
bytes (default 64: decide's result keeps four string columns of 8-byte object pointers
per pair in RAM), else ``linear``.

It imports ``otcclip`` as the interpreter finds it: from a worktree whose virtualenv
is another checkout's editable install, run it with ``PYTHONPATH=.`` to measure the
worktree's code.

Usage::

    PYTHONPATH=. .venv/bin/python bench/decide_memory.py --sizes 50000,200000 [--d 64] [--breakdown]
        [--detectors density,caption_burst | --detectors default]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class AnonPeak:
    """Largest ``RssAnon`` seen while the ``with`` block runs (sampled every 10 ms)."""

    def __enter__(self) -> AnonPeak:
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status("RssAnon"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("RssAnon"))


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


#: Entries of the synthetic content thumbnails (``features.THUMB_SIDE ** 2``) and purified views.
THUMB, VIEWS = 64, 2


def write_shards(root: Path, n: int, *, d: int, k: int, shard_size: int, seed: int = 0) -> list[Path]:
    """Synthetic score shards of ``n`` pairs: random unit globals, own caption in column
    0, random candidates, OT scores on the first half of the columns (NaN beyond), and
    what every default detector reads: image hashes and content thumbnails (1% exact
    image copies), caption hashes (1% repeated captions), purified-view scores."""
    from otcclip.models.scores import MatchScores
    from otcclip.models.shards import ScoreShard

    rng = np.random.default_rng(seed)
    paths = []
    for s in range(0, n, shard_size):
        e = min(n, s + shard_size)
        m = e - s
        img = rng.standard_normal((m, d)).astype(np.float32)
        cap = (img + rng.standard_normal((m, d))).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        cap /= np.linalg.norm(cap, axis=1, keepdims=True)
        cand = np.concatenate([np.arange(s, e)[:, None], rng.integers(0, n, (m, k))], axis=1).astype(np.int64)
        glob = rng.normal(0.2, 0.05, (m, k + 1)).astype(np.float32)
        ot = rng.normal(0.3, 0.05, (m, k + 1)).astype(np.float32)
        ot[:, (k + 1) // 2:] = np.nan
        ihash = rng.integers(1, 2**62, m)
        chash = np.arange(s, e, dtype=np.int64)
        thumb = rng.standard_normal((m, THUMB)).astype(np.float32)
        # 1% of the pairs repeat the image of the pair before them (exact copies: one
        # pixel hash, one embedding, one thumbnail) under a caption of their own, and 1%
        # repeat the caption of the pair before them: duplicates, image_burst and
        # caption_burst see real groups
        dup = np.nonzero(rng.random(m) < 0.01)[0]
        dup = dup[dup > 0]
        img[dup], ihash[dup], thumb[dup] = img[dup - 1], ihash[dup - 1], thumb[dup - 1]
        rep = np.nonzero(rng.random(m) < 0.01)[0]
        rep = rep[rep > 0]
        chash[rep] = chash[rep - 1]
        thumb /= np.linalg.norm(thumb, axis=1, keepdims=True)
        glob[:, 0] = (img * cap).sum(axis=1)
        # own-caption scores of the purified views: a small drop, a few pairs collapse
        purified = (glob[:, :1] - rng.normal(0.02, 0.01, (m, VIEWS))).astype(np.float32)
        purified[rng.random(m) < 0.001] -= 0.3
        fused = np.where(np.isfinite(ot), 0.5 * glob + 0.5 * ot, glob).astype(np.float32)
        sc = MatchScores(candidates=cand, global_=glob, ot=ot, fused=fused, ok=np.ones(m, bool),
                         image_global=img.astype(np.float16), caption_global=cap.astype(np.float16),
                         caption_hash=chash, image_hash=ihash, row_key=rng.integers(1, 2**62, m),
                         purified_own=purified, image_thumb=thumb.astype(np.float16))
        paths.append(ScoreShard(s, e, sc).save(root / f"scores_{s:09d}.npz"))
    return paths


def breakdown(paths: list[Path], n: int, cfg: object) -> None:
    """Traced bytes per pair of the inputs (all shards stacked), of ``decide_pairs``
    without and with the detectors, and of its output."""
    from dataclasses import fields, replace

    from otcclip.models.decisions import DetectorEnv, decide_pairs
    from otcclip.models.scores import MatchScores
    from otcclip.models.shards import ScoreShard

    m = MatchScores.stack((ScoreShard.load(p).scores for p in paths), n)
    print("\ninput (MatchScores of all pairs), bytes per pair:")
    for f in fields(MatchScores):
        a = getattr(m, f.name)
        if a is not None:
            print(f"  {f.name:16s} {a.dtype!s:8s} {a.shape!s:14s} {a.nbytes / n:7.1f}")
    print(f"  {'total':16s} {'':8s} {'':14s} {sum(getattr(m, f.name).nbytes for f in fields(MatchScores) if getattr(m, f.name) is not None) / n:7.1f}")
    st = cfg.decisions  # type: ignore[attr-defined]
    env = DetectorEnv(index=cfg.index, seed=cfg.seed)  # type: ignore[attr-defined]
    for label, s in (("decide_pairs, no detectors", replace(st, detectors=())), ("decide_pairs, detectors " + ",".join(st.detectors), st)):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        d = decide_pairs(m, settings=s, env=env)
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{label}: peak above its input {(peak - base) / n:.0f} B/pair; output held {(cur - base) / n:.0f} B/pair")
    out = sum(v.nbytes for v in vars(d).values() if isinstance(v, np.ndarray))
    print(f"Decisions arrays: {out / n:.0f} B/pair (object columns: 8 B pointers, strings shared or extra)")


def _detectors(spec: str) -> tuple[str, ...]:
    """``--detectors``: comma-separated names, or ``default`` (``DEFAULT_DETECTORS``)."""
    from otcclip.models.config.detectors import DEFAULT_DETECTORS

    return DEFAULT_DETECTORS if spec == "default" else tuple(spec.split(","))


def measure(n: int, args: argparse.Namespace) -> dict[str, float]:
    """Write ``n`` synthetic pairs as score shards, run decide on their paths, return its
    seconds and peaks (bytes above the start)."""
    import faiss

    from otcclip.models.config import DecisionSettings
    from otcclip.models.sanitize import SanitizeConfig, decide

    faiss.omp_set_num_threads(args.threads)
    cfg = SanitizeConfig(device="cpu", decisions=DecisionSettings(detectors=_detectors(args.detectors)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), n, d=args.d, k=cfg.k, shard_size=cfg.shard_size)
        gc.collect()
        rss0, anon0 = _status("VmRSS"), _status("RssAnon")
        reset_peak_rss()
        tracemalloc.start()
        t0 = time.perf_counter()
        with AnonPeak() as ap:
            d = decide(paths, config=cfg)
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out = {"n": n, "s": dt, "traced": peak, "rss": _status("VmHWM") - rss0, "anon": ap.peak - anon0}
        del d
        if args.breakdown:
            breakdown(paths, n, cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50000,200000")
    ap.add_argument("--d", type=int, default=64, help="embedding width of the synthetic globals")
    ap.add_argument("--detectors", default="density,caption_burst", help="enabled detectors, comma-separated, or 'default'")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bound", type=float, default=64.0,
                    help="growth in bytes per extra pair below which a peak counts as bounded")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one size, in this process
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args)), flush=True)
        return
    from otcclip.models.sanitize import SanitizeConfig

    cfg = SanitizeConfig()
    print(f"# decide memory: d={args.d}, K={cfg.k + 1}, shard_size={cfg.shard_size}, "
          f"detectors {','.join(_detectors(args.detectors))}; "
          "each size in a fresh process")
    print("| pairs | decide s | peak traced MB | traced B/pair | peak RSS above start MB | RSS B/pair "
          "| peak anon RSS above start MB | anon B/pair |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), "--d", str(args.d), "--detectors", args.detectors,
               "--threads", str(args.threads)] + (["--breakdown"] if args.breakdown else [])
        res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        lines = res.stdout.splitlines()
        r = json.loads(lines[-1])
        rows.append(r)
        print(f"| {n:,} | {r['s']:.1f} | {r['traced'] / 2**20:.0f} | {r['traced'] / n:.0f} | {r['rss'] / 2**20:.0f} "
              f"| {r['rss'] / n:.0f} | {r['anon'] / 2**20:.0f} | {r['anon'] / n:.0f} |", flush=True)
        if args.breakdown:
            print("\n".join(lines[:-1]))
    if len(rows) >= 2:
        lo, hi = sorted(rows, key=lambda r: r["n"])[-2:]
        dn = hi["n"] - lo["n"]
        print(f"\ngrowth per extra pair, {lo['n']:,} -> {hi['n']:,} pairs (bounded: below {args.bound:g} B):")
        for key, label in (("traced", "peak traced"), ("anon", "peak anon RSS"), ("rss", "peak RSS (with mapped file pages)")):
            g = (hi[key] - lo[key]) / dn
            print(f"  {label}: {g:.0f} B/pair -> {'bounded' if g < args.bound else 'linear'}")


if __name__ == "__main__":
    main()
