"""What a training run produced; its settings are :class:`otcclip.models.config.TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otcclip.models.config.training import (
    DEFAULT_SCHEDULE,
    DEFENCES,
    SCORE_REASONS,
    TRAINER_SANITIZE,
    TrainConfig,
)

__all__ = ["DEFAULT_SCHEDULE", "DEFENCES", "SCORE_REASONS", "TRAINER_SANITIZE", "TrainConfig", "TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes
    ----------
    final_checkpoint : Path
        ``run_dir/final`` (the checkpoint format of ``docs/design.md``).
    metrics_path : Path
        ``run_dir/metrics.jsonl``, one JSON object per epoch.
    epochs_done : int
    """

    final_checkpoint: Path
    metrics_path: Path
    epochs_done: int
