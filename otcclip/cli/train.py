"""``otcclip train``: pre-train a CLIP model with a defence against poisoning."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from otcclip.cli import CliError

DEFENCES = ("none", "roclip", "safeclip", "otcclip")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="pre-train CLIP from scratch on a manifest (with a defence)",
        description="Pre-train an open_clip model from scratch with defence none|roclip|safeclip|otcclip.",
    )
    p.add_argument("manifest", type=Path, help="training manifest (image, caption)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--model", default="otc-tiny", help="shipped preset or open_clip config name")
    p.add_argument("--defense", "--defence", dest="defense", choices=DEFENCES, default="none")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-epochs", type=int, default=None, help="defence warm-up epochs (default: otcclip 1, the others 2)")
    p.add_argument("--rematch-every", type=int, default=None, help="K: re-match every K epochs (default: otcclip 4, the others 2)")
    p.add_argument("--rematch-backoff", type=int, default=None,
                   help="otcclip: after a pass that changes nothing the interval doubles, up to this many times K "
                        "(default 4; 1 = a pass every K epochs)")
    p.add_argument("--lam-inter", type=float, default=None)
    p.add_argument("--lam-intra", type=float, default=None)
    p.add_argument("--reassign", choices=("match", "drop"), default=None, help="otcclip: train reassigned pairs on their new caption, or drop them")
    p.add_argument("--sanitize", default=None, help="JSON object of SanitizeConfig overrides (otcclip)")
    p.add_argument("--score-rematch", action="store_true", default=None,
                   help="otcclip: also apply the engine's score-based re-assignments while training")
    p.add_argument("--purified-rematch", dest="purified_rematch", action=argparse.BooleanOptionalAction, default=None,
                   help="otcclip: re-match pairs flagged as triggered through their purified view, or drop them (--no-...)")
    p.add_argument("--restart", dest="restart", action=argparse.BooleanOptionalAction, default=None,
                   help="otcclip: after the first pass start the model again from its initial weights and train "
                        "--epochs on what it kept (the warm-up epochs come on top), or train on (--no-...)")
    p.add_argument("--fill-batches", dest="fill_batches", action=argparse.BooleanOptionalAction, default=None,
                   help="otcclip: give a dropped pair's slot in each batch to a kept pair (full batches), or not (--no-...)")
    p.add_argument("--lam-unlearn", type=float, default=None,
                   help="otcclip: weight of the unlikelihood term on quarantined pairs (0 = off)")
    p.add_argument("--no-template-search", dest="template_search", action="store_false", default=None,
                   help="otcclip: do not look for the trigger pattern the flagged images share")
    p.add_argument("--ot-negatives", type=int, default=None,
                   help="otcclip: in-batch negatives of the contrastive L_inter / L_intra (0 = mean OT distance)")
    p.add_argument("--inoculate", type=float, default=None,
                   help="otcclip: share of clean pairs per batch stamped with a flagged image's trigger residual (0 = off)")
    p.add_argument("--unlearn-triggered", action="store_true", default=None,
                   help="otcclip: the unlikelihood term also covers pairs re-matched through their purified view")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.models.training import TrainConfig, train

    if not args.manifest.exists():
        raise CliError(f"{args.manifest}: manifest not found")
    opts: dict[str, Any] = {
        "model": args.model,
        "defense": args.defense,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "seed": args.seed,
    }
    for name in (
        "warmup_epochs", "rematch_every", "rematch_backoff", "lam_inter", "lam_intra", "reassign", "score_rematch", "purified_rematch",
        "inoculate", "unlearn_triggered", "template_search", "ot_negatives", "restart", "fill_batches", "lam_unlearn",
    ):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.sanitize:
        try:
            opts["sanitize"] = json.loads(args.sanitize)
        except json.JSONDecodeError as e:
            raise CliError(f"--sanitize: not a JSON object: {e}") from e
    try:
        config = TrainConfig(**opts)
    except ValueError as e:
        raise CliError(str(e)) from e
    bar = _ProgressBar(disable=args.no_progress)
    try:
        result = train(args.manifest, args.out, config=config, resume=args.resume, progress=bar)
    except ValueError as e:
        raise CliError(str(e)) from e
    finally:
        bar.close()
    print(json.dumps({"final_checkpoint": str(result.final_checkpoint), "metrics": str(result.metrics_path), "epochs": result.epochs_done}))
    return 0


class _ProgressBar:
    """tqdm bar per stage, fed by the core's ``progress(stage, done, total)`` callback."""

    def __init__(self, *, disable: bool) -> None:
        self.disable = disable
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.disable:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total or None, desc=stage, unit="it", leave=False)
        assert self.bar is not None
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
