"""Caption encoding cut to the batch's longest caption, against open_clip's full context.

open_clip's ``encode_text`` runs the text transformer over the whole context (32 tokens
for the shipped presets, 77 for ``ViT-B-32``) although captions use 10-20. The built-in
text tower is causal, so :func:`otcclip.models.features.encode_text` stops after the
batch's last EOT with the same output. Printed per model and mode (inference; forward
and backward as in a training step): captions/s of both, the speed-up, and the largest
difference of the normalised embeddings.

Captions are the bench's CIFAR-10 captions (``datasets.make_caption``: templates over
the class names); models have random weights (speed does not depend on them).

Usage::

    .venv/bin/python bench/text_encode.py [--models otc-tiny,ViT-B-32] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _time(fn: Callable[[], torch.Tensor], *, backward: bool, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = fn()
        if backward:
            out.square().sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="otc-tiny,ViT-B-32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from otcclip.models.datasets import CIFAR10_CLASSES, make_caption
    from otcclip.models.factory import create_model
    from otcclip.models.features import encode_text

    rng = random.Random(0)
    captions = [make_caption(rng.choice(CIFAR10_CLASSES), rng) for _ in range(args.batch)]
    print(f"# caption encoding, batch {args.batch}, {args.threads} threads, median of {args.repeats}")
    print("| model | context | longest caption | mode | full captions/s | cut captions/s | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        b = create_model(name)
        tokens = b.tokenizer(captions)
        longest = int(tokens.argmax(dim=-1).max()) + 1
        with torch.no_grad():
            diff = float((F.normalize(encode_text(b.model, tokens), dim=-1)
                          - F.normalize(b.model.encode_text(tokens), dim=-1)).abs().max())
        for mode, backward in (("inference", False), ("forward + backward", True)):
            b.model.train(backward)
            ctx = torch.enable_grad() if backward else torch.no_grad()
            with ctx:
                full = _time(lambda m=b.model, t=tokens: m.encode_text(t), backward=backward, repeats=args.repeats)
                cut = _time(lambda m=b.model, t=tokens: encode_text(m, t), backward=backward, repeats=args.repeats)
            print(f"| {name} | {tokens.shape[1]} | {longest} | {mode} | {args.batch / full:,.0f} | "
                  f"{args.batch / cut:,.0f} | {full / cut:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
