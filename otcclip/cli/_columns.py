"""Options shared by the commands that read a manifest: the column mapping."""

from __future__ import annotations

import argparse
from typing import Any


def add_column_options(parser: argparse.ArgumentParser) -> None:
    """``--image-col``, ``--caption-col``, ``--id-col``: which input columns hold the key columns."""
    g = parser.add_argument_group("input columns (default: image, caption, id; Hugging Face 'text' and "
                                  "img2dataset 'key'/'jpg' are recognised)")
    g.add_argument("--image-col", metavar="NAME", default=None,
                   help="column with the image path (or image bytes in Parquet)")
    g.add_argument("--caption-col", metavar="NAME", default=None, help="column with the caption")
    g.add_argument("--id-col", metavar="NAME", default=None, help="column with a unique row id")


def column_mapping(args: argparse.Namespace) -> Any:
    """The :class:`~otcclip.models.manifest.ColumnMapping` of the options given."""
    from otcclip.models.manifest import ColumnMapping

    return ColumnMapping(image=args.image_col, caption=args.caption_col, id=args.id_col)
