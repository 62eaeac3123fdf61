"""Settings of the sanitization pass (:mod:`otcclip.models.sanitize`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from otcclip.models.config.base import Settings, check, setting
from otcclip.models.config.detectors import DecisionSettings
from otcclip.models.config.ot import OTSettings

#: Devices a run may ask for: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,2}|mps)$")


def check_device(name: str) -> None:
    """Raise ValueError unless ``name`` matches :data:`DEVICE_PATTERN`."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")


@dataclass(frozen=True)
class IndexSettings(Settings):
    """The FAISS index of caption (and detector neighbour) searches."""

    exact_threshold: int = setting(20_000, "exact inner-product index up to this many vectors, `factory` above", ge=1)
    factory: str = setting("IVF{nlist},Flat", "FAISS index_factory string of the index above exact_threshold (inner "
                           "product); {nlist} becomes N // list_size (16 to train_sample // 39); e.g. HNSW32 or "
                           "IVF{nlist}_HNSW32,Flat. With IVF...,Flat the detectors' neighbour search runs list by list")
    list_size: int = setting(1024, "vectors per IVF list aimed at by {nlist}: a query scans about nprobe * list_size "
                             "vectors whatever N", ge=1, le=1_000_000)
    nprobe: int = setting(8, "IVF lists probed per query (IVF factories)", ge=1, le=4096)
    ef_search: int = setting(64, "HNSW candidate list per query (HNSW factories; raised to k when smaller)", ge=1,
                             le=65_536)
    train_sample: int = setting(100_000, "vectors an index that needs training (IVF, PQ) is trained on", ge=1_000,
                                le=10_000_000)

    def __post_init__(self) -> None:
        check(self)
        if not self.factory or len(self.factory) > 200 or not re.fullmatch(r"[A-Za-z0-9_,.=+{}-]+", self.factory):
            raise ValueError(f"factory must be a FAISS index_factory string such as HNSW32 or IVF{{nlist}},Flat; got {self.factory!r}")


@dataclass(frozen=True)
class SanitizeConfig(Settings):
    """Settings of the sanitization pass: shortlist, OT scoring, detectors and decisions.

    The OT solver's settings (``ot``), the index's (``index``) and the decisions' with
    each detector's (``decisions``) are nested objects, each passed whole to the stage
    that uses it.
    """

    k: int = setting(32, "shortlisted captions per image (plus its own)", ge=1, le=1024)
    k_ot: int = setting(16, "shortlisted captions per image that get an OT score besides its own (at most k); "
                        "the others cannot be chosen for a re-assignment", ge=0, le=1024)
    ot_margin: float = setting(0.15, "only candidates whose global cosine is within this of the image's best "
                               "candidate's get an OT score", ge=0, le=2)
    alpha: float = setting(0.5, "weight of the global cosine in the fused score (1 - alpha on the OT score)", ge=0, le=1)
    batch_size: int = setting(256, "images/captions per encoder forward, OT problems per solver call", ge=1, le=65_536)
    shard_size: int = setting(4096, "pairs per feature/score shard (one task each in a job)", ge=4, le=10_000_000)
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    fp16_locals: bool = setting(True, "store patch/token features in float16 in feature shards")
    seed: int = setting(0, "seed of the index training and the GMM", ge=0, lt=2**32)
    ot: OTSettings = setting(OTSettings(), "optimal-transport solver")
    index: IndexSettings = setting(IndexSettings(), "FAISS index")
    decisions: DecisionSettings = setting(DecisionSettings(), "decision thresholds and detectors")

    def __post_init__(self) -> None:
        check(self)
        check_device(self.device)

    @property
    def detectors(self) -> tuple[str, ...]:
        """The enabled detectors (``decisions.detectors``)."""
        return self.decisions.detectors
