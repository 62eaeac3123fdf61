"""The training loop: data, optimiser, schedule, defences, checkpoints, resume.

Writes (``run_dir``)::

    config.json                      the TrainConfig of the run
    checkpoints/epoch_NNN/           checkpoint format (DESIGN 3) + train_state.pt; only the
                                     newest ``keep_checkpoints`` stay (resume reads the newest)
    final/                           checkpoint of the last epoch
    metrics.jsonl                    one JSON object per epoch
    rematch/epoch_NNN/decisions.parquet   per-pair decisions of each re-match pass

All randomness after model initialisation is derived from ``(seed, epoch)``, and the
optimiser, scheduler and defence state are saved with each epoch checkpoint, so a resumed
run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from otcclip.models.atomic import atomic_write
from otcclip.models.checkpoint import save_checkpoint
from otcclip.models.factory import create_model, resolve_device
from otcclip.models.progress import ProgressFn, StopFn, check_stop
from otcclip.models.training.config import TrainConfig, TrainResult
from otcclip.models.training.data import ImageSource, read_rows
from otcclip.models.training.defences import Context, Defence, RoClip, SafeClip
from otcclip.models.training.otcclip_defence import OtcClip

DEFENCE_CLASSES: dict[str, type[Defence]] = {"none": Defence, "roclip": RoClip, "safeclip": SafeClip, "otcclip": OtcClip}

log = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
#: Config fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_threads", "checkpoint_every", "cache_images_bytes", "encode_batch_size",
                               "keep_checkpoints"})


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        prog = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


#: Device types with a fused AdamW kernel in torch (``torch.optim.AdamW(fused=True)``).
FUSED_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})


def adamw(groups: list[dict[str, Any]], *, lr: float) -> torch.optim.AdamW:
    """AdamW with CLIP's betas (0.9, 0.98) and eps 1e-6, fused where torch has the kernel.

    The fused kernel updates all parameters in one call instead of about ten small ops
    per tensor (``otc-tiny`` has 110 tensors), several times faster on CPU
    (``bench/step_cost.py`` prints the three implementations side by side); the update
    is the same up to float rounding. Parameters on another device, or not
    floating point, get torch's default implementation. A resumed run keeps the
    implementation its checkpoint was written with (the optimiser's state restores its
    param groups) until a restart, which starts a new optimiser.

    Parameters
    ----------
    groups : list of dict
        Param groups (``params`` and per-group options such as ``weight_decay``).
    lr : float
    """
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/epoch_NNN`` of a run that has a complete ``train_state.pt``."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p)
        for p in ck.iterdir()
        if (m := re.fullmatch(r"epoch_(\d+)", p.name)) and (p / STATE_NAME).is_file()
    )
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` ``checkpoints/epoch_NNN`` of a run (0: keep all).

    Returns the removed directories. Called after a new epoch checkpoint is complete, so
    the newest (the one a resume reads) is never among them.
    """
    ck = Path(run_dir) / "checkpoints"
    if keep <= 0 or not ck.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in ck.iterdir() if (m := re.fullmatch(r"epoch_(\d+)", p.name)))
    old = [p for _, p in found[:-keep]]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def _atomic_json_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(x) + "\n" for x in lines)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def train(
    manifest: Any,
    run_dir: str | Path,
    *,
    config: TrainConfig,
    resume: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Pre-train a CLIP model from scratch on an image-caption manifest.

    Parameters
    ----------
    manifest : path or Manifest
        Rows with ``image`` and ``caption``.
    run_dir : path
        Output directory (see the module docstring).
    config : TrainConfig
    resume : bool
        Continue from the last epoch checkpoint in ``run_dir`` (fresh start if none).
    progress : ProgressFn, optional
        Called as ``progress("decode", i, N)``, then ``progress("train", step, total_steps)``.
    should_stop : StopFn, optional
        Polled between batches; raises :class:`~otcclip.models.progress.Cancelled` (the last
        epoch checkpoint stays, so the run can be resumed).
    on_epoch : callable, optional
        Receives each epoch's metrics dict after it is written.

    Returns
    -------
    TrainResult
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    rows = read_rows(manifest, need=("image", "caption"))
    bundle = create_model(config.model, device=device, seed=config.seed)
    model = bundle.model
    pp = bundle.preprocess_cfg
    images = ImageSource(rows, bundle.image_size, cache_bytes=config.cache_images_bytes, progress=progress, should_stop=should_stop)
    captions = rows.col("caption")
    ctx = Context(
        model=model,
        tokenizer=bundle.tokenizer,
        config=config,
        images=images,
        captions=captions,
        ids=rows.ids,
        tokens=bundle.tokenizer(captions),
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        device=device,
        run_dir=run_dir,
    )
    defence = DEFENCE_CLASSES[config.defence](ctx)
    usable = torch.nonzero(images.trainable, as_tuple=False).flatten()
    n = int(usable.numel())
    if n < 2:
        raise ValueError(f"{rows.path}: need at least 2 readable image-caption pairs, found {n}")
    bs = min(config.batch_size, n)
    steps_per_epoch = n // bs
    # A defence that restarts (otcclip: once its first pass has found the poison) trains
    # `restart_at` detection epochs, then `config.epochs` from the initial weights. It may
    # call the restart off at that epoch (restart_epoch() turns None): the detection
    # epochs then count towards `config.epochs` (defence.planned_epochs()).
    restart_at = defence.restart_epoch()
    total_epochs = defence.planned_epochs()
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if restart_at else None

    def fresh_optimiser() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = adamw(_param_groups(model, config.weight_decay), lr=config.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.lr_warmup_steps, steps_per_epoch * config.epochs))

    optimizer, scheduler = fresh_optimiser()
    metrics_path = run_dir / "metrics.jsonl"

    start_epoch = 0
    if resume and (ck := last_checkpoint(run_dir)) is not None:
        state = torch.load(ck / STATE_NAME, map_location="cpu", weights_only=False)
        diff = {k for k, v in state["config"].items() if config.to_dict().get(k) != v} - RESUMABLE_CHANGES
        if diff:
            raise ValueError(f"{run_dir}: cannot resume with a different config ({', '.join(sorted(diff))} changed)")
        model.load_state_dict(safetensors.torch.load_file(str(ck / "open_clip_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        defence.load_state_dict(state["defence"])
        start_epoch = int(state["epoch"])
        restart_at = defence.restart_epoch()
        total_epochs = defence.planned_epochs()
        if restart_at is None or start_epoch > restart_at:
            init_state = None
        log.info("resuming %s from epoch %d", run_dir, start_epoch)
    old = []
    if start_epoch and metrics_path.exists():
        old = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        old = [x for x in old if int(x["epoch"]) <= start_epoch]
    _atomic_json_lines(metrics_path, old)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    meta = {"defence": config.defence, "seed": config.seed, "train_manifest": str(rows.path)}
    model.train()
    epoch = start_epoch
    while epoch < total_epochs:
        t0, c0 = time.perf_counter(), time.process_time()
        counts = defence.before_epoch(epoch)
        if init_state is not None and epoch == restart_at and defence.restart_epoch() is None:
            # the first pass changed nothing: the detection epochs trained on the data the
            # run goes on with, so they count towards config.epochs
            restart_at, init_state, total_epochs = None, None, defence.planned_epochs()
            counts["restart"] = False
            log.info("epoch %d: the first pass changed no pair; training goes on without a restart", epoch)
        elif init_state is not None and epoch == restart_at:
            # what the detection epochs learnt, the poison included, is discarded
            model.load_state_dict(init_state)
            optimizer, scheduler = fresh_optimiser()
            counts["restart"] = True
            log.info("epoch %d: restarting from the initial weights after the first pass", epoch)
        total_steps = steps_per_epoch * total_epochs
        t_rematch = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        rng = random.Random(config.seed * 1_000_003 + epoch)
        perm = usable[torch.randperm(n, generator=gen)]
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            check_stop(should_stop)
            idx = perm[step * bs : (step + 1) * bs]
            loss, terms = defence.batch_loss(idx, epoch, gen, rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, config.max_logit_scale)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress is not None:
                progress("train", epoch * steps_per_epoch + step + 1, total_steps)
        done = epoch + 1
        elapsed = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "epoch": done,
            **{k: v / max(1, steps_per_epoch) for k, v in sums.items()},
            "lr": scheduler.get_last_lr()[0],
            "logit_scale": float(model.logit_scale.detach().exp()),
            "n_active": int(defence.active.sum()),
            "time_s": elapsed,
            # this process's CPU seconds: on a shared machine a steadier cost than wall time
            "cpu_s": time.process_time() - c0,
            "rematch_time_s": t_rematch,
            **counts,
        }
        if done % config.checkpoint_every == 0 or done == total_epochs:
            ck_dir = save_checkpoint(bundle, run_dir / "checkpoints" / f"epoch_{done:03d}", meta={**meta, "epoch": done})
            st = {
                "epoch": done,
                "config": config.to_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "defence": defence.state_dict(),
            }
            atomic_write(ck_dir / STATE_NAME, partial(torch.save, st))
            prune_checkpoints(run_dir, config.keep_checkpoints)
        with metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("epoch %d/%d %s", done, total_epochs, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
        if on_epoch is not None:
            on_epoch(rec)
        epoch += 1
    final = save_checkpoint(bundle, run_dir / "final", meta={**meta, "epoch": total_epochs})
    return TrainResult(final_checkpoint=final, metrics_path=metrics_path, epochs_done=total_epochs)
