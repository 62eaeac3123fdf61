"""``otcclip sanitize``: clean an image-caption manifest with OT caption re-assignment."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from otcclip.cli import CliError
from otcclip.cli._columns import add_column_options, column_mapping
from otcclip.cli._progress import StageBars
from otcclip.cli.options import add_settings, settings_from_args
from otcclip.models.config import SanitizeConfig


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sanitize",
        help="re-assign or drop poisoned image-caption pairs (OT matching)",
        description=(
            "Encode images and captions with a checkpoint, shortlist candidate captions with "
            "FAISS, score them by global cosine + OT between patches and tokens, and write "
            "the cleaned manifest, decisions.parquet, report.json and report.html to --out."
        ),
    )
    p.add_argument("manifest", type=Path, help="csv/tsv/jsonl/parquet manifest or WebDataset .tar / dir")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (open_clip_config.json + weights)")
    p.add_argument("--model", default=None,
                   help="instead of --checkpoint: an open_clip model name (ViT-B-32, hf-hub:org/repo) with --pretrained")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag of --model (laion2b_s34b_b79k, openai) or a weights file (.safetensors/.bin/.pt)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--images", type=Path, default=None, help="image directory or .zip/.tar/.tar.gz archive (default: beside the manifest)")
    p.add_argument("--work-dir", type=Path, default=None, help="spill feature/score shards here (re-runs reuse them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per finished stage instead)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (counts, outputs, seconds) on stdout instead of the text lines")
    p.add_argument("--no-provenance", action="store_true",
                   help="no provenance columns (original_caption, otcclip_action, otcclip_reason, otcclip_p_clean, "
                        "otcclip_review, otcclip_review_reason) in the cleaned manifest")
    p.add_argument("--copy-images", action="store_true",
                   help="copy the kept images below OUT/images (default: reference them relative to --out)")
    add_column_options(p)
    add_settings(p, SanitizeConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = settings_from_args(args, SanitizeConfig)
    if not args.manifest.exists():
        raise CliError(f"{args.manifest}: manifest not found")
    if (args.checkpoint is None) == (args.model is None):
        raise CliError("give either --checkpoint DIR or --model NAME --pretrained TAG|PATH")
    if args.checkpoint is not None and not (args.checkpoint / "open_clip_config.json").is_file():
        raise CliError(f"{args.checkpoint}: not a checkpoint directory (no open_clip_config.json)")
    if args.model is not None:
        from otcclip.models.model_names import UnknownModelError, validate_model_name

        try:
            validate_model_name(args.model)
        except UnknownModelError as e:
            raise CliError(str(e)) from e
    if args.images is not None and not args.images.exists():
        raise CliError(f"{args.images}: image directory or archive not found")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"{args.out}: exists and is not a directory")

    from otcclip.models.checkpoint import load_checkpoint
    from otcclip.models.factory import resolve_device
    from otcclip.models.manifest import ManifestError, read_manifest
    from otcclip.models.report import write_outputs
    from otcclip.models.sanitize import sanitize

    try:
        device = resolve_device(config.device)
    except ValueError as e:
        raise CliError(str(e)) from e
    try:
        manifest = read_manifest(args.manifest, images=args.images, mapping=column_mapping(args), local=True)
    except ManifestError as e:
        raise CliError(str(e)) from e
    if len(manifest) == 0:
        raise CliError(f"{args.manifest}: no rows to sanitize")
    if args.model is not None:
        from otcclip.models.factory import load_pretrained

        try:
            bundle = load_pretrained(args.model, args.pretrained, device=device)
        except ValueError as e:
            raise CliError(str(e)) from e
    else:
        try:
            bundle = load_checkpoint(args.checkpoint, device=device)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CliError(f"{args.checkpoint}: cannot load checkpoint: {e}") from e

    progress = StageBars(disable=args.no_progress)
    t0 = time.perf_counter()
    result = sanitize(manifest, bundle, config=config, work_dir=args.work_dir, progress=progress)
    model_info = {"name": bundle.name, "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint else None,
                  "pretrained": args.pretrained if args.model else None,
                  "embed_dim": bundle.model_cfg.get("embed_dim"), "device": str(device)}
    files = write_outputs(manifest, result.decisions, args.out, config=config, model_info=model_info,
                          timings=result.timings, progress=progress, provenance=not args.no_provenance,
                          copy_images=args.copy_images)
    progress.close()
    secs = time.perf_counter() - t0
    all_counts = result.decisions.counts()
    counts = all_counts["action"]
    if args.json:
        summary = {
            "input": str(args.manifest), "format": manifest.format, "pairs": len(manifest),
            "actions": counts, "reasons": all_counts["reason"], "seconds": round(secs, 3),
            "pairs_per_s": round(len(manifest) / max(secs, 1e-9), 3),
            "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
            "outputs": {"dir": str(args.out), "manifest": str(files.manifest), "decisions": str(files.decisions),
                        "report_json": str(files.report_json), "report_html": str(files.report_html)},
        }
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{len(manifest)} pairs in {secs:.1f} s ({len(manifest) / max(secs, 1e-9):.1f} pairs/s): "
          + ", ".join(f"{a} {n}" for a, n in counts.items()))
    print(f"wrote {files.manifest}, {files.decisions.name}, {files.report_json.name}, {files.report_html.name} in {args.out}")
    return 0
