"""Robust CLIP pre-training (DESIGN 2.4): ``TrainConfig``, ``train``, ``TrainResult``."""

from otcclip.models.training.config import DEFENCES, TrainConfig, TrainResult
from otcclip.models.training.loop import last_checkpoint, train

__all__ = ["DEFENCES", "TrainConfig", "TrainResult", "last_checkpoint", "train"]
