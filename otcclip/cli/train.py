"""``otcclip train``: pre-train a CLIP model with a defence against poisoning."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from otcclip.cli import CliError
from otcclip.cli._columns import add_column_options, column_mapping
from otcclip.cli._progress import StageBars
from otcclip.cli.options import add_settings, settings_from_args
from otcclip.models.config import TrainConfig


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="pre-train CLIP from scratch on a manifest (with a defence)",
        description="Pre-train an open_clip model from scratch with defence none|roclip|safeclip|otcclip "
                    "(every setting of TrainConfig is an option; nested ones by their dotted path).",
    )
    p.add_argument("manifest", type=Path, help="training manifest (image, caption)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_column_options(p)
    add_settings(p, TrainConfig, exclude=("num_threads",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.models.training import train

    if not args.manifest.exists():
        raise CliError(f"{args.manifest}: manifest not found")
    config = settings_from_args(args, TrainConfig)
    from otcclip.models.manifest import ManifestError, read_manifest

    try:
        manifest = read_manifest(args.manifest, mapping=column_mapping(args), local=True)
    except ManifestError as e:
        raise CliError(str(e)) from e
    bar = StageBars(disable=args.no_progress)
    try:
        result = train(manifest, args.out, config=config, resume=args.resume, progress=bar)
    except ValueError as e:
        raise CliError(str(e)) from e
    finally:
        bar.close()
    print(json.dumps({"final_checkpoint": str(result.final_checkpoint), "metrics": str(result.metrics_path), "epochs": result.epochs_done}))
    return 0
