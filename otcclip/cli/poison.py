"""``otcclip poison``: plant targeted / backdoor attacks in a manifest, with ground truth.

Attacks: ``targeted``, ``targeted-augmented`` (each poisoned pair an augmented copy of its
target), ``targeted-repeated`` (one caption text per target), ``backdoor-patch``, ``backdoor-blend``, ``backdoor-hue`` (low-frequency colour
shift), ``backdoor-warp`` (WaNet), ``backdoor-sig`` (SIG sinusoid), ``backdoor-issba`` (sample-specific,
ISSBA-style) and ``text-trigger`` (a rare token in captions); see :mod:`otcclip.models.attacks`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from otcclip.cli import CliError

#: :data:`otcclip.models.attacks.ATTACKS`, named here so the parser loads no model code
#: (a test checks they agree).
ATTACKS = (
    "targeted", "backdoor-patch", "backdoor-blend", "backdoor-hue", "backdoor-warp", "targeted-augmented",
    "targeted-repeated", "backdoor-sig", "backdoor-issba", "text-trigger",
)


#: Trigger options passed to PoisonConfig only when given (its defaults stay the one definition).
TRIGGER_OPTIONS = {
    "patch-frac": "backdoor-patch: patch side as a share of the image side",
    "blend-alpha": "backdoor-blend: weight of the noise image",
    "hue-amplitude": "backdoor-hue: colour-shift amplitude as a share of 255",
    "warp-strength": "backdoor-warp: WaNet strength s",
    "sig-delta": "backdoor-sig: sinusoid amplitude as a share of 255",
    "sig-frequency": "backdoor-sig: sinusoid cycles across the width",
    "issba-eps": "backdoor-issba: L_inf bound of the perturbation as a share of 255",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "poison",
        help="write a poisoned copy of a manifest plus poison_truth.csv",
        description=(
            "Plant one or more attacks (repeat --attack and --target-class in the same order "
            "to plant several, each with its own target class)."
        ),
    )
    p.add_argument("manifest", type=Path)
    p.add_argument("--attack", action="append", required=True, choices=ATTACKS)
    p.add_argument("--target-class", action="append", required=True, help="adversarial class name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--n-poison", type=int, default=None, help="poisoned pairs per attack")
    g.add_argument("--rate", type=float, default=None, help="share of rows poisoned per attack")
    p.add_argument("--n-targets", type=int, default=1, help="targeted: distinct target images")
    p.add_argument("--targets-from", type=Path, default=None, help="targeted: manifest (image,label) the model is not trained on")
    for flag, what in TRIGGER_OPTIONS.items():
        p.add_argument(f"--{flag}", type=float, default=None, help=f"{what} (default: PoisonConfig's)")
    p.add_argument("--text-token", default=None, help="text-trigger: the trigger word (default: PoisonConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.models.attacks import PoisonConfig, PoisonError, poison_many
    from otcclip.models.training.data import DataError

    if len(args.attack) != len(args.target_class):
        raise CliError("give one --target-class per --attack")
    if not args.manifest.exists():
        raise CliError(f"{args.manifest}: manifest not found")
    trigger = {
        k.replace("-", "_"): v for k in TRIGGER_OPTIONS if (v := getattr(args, k.replace("-", "_"))) is not None
    }
    if args.text_token is not None:
        trigger["text_token"] = args.text_token
    try:
        configs = [
            PoisonConfig(
                attack=a, target_class=t, n_poison=args.n_poison, rate=args.rate, seed=args.seed,
                n_targets=args.n_targets, target_pool=args.targets_from, **trigger,
            )
            for a, t in zip(args.attack, args.target_class, strict=True)
        ]
        res = poison_many(args.manifest, args.out, configs=configs)
    except (PoisonError, DataError) as e:
        raise CliError(str(e)) from e
    print(json.dumps({
        "manifest": str(res.manifest_path),
        "truth": str(res.truth_path),
        "triggers": sorted(str(p) for p in args.out.glob("trigger-*.json")),
        "targets": str(res.targets_path) if res.targets_path else None,
        "n_poisoned": res.n_poisoned,
    }))
    return 0
