"""Benchmarks of the sanitization engine; prints three tables.

1. The OT stage, old path against new path on the same problems: the engine's former
   solver (POT's ``ot.batch.solve_batch`` in the log domain below ``reg = 0.1``, one
   convergence test for the whole batch) against :func:`otcclip.models.ot.ot_distance`
   (plain-domain float32 where the cost range allows it, per-problem stopping).
2. End to end on a poisoned CIFAR-10 slice (10 % of the captions swapped to another
   class) with an ``otc-tiny`` model trained on the clean slice, at the default settings
   (k = 32): seconds per stage, the OT stage as a share of the encode stage, and the
   decisions (recall and precision of the swapped pairs among the pairs not kept; the
   pairs kept for review, the swapped ones among them, and the model check's verdict:
   under a model judged weak the decision step changes no caption and marks them). The
   same features are matched again with the old path (old solver, no pruning) for the
   comparison.
3. Scaling on synthetic features at the default settings: ms per pair for match and
   decide, peak memory, and the decide step's own peak memory (on saved score shards,
   as a job runs it), per size.

``--gpu N`` instead runs the whole engine on a CUDA device (``bench/gpu.sh`` installs and
calls it): ``ViT-B-32`` with random weights encodes ``N`` synthetic images (random
pixels, no decoding) and captions in float16, OT on the device, the FAISS shortlist on
the GPU when faiss has GPU support, decisions with the detectors that need no purified
views; pairs/s per stage and end to end.

Usage::

    .venv/bin/python bench/sanitize.py [--quick] [--million] [--threads 1]
    python bench/sanitize.py --gpu 100000
"""

from __future__ import annotations

import argparse
import csv
import gc
import random
import resource
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import ot
import ot.batch
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def old_ot_scores(x: torch.Tensor, y: torch.Tensor, *, settings: Any, y_mask: torch.Tensor | None = None,
                  x_mask: torch.Tensor | None = None, batch_size: int = 256, **_: Any) -> torch.Tensor:
    """``1 - <T, C>`` as the engine computed it before: POT's batched solver, uniform
    marginals, log domain unless ``reg >= 0.1``, the batch stops when all converged."""
    out = []
    method = "sinkhorn" if settings.reg >= 0.1 else "log_sinkhorn"
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xf, yf = x[s:s + batch_size].float(), y[s:s + batch_size].float()
            xm = torch.ones(xf.shape[:2], dtype=torch.bool) if x_mask is None else x_mask[s:s + batch_size]
            ym = torch.ones(yf.shape[:2], dtype=torch.bool) if y_mask is None else y_mask[s:s + batch_size]
            cost = 1.0 - torch.bmm(xf, yf.transpose(1, 2))
            a = xm.float() / xm.float().sum(1, keepdim=True)
            b = ym.float() / ym.float().sum(1, keepdim=True)
            res = ot.batch.solve_batch(cost, reg=settings.reg, a=a, b=b, max_iter=settings.iters, tol=settings.tol,
                                       method=method, grad="detach")
            plan = torch.nan_to_num(res.plan.masked_fill(~(xm[:, :, None] & ym[:, None, :]), 0.0), nan=0.0)
            out.append(1.0 - (plan * cost).sum(dim=(1, 2)))
    return torch.cat(out)


def _problems(n: int, p: int, length: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the problems unrelated sets, half a caption whose tokens are noisy copies of
    some of the image's patches (a matching pair)."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, p, d, generator=g), dim=-1)
    y = F.normalize(torch.randn(n, length, d, generator=g), dim=-1)
    half = n // 2
    pick = torch.randint(0, p, (half, length), generator=g)
    y[:half] = F.normalize(x[:half][torch.arange(half)[:, None], pick] + 0.7 * y[:half], dim=-1)
    return x, y


def bench_ot(n: int, p: int, length: int, d: int) -> None:
    from otcclip.models.config import OTSettings
    from otcclip.models.ot import ot_scores_chunked

    x, y = _problems(n, p, length, d)
    print(f"\n## 1. The OT stage: old path vs new path ({n} problems of {p}x{length}, d={d}, reg=0.05)\n")
    print("| iterations | old path problems/s | new path problems/s | ratio | max abs diff of s_OT |")
    print("|---|---|---|---|---|")
    for label, st in (("50 (tol 0)", OTSettings(iters=50, tol=0.0)), ("default (cap 100, tol 1e-5)", OTSettings())):
        runs: dict[str, tuple[float, torch.Tensor]] = {}
        for name, fn in (("old", old_ot_scores), ("new", ot_scores_chunked)):
            fn(x[:256], y[:256], settings=st)  # warm-up
            t0 = time.perf_counter()
            s = fn(x, y, settings=st, batch_size=256)
            runs[name] = (time.perf_counter() - t0, s)
        (t_old, s_old), (t_new, s_new) = runs["old"], runs["new"]
        print(f"| {label} | {n / t_old:,.0f} | {n / t_new:,.0f} | {t_old / t_new:.1f}x "
              f"| {float((s_old - s_new).abs().max()):.1e} |")


def _swap_captions(src: Path, dst: Path, rate: float, seed: int) -> set[str]:
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


#: Classes of the end-to-end slice (as in tests/models/test_sanitize_cifar.py).
CLASSES = ("airplane", "automobile", "frog", "horse", "ship")


def bench_end_to_end(per_class: int, epochs: int) -> None:
    import otcclip.models.scoring as scoring
    from otcclip.models.checkpoint import load_checkpoint
    from otcclip.models.datasets import cifar10_manifest
    from otcclip.models.manifest import read_manifest
    from otcclip.models.sanitize import SanitizeConfig, sanitize
    from otcclip.models.training import TrainConfig, train

    zip_path = REPO.parent / "shared" / "data" / "cifar10-jpg.zip"
    if not zip_path.exists():
        print(f"\n## 2. End to end: skipped ({zip_path} missing)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clean = cifar10_manifest(zip_path, root / "data", split="train", per_class=per_class, seed=0, classes=CLASSES)
        run = train(read_manifest(clean), root / "run", config=TrainConfig(
            model="otc-tiny", defence="none", epochs=epochs, batch_size=64, lr=2e-3, device="cpu", seed=0))
        swapped = _swap_captions(clean, root / "data" / "poisoned.csv", 0.1, 0)
        man = read_manifest(root / "data" / "poisoned.csv")
        bundle = load_checkpoint(run.final_checkpoint, device=torch.device("cpu"))
        cfg = SanitizeConfig(device="cpu")
        work = root / "work"
        rows: list[tuple[str, dict[str, float], Any]] = []
        new_ot: Callable[..., torch.Tensor] = scoring.ot_scores_chunked
        for name, fn, c in (("new path (defaults)", new_ot, cfg),
                            ("old path (old solver, no pruning)", old_ot_scores,
                             SanitizeConfig(device="cpu", k_ot=cfg.k, ot_margin=2.0))):
            for f in work.glob("scores_*.npz"):
                f.unlink()
            scoring.ot_scores_chunked = fn  # type: ignore[assignment]
            try:
                res = sanitize(man, bundle, config=c, work_dir=work)
            finally:
                scoring.ot_scores_chunked = new_ot  # type: ignore[assignment]
            rows.append((name, res.timings, res.decisions))
    enc = rows[0][1]
    n = len(man)
    print(f"\n## 2. End to end: otc-tiny ({epochs} epochs on the clean slice), poisoned CIFAR-10 slice of {n} pairs "
          f"({len(CLASSES)} classes, {len(swapped)} captions swapped), "
          f"k={cfg.k}, k_ot={cfg.k_ot}, ot_margin={cfg.ot_margin}, CPU\n")
    print("| path | decode s | encode s | index s | OT s | decide s | OT / encode | pairs/s | recall | precision "
          "| review (swapped) | model check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ids = man.ids
    for name, tim, d in rows:
        t = {k: enc[k] if k in ("decode", "encode") else tim[k] for k in ("decode", "encode", "index", "ot", "decide")}
        flagged = d.action != "keep"
        truth = np.array([i in swapped for i in ids])
        rec = (flagged & truth).sum() / max(1, truth.sum())
        prec = (flagged & truth).sum() / max(1, flagged.sum())
        review = np.asarray(d.review, dtype=bool) & ~flagged
        q = d.model_quality
        check = f"{q.get('verdict', '-')} (AUC {q.get('control_auc') or float('nan'):.2f})"
        print(f"| {name} | {t['decode']:.2f} | {t['encode']:.2f} | {t['index']:.2f} | {t['ot']:.2f} | {t['decide']:.2f} "
              f"| {100 * t['ot'] / t['encode']:.0f}% | {n / sum(t.values()):.0f} | {rec:.2f} | {prec:.2f} "
              f"| {int(review.sum())} ({int((review & truth).sum())}) | {check} |")


def bench_scaling(sizes: list[int], p: int, length: int, d: int) -> None:
    from decide_memory import AnonPeak, _status, reset_peak_rss

    from otcclip.models.config import DecisionSettings
    from otcclip.models.sanitize import (
        FeatureShard,
        SanitizeConfig,
        build_caption_index,
        decide,
        match_shard,
    )

    cfg = SanitizeConfig(device="cpu", decisions=DecisionSettings(detectors=("density", "caption_burst")))
    print(f"\n## 3. Scaling on synthetic features (defaults: k={cfg.k}, k_ot={cfg.k_ot}, ot_margin={cfg.ot_margin}, "
          f"index {cfg.index.factory} above {cfg.index.exact_threshold:,} (list_size {cfg.index.list_size}, "
          f"nprobe {cfg.index.nprobe}); P={p}, L={length}, d={d}; "
          f"detectors density, caption_burst; CPU)\n")
    print("Match on in-memory feature shards, each score shard saved to a temporary directory; decide on the saved "
          "shards (as a job). Decide columns: its peak traced memory and its peak RSS (VmHWM) and anonymous RSS "
          "(RssAnon, sampled) above the process's RSS when it starts (features, index and imports excluded).\n")
    print("| pairs | match s | decide s | match ms/pair | decide ms/pair | total ms/pair | peak traced MB | max RSS MB "
          "| decide traced MB | decide RSS MB | decide anon MB | decide anon B/pair |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    # a warm-up size first, not printed: the first OT call and the first decide pay one-off
    # costs (lazy initialisation) that would inflate whichever size came first
    for warm, n in [(True, 2048), *((False, n) for n in sizes)]:
        rng = torch.Generator().manual_seed(n)
        shards = []
        for s in range(0, n, cfg.shard_size):
            e = min(n, s + cfg.shard_size)
            m = e - s
            shards.append(FeatureShard(
                start=s, stop=e, ok=torch.ones(m, dtype=torch.bool),
                image_global=F.normalize(torch.randn(m, d, generator=rng), dim=-1),
                image_local=F.normalize(torch.randn(m, p, d, generator=rng), dim=-1).half(),
                caption_global=F.normalize(torch.randn(m, d, generator=rng), dim=-1),
                caption_local=F.normalize(torch.randn(m, length, d, generator=rng), dim=-1).half(),
                caption_mask=torch.ones(m, length, dtype=torch.bool),
                caption_hash=torch.arange(s, e, dtype=torch.int64)))
        with tempfile.TemporaryDirectory(prefix="bench-scores-") as tmp:
            tracemalloc.start()
            t0 = time.perf_counter()
            cidx = build_caption_index(shards, config=cfg)
            paths = [match_shard(sh, cidx, config=cfg).save(Path(tmp) / f"scores_{sh.start:09d}.npz") for sh in shards]
            t1 = time.perf_counter()
            gc.collect()
            base, match_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            rss0, anon0 = _status("VmRSS"), _status("RssAnon")
            reset_peak_rss()
            td = time.perf_counter()
            with AnonPeak() as ap:
                decide(paths, config=cfg)
            t2 = time.perf_counter()
            dec_rss, dec_anon = _status("VmHWM") - rss0, ap.peak - anon0
            _, dec_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if warm:
            del shards, cidx
            continue
        t_match, t_dec = t1 - t0, t2 - td
        print(f"| {n:,} | {t_match:.1f} | {t_dec:.1f} | {1000 * t_match / n:.3f} | {1000 * t_dec / n:.3f} "
              f"| {1000 * (t_match + t_dec) / n:.3f} | {max(match_peak, dec_peak) / 2**20:.0f} | {rss:.0f} | {(dec_peak - base) / 2**20:.0f} "
              f"| {dec_rss / 2**20:.0f} | {dec_anon / 2**20:.0f} | {dec_anon / n:.0f} |", flush=True)
        del shards, cidx


def bench_gpu(n: int, *, model_name: str = "ViT-B-32", batch: int = 1024, device: str = "cuda") -> None:
    from otcclip.models.config import DecisionSettings
    from otcclip.models.decisions import DetectorEnv, MatchScores, decide_pairs
    from otcclip.models.factory import create_model
    from otcclip.models.features import image_features, text_features
    from otcclip.models.sanitize import (
        FeatureShard,
        SanitizeConfig,
        build_caption_index,
        match_shard,
    )
    from otcclip.models.shortlist import gpu_available

    dev = torch.device(device)
    cfg = SanitizeConfig(device=device, batch_size=batch, shard_size=16_384,
                         decisions=DecisionSettings(detectors=("image_burst", "density", "caption_burst")))
    bundle = create_model(model_name, device=dev, seed=0)
    model = bundle.model.half().eval()
    size = int(bundle.preprocess_cfg["size"][0] if isinstance(bundle.preprocess_cfg["size"], (list, tuple))
               else bundle.preprocess_cfg["size"])
    names = ["dog", "cat", "ship", "truck", "horse", "bird", "frog", "deer", "plane", "car"]
    adj = ["small", "large", "red", "blue", "old", "new", "dark", "bright", "wet", "dry"]
    place = ["on grass", "in water", "at night", "in snow", "on a road", "indoors", "in a field", "by the sea"]
    texts = [f"a photo of a {a} {c} {p}" for c in names for a in adj for p in place]
    tokens = bundle.tokenizer(texts)
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    print(f"\n## GPU run: {model_name} (random weights, fp16), {n:,} synthetic pairs, {gpu_name}, "
          f"faiss GPU: {gpu_available()}, torch {torch.__version__}\n", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    shards = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(0, n, cfg.shard_size):
        e = min(n, s + cfg.shard_size)
        igs, ils, tgs, tls, tms = [], [], [], [], []
        for b in range(s, e, batch):
            m = min(batch, e - b)
            pix = torch.randn(m, 3, size, size, device=dev, generator=g, dtype=torch.float16)
            tok = tokens[torch.arange(b, b + m) % len(texts)].to(dev)
            with torch.no_grad():
                fi = image_features(model, pix)
                ft = text_features(model, tok)
            igs.append(fi.global_.float().cpu())
            ils.append(fi.local.half().cpu())
            tgs.append(ft.global_.float().cpu())
            tls.append(F.pad(ft.local.half(), (0, 0, 0, 24 - ft.local.shape[1])).cpu())
            tms.append(F.pad(ft.mask, (0, 24 - ft.mask.shape[1]), value=False).cpu())
        shards.append(FeatureShard(
            start=s, stop=e, ok=torch.ones(e - s, dtype=torch.bool), image_global=torch.cat(igs),
            image_local=torch.cat(ils), caption_global=torch.cat(tgs), caption_local=torch.cat(tls),
            caption_mask=torch.cat(tms), caption_hash=torch.arange(s, e, dtype=torch.int64) % len(texts)))
    sync()
    t_enc = time.perf_counter() - t0
    print(f"encode done: {n / t_enc:,.0f} pairs/s", flush=True)
    t0 = time.perf_counter()
    cidx = build_caption_index(shards, config=cfg)
    t_index = time.perf_counter() - t0
    tim = {"index": t_index, "ot": 0.0}
    scores = []
    for sh in shards:
        sc = match_shard(sh, cidx, config=cfg)
        tim["index"] += sc.timings["index"]
        tim["ot"] += sc.timings["ot"]
        scores.append(sc.scores)
    print(f"match done: OT {n / tim['ot']:,.0f} pairs/s", flush=True)
    t0 = time.perf_counter()
    decide_pairs(MatchScores.concat(scores), settings=cfg.decisions, env=DetectorEnv(index=cfg.index, seed=cfg.seed))
    t_dec = time.perf_counter() - t0
    stages = {"encode (image + caption, fp16)": t_enc, "index + shortlist": tim["index"], "OT": tim["ot"],
              "decide": t_dec}
    print("\n| stage | seconds | pairs/s |")
    print("|---|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {v:.1f} | {n / v:,.0f} |")
    total = sum(stages.values())
    print(f"| end to end | {total:.1f} | {n / total:,.0f} |")
    print(f"\nOT / encode: {100 * tim['ot'] / t_enc:.0f}%; peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer OT problems and a smaller CIFAR-10 slice")
    ap.add_argument("--million", action="store_true", help="add 1,000,000 pairs to the scaling table (long, ~4 GB)")
    ap.add_argument("--sizes", default=None, help="comma-separated pair counts for table 3 (default 10000,100000)")
    ap.add_argument("--skip", default="", help="comma-separated tables to skip: ot, e2e, scale")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and faiss threads (1 on a shared machine: more threads than free cores stall)")
    ap.add_argument("--gpu", type=int, default=0, metavar="N", help="run the GPU benchmark on N synthetic pairs instead")
    ap.add_argument("--gpu-model", default="ViT-B-32", help="model of the GPU benchmark (random weights)")
    ap.add_argument("--gpu-batch", type=int, default=1024, help="encoder batch and OT problems per solver call")
    ap.add_argument("--gpu-device", default="cuda", help="device of the GPU benchmark (cpu: a smoke test)")
    args = ap.parse_args()
    if args.gpu:
        bench_gpu(args.gpu, model_name=args.gpu_model, batch=args.gpu_batch, device=args.gpu_device)
        return
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [10_000, 100_000]
    if args.million:
        sizes.append(1_000_000)
    skip = set(filter(None, args.skip.split(",")))
    print(f"# bench/sanitize.py (threads: {args.threads}; torch {torch.__version__}, POT {ot.__version__}, "
          f"faiss {faiss.__version__})")
    if "ot" not in skip:
        bench_ot(1024 if args.quick else 4096, 64, 16, 64)
    if "e2e" not in skip:
        bench_end_to_end(100 if args.quick else 200, 10 if args.quick else 20)
    if "scale" not in skip:
        bench_scaling(sizes, p=16, length=12, d=64)


if __name__ == "__main__":
    main()
