"""Cost of one training step: ``otcclip``'s steps against plain CLIP's, and where it goes.

An ``otcclip`` epoch costs a plain (``none``) epoch's steps times this table's ratio,
plus its warm-up epoch and its passes (``bench/defence.py`` prints the whole). Each row
times the trainer's own ``batch_loss`` + backward + AdamW step (median of ``--repeats``
batches, the rows taking turns step by step, after one warm-up round):

- ``none``: plain CLIP on a batch;
- ``otcclip``, nothing dropped: the step on data where its passes dropped nothing (the
  ``L_intra`` rows' second views and edited captions, the OT losses);
- ``otcclip``, a share ``--dropped`` of the pairs dropped (quarantined, as the passes
  leave a backdoor's pairs): the batch refilled with kept pairs (``fill_batches``) plus
  at most ``dropped_share`` of dropped pairs for ``L_intra`` and the unlikelihood term;
- the same with ``fill_batches`` off;
- plain CLIP on a batch as large as each ``otcclip`` step's image count: what the extra
  images alone cost.

Images are random noise at the model's input size and captions the bench's CIFAR-10
templates (speed depends on neither); the model has random weights.

On a CUDA device (``--device cuda``, which ``bench/gpu.sh`` runs) each step is timed to
the device's end (``torch.cuda.synchronize``), and a last round under
``torch.cuda.set_sync_debug_mode`` counts the times a step makes the host wait for the
device that torch reports (reading a loss back, copying a tensor without pinned memory,
...; a lower bound).

Usage::

    .venv/bin/python bench/step_cost.py [--model otc-tiny] [--batch 128] [--dropped 0.19] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="otc-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dropped", type=float, default=0.19,
                    help="share of pairs dropped (the quick bench's validation split: 580 of 3,100)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (timed to the device's end, host syncs counted)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)

    from otcclip.models.datasets import CIFAR10_CLASSES, make_caption
    from otcclip.models.factory import create_model
    from otcclip.models.training import TrainConfig
    from otcclip.models.training.data import ImageSource, read_rows
    from otcclip.models.training.defences import Context, Defence
    from otcclip.models.training.loop import _param_groups, adamw
    from otcclip.models.training.otcclip_defence import OtcClip

    bundle = create_model(args.model, device=dev, seed=0)
    model = bundle.model
    n = args.batch * (args.repeats + 1) * 2
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    # the images are decoded into memory here; the folder is the runs' (unwritten) run_dir
    work = tempfile.TemporaryDirectory(prefix="otcclip-step-cost-")
    tmp = work.name
    lines = ["id,image,caption"]
    for i in range(n):
        Image.fromarray(np_rng.integers(0, 256, (bundle.image_size, bundle.image_size, 3), dtype=np.uint8)).save(
            Path(tmp) / f"{i}.png")
        lines.append(f"{i},{i}.png,{make_caption(rng.choice(CIFAR10_CLASSES), rng)}")
    (Path(tmp) / "m.csv").write_text("\n".join(lines) + "\n")
    rows = read_rows(Path(tmp) / "m.csv", need=("image", "caption"))
    images = ImageSource(rows, bundle.image_size)
    captions = rows.col("caption")

    def defence(cls: type[Defence], **config: object) -> Defence:
        cfg = TrainConfig(model=args.model, defence="otcclip" if cls is OtcClip else "none",
                          batch_size=args.batch, device=args.device, **config)  # type: ignore[arg-type]
        ctx = Context(model=model, tokenizer=bundle.tokenizer, config=cfg, images=images, captions=captions,
                      ids=rows.ids, tokens=bundle.tokenizer(captions), mean=tuple(bundle.preprocess_cfg["mean"]),
                      std=tuple(bundle.preprocess_cfg["std"]), device=dev, run_dir=Path(tmp))
        return cls(ctx)

    def dropped(d: Defence) -> Defence:
        assert isinstance(d, OtcClip)
        gone = torch.from_numpy(np.random.default_rng(1).random(n) < args.dropped)
        d.active[gone] = False
        d.state.quarantine[gone] = True
        return d

    def step_images(d: Defence, idx: torch.Tensor) -> int:
        """Images one step encodes: its batch after refill and cap, plus the L_intra views."""
        if not isinstance(d, OtcClip):
            return idx.numel()
        c = d.ctx.config
        b = d.cap_dropped(d.fill_batch(idx, torch.Generator()), idx.numel(), torch.Generator()).numel()
        return b + (max(1, round(c.intra_subsample * idx.numel())) if c.lam_intra > 0 and c.intra_subsample > 0 else 0)

    runs: list[tuple[str, Defence, int]] = [
        ("none", defence(Defence), args.batch),
        ("otcclip, nothing dropped", defence(OtcClip), args.batch),
        (f"otcclip, {args.dropped:.0%} dropped", dropped(defence(OtcClip)), args.batch),
        (f"otcclip, {args.dropped:.0%} dropped, fill_batches off", dropped(defence(OtcClip, fill_batches=False)), args.batch),
    ]
    gen = torch.Generator().manual_seed(0)
    orders = [torch.randperm(n, generator=gen) for _ in range(args.repeats + 1)]  # a row takes the first `size`
    # each otcclip row's mean image count, as a plain batch
    sizes = sorted({round(float(np.mean([step_images(d, o[: args.batch]) for o in orders[1:]]))) for _, d, _ in runs[1:]}
                   - {args.batch})
    runs += [(f"none on a batch of {k}", defence(Defence), k) for k in sizes]
    model.train()
    opt = adamw(_param_groups(model, 0.1), lr=1e-4)
    prng = random.Random(0)
    times: list[list[float]] = [[] for _ in runs]
    counts: list[list[int]] = [[] for _ in runs]

    def step(d: Defence, idx: torch.Tensor) -> None:
        loss, _ = d.batch_loss(idx, d.ctx.config.warmup_epochs, gen, prng)  # past otcclip's restart
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # round-robin over the rows, one step each per round: a drift of the machine's speed
    # touches every row alike; the first round warms up
    for r, order in enumerate(orders):
        for j, (_, d, size) in enumerate(runs):
            idx = order[:size]
            counts[j].append(step_images(d, idx))
            sync()
            t0 = time.perf_counter()
            step(d, idx)
            sync()
            if r:
                times[j].append(time.perf_counter() - t0)
    syncs = [host_syncs(lambda d=d, size=size: step(d, orders[-1][:size]), dev) if cuda else None for _, d, size in runs]
    results = [(name, float(np.median(t)), float(np.mean(c[1:]))) for (name, _, _), t, c in zip(runs, times, counts, strict=True)]
    work.cleanup()
    base = results[0][1]
    where = torch.cuda.get_device_name(dev) if cuda else f"{args.threads} threads"
    print(f"# one training step, {args.model}, batch {args.batch}, {where}, median of {args.repeats} steps")
    print("| step | images a step | ms / step | x none |" + (" host syncs / step |" if cuda else ""))
    print("|---|---|---|---|" + ("---|" if cuda else ""))
    for (name, sec, count), n_sync in zip(results, syncs, strict=True):
        print(f"| {name} | {count:.0f} | {sec * 1000:.0f} | {sec / base:.2f}x |" + (f" {n_sync} |" if cuda else ""))
    print()
    print(f"# the AdamW step alone, {args.model}'s parameters, median of {args.repeats} steps")
    print("| implementation | ms / step | x the trainer's |")
    print("|---|---|---|")
    opt_times = optimiser_times(model, args.repeats, sync=sync)
    for name, sec in opt_times.items():
        print(f"| {name} | {sec * 1000:.1f} | {sec / opt_times[TRAINERS]:.2f}x |")
    return 0


TRAINERS = "the trainer's (adamw)"


def host_syncs(fn: Callable[[], None], device: torch.device) -> int:
    """Times ``fn`` makes the host wait for the CUDA ``device``, as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports them (one warning each; torch
    does not report every synchronising operation, so this is a lower bound)."""
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def optimiser_times(model: torch.nn.Module, repeats: int, *, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of one AdamW step on ``model``'s parameters (random gradients): the
    trainer's :func:`~otcclip.models.training.loop.adamw` against torch's per-tensor
    (``foreach=False``, the CPU default) and multi-tensor (``foreach=True``) implementations."""
    from otcclip.models.training.loop import _param_groups as groups
    from otcclip.models.training.loop import adamw

    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {
        TRAINERS: lambda: adamw(groups(model, 0.1), lr=1e-4),
        "per tensor (foreach=False)": lambda: torch.optim.AdamW(groups(model, 0.1), lr=1e-4, foreach=False),
        "multi-tensor (foreach=True)": lambda: torch.optim.AdamW(groups(model, 0.1), lr=1e-4, foreach=True),
    }
    opts = {name: make() for name, make in kinds.items()}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for r in range(repeats + 1):  # round-robin; the first round warms up
        for name, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


if __name__ == "__main__":
    raise SystemExit(main())
