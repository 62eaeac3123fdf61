"""``otcclip evaluate``: zero-shot, linear probe and attack success rates of a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from otcclip.cli import CliError
from otcclip.cli.options import add_settings, settings_from_args
from otcclip.models.config import EvalSettings

#: ``--trigger`` short names -> attack (the file is ``trigger-<attack>.json``).
SHORT_TRIGGERS = {
    **{k: f"backdoor-{k}" for k in ("patch", "blend", "hue", "warp", "sig", "issba")},
    "text": "text-trigger",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="zero-shot / linear probe / ASR of a checkpoint on a labelled test manifest",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--manifest", type=Path, required=True, help="test manifest with image, label")
    p.add_argument(
        "--trigger", action="append", default=None,
        help="trigger-*.json from `otcclip poison` (repeatable; image or text triggers), or the attack's short "
             "name with --poison-dir: patch|blend|hue|warp|sig|issba (trigger-backdoor-NAME.json) or text "
             "(trigger-text-trigger.json)",
    )
    p.add_argument("--poison-dir", type=Path, default=None, help="output directory of `otcclip poison`")
    p.add_argument("--targets", type=Path, default=None, help="targets.csv of a targeted attack")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    add_settings(p, EvalSettings)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    measured = settings_from_args(args, EvalSettings)
    from otcclip.models.attacks import PoisonError
    from otcclip.models.checkpoint import CheckpointError, load_checkpoint
    from otcclip.models.evaluation import EvalConfig, evaluate
    from otcclip.models.training.data import DataError

    triggers = []
    for t in args.trigger or []:
        if t in SHORT_TRIGGERS:
            if args.poison_dir is None:
                raise CliError(f"--trigger {t} needs --poison-dir")
            triggers.append(args.poison_dir / f"trigger-{SHORT_TRIGGERS[t]}.json")
        else:
            triggers.append(Path(t))
    for t in triggers:
        if not t.is_file():
            raise CliError(f"{t}: trigger file not found")
    targets = args.targets
    if targets is None and args.poison_dir is not None and (args.poison_dir / "targets.csv").is_file():
        targets = args.poison_dir / "targets.csv"
    try:
        bundle = load_checkpoint(args.checkpoint, device="cpu" if args.device == "auto" else args.device)
        if args.device == "auto":
            from otcclip.models.factory import resolve_device

            bundle.model.to(resolve_device("auto"))
        cfg = EvalConfig(**{f.name: getattr(measured, f.name) for f in fields(EvalSettings)},
                         trigger=triggers or None, targets=targets)
        res = evaluate(bundle, args.manifest, config=cfg)
    except (CheckpointError, DataError, PoisonError) as e:
        raise CliError(str(e)) from e
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(res.to_dict(), indent=2))
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in res.to_dict().items() if k in ("zero_shot_top1", "linear_probe")}))
    return 0
