"""Benchmarks of the sanitization engine; prints three tables.

1. OT throughput: POT's batched solver (``ot.batch`` via ``ot_distance``) against a plain
   loop over ``ot.sinkhorn2`` on the same problems.
2. End-to-end ``otcclip sanitize`` on a CIFAR-10 slice with an ``otc-tiny`` model:
   pairs/s and the share of time per stage (decode, encode, index, OT, decide, write).
3. Scaling on synthetic features at fixed k: time per pair and peak memory per size.

Usage::

    .venv/bin/python bench/sanitize.py [--quick] [--sizes 10000,50000,200000] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import ot
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def bench_ot(n: int, p: int, length: int, d: int, reg: float, iters: int) -> None:
    from otcclip.models.config import OTSettings
    from otcclip.models.ot import ot_distance

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, p, d, generator=g), dim=-1)
    y = F.normalize(torch.randn(n, length, d, generator=g), dim=-1)
    t0 = time.perf_counter()
    for s in range(0, n, 256):
        ot_distance(x[s:s + 256], y[s:s + 256], settings=OTSettings(reg=reg, iters=iters, tol=0.0))
    t_batch = time.perf_counter() - t0
    xs, ys = x.double().numpy(), y.double().numpy()
    a, b = np.full(p, 1 / p), np.full(length, 1 / length)
    t0 = time.perf_counter()
    for i in range(n):
        ot.sinkhorn2(a, b, 1 - xs[i] @ ys[i].T, reg, method="sinkhorn_log", numItermax=iters, stopThr=0.0)
    t_loop = time.perf_counter() - t0
    print(f"\n## 1. OT throughput ({n} problems, {p}x{length}, d={d}, reg={reg}, {iters} iterations, log domain)\n")
    print("| solver | problems/s |")
    print("|---|---|")
    print(f"| ot.batch (torch, batches of 256) | {n / t_batch:,.0f} |")
    print(f"| loop over ot.sinkhorn2 | {n / t_loop:,.0f} |")
    print(f"| ratio | {t_loop / t_batch:.1f}x |")


def bench_end_to_end(per_class: int, epochs: int) -> None:
    from otcclip.cli import main
    from otcclip.models.datasets import cifar10_manifest
    from otcclip.models.training import TrainConfig, train

    zip_path = REPO.parent / "shared" / "data" / "cifar10-jpg.zip"
    if not zip_path.exists():
        print(f"\n## 2. End to end: skipped ({zip_path} missing)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        man = cifar10_manifest(zip_path, root / "data", split="train", per_class=per_class, seed=0)
        from otcclip.models.manifest import read_manifest

        run = train(read_manifest(man), root / "run", config=TrainConfig(model="otc-tiny", defence="none", epochs=epochs,
                                                                          batch_size=128, device="cpu"))
        t0 = time.perf_counter()
        rc = main(["sanitize", str(man), "--checkpoint", str(run.final_checkpoint), "--out", str(root / "out"),
                   "--device", "cpu", "--no-progress"])
        wall = time.perf_counter() - t0
        assert rc == 0
        import json

        rep = json.loads((root / "out" / "report.json").read_text())
    tim = rep["timings_s"]
    n = rep["input"]["rows"]
    total = sum(tim.values())
    print(f"\n## 2. End to end: otcclip sanitize, otc-tiny, CIFAR-10 slice of {n} pairs, k=32, CPU\n")
    print(f"{n / wall:.1f} pairs/s ({wall:.1f} s wall, including model load)\n")
    print("| stage | seconds | share |")
    print("|---|---|---|")
    for k in ("decode", "encode", "index", "ot", "decide", "write"):
        print(f"| {k} | {tim.get(k, 0.0):.2f} | {100 * tim.get(k, 0.0) / total:.0f}% |")


def bench_scaling(sizes: list[int], k: int, p: int, length: int, d: int, iters: int) -> None:
    from otcclip.models.config import DecisionSettings, OTSettings
    from otcclip.models.decisions import DetectorEnv, MatchScores, decide_pairs
    from otcclip.models.sanitize import (
        FeatureShard,
        SanitizeConfig,
        build_caption_index,
        match_shard,
    )

    cfg = SanitizeConfig(k=k, device="cpu", ot=OTSettings(iters=iters), shard_size=4096,
                         decisions=DecisionSettings(detectors=("density", "caption_burst")))
    print(f"\n## 3. Scaling on synthetic features (k={k}, P={p}, L={length}, d={d}, {iters} OT iterations, CPU)\n")
    print("| pairs | match s | decide s | total s | ms/pair | peak traced MB | max RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
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
        tracemalloc.start()
        t0 = time.perf_counter()
        cidx = build_caption_index(shards, config=cfg)
        scores = [match_shard(sh, cidx, config=cfg).scores for sh in shards]
        t1 = time.perf_counter()
        decide_pairs(MatchScores.concat(scores), settings=cfg.decisions, env=DetectorEnv(index=cfg.index, seed=cfg.seed))
        t2 = time.perf_counter()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {n:,} | {t1 - t0:.1f} | {t2 - t1:.1f} | {t2 - t0:.1f} | {1000 * (t2 - t0) / n:.2f} | {peak / 2**20:.0f} | {rss:.0f} |")
        del shards, scores, cidx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (shared / slow machines)")
    ap.add_argument("--sizes", default=None, help="comma-separated pair counts for table 3")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [10_000, 20_000, 40_000] if args.quick else [10_000, 50_000, 100_000, 200_000])
    print(f"# bench/sanitize.py (torch threads: {args.threads}; torch {torch.__version__}, POT {ot.__version__})")
    bench_ot(512 if args.quick else 2048, 64, 16, 64, 0.05, 50)
    bench_end_to_end(50 if args.quick else 200, 2 if args.quick else 5)
    bench_scaling(sizes, k=8 if args.quick else 32, p=16, length=12, d=64, iters=30)


if __name__ == "__main__":
    main()
