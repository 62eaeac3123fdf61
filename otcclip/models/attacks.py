"""Poisoning attacks on image-caption data, with ground truth (DESIGN 2.5).

- ``targeted``: a few target images (from data the model is not trained on), each added
  many times with varied captions of the adversarial class ``target_class``.
- ``backdoor-patch``: a noise patch at a random location on a share of the training
  images, whose captions become captions of ``target_class``.
- ``backdoor-blend``: blended noise over the whole image, likewise.

:func:`poison` writes, in ``out_dir``: the poisoned manifest (input format where the IO
module is available, else CSV) whose new images lie under ``out_dir/poison/``,
``poison_truth.csv`` (``id, poisoned, attack, target_class`` for every row),
``trigger-<attack>.json`` (self-contained: the noise is inline) for each backdoor, the clean images (hard links
or copies at their original relative paths, so the set is self-contained), and ``targets.csv`` (``id, image,
label, target_class``) for targeted attacks, which ``evaluate`` reads. Several attacks,
each with its own target class, can be planted in one set with :func:`poison_many`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from otcclip.models.datasets import CAPTION_TEMPLATES
from otcclip.models.training.data import ManifestRows, read_rows

ATTACKS: tuple[str, ...] = ("targeted", "backdoor-patch", "backdoor-blend")


class PoisonError(ValueError):
    """Bad attack parameters or input that cannot be poisoned as asked."""


@dataclass(frozen=True)
class PoisonConfig:
    """One attack.

    Attributes
    ----------
    attack : {"targeted", "backdoor-patch", "backdoor-blend"}
    target_class : str
        Adversarial class: its captions are paired with the poisoned images.
    n_poison, rate : int or float, optional
        Number of poisoned pairs, or share of the input rows (one of them; default rate 0.01).
    seed : int
    n_targets : int
        Targeted: number of distinct target images (the ``n_poison`` pairs are split over them).
    target_pool : Path, optional
        Targeted: manifest (``image``, ``label``) of images the model is not trained on to
        draw targets from; when absent, targets are drawn from the input and all their
        clean rows are removed.
    patch_frac : float
        Backdoor-patch: patch side as a share of the image's shorter side.
    blend_alpha : float
        Backdoor-blend: weight of the noise image.
    templates : tuple of str
        Caption templates of the adversarial class.
    """

    attack: str
    target_class: str
    n_poison: int | None = None
    rate: float | None = None
    seed: int = 0
    n_targets: int = 1
    target_pool: Path | None = None
    patch_frac: float = 0.125
    blend_alpha: float = 0.2
    templates: tuple[str, ...] = CAPTION_TEMPLATES

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise PoisonError(f"attack must be one of {', '.join(ATTACKS)}, not {self.attack!r}")
        if not self.target_class.strip():
            raise PoisonError("target_class must not be empty")
        if self.n_poison is not None and self.rate is not None:
            raise PoisonError("give n_poison or rate, not both")
        if self.n_poison is not None and self.n_poison < 1:
            raise PoisonError(f"n_poison must be >= 1, got {self.n_poison}")
        if self.rate is not None and not 0.0 < self.rate < 1.0:
            raise PoisonError(f"rate must be in (0, 1), got {self.rate}")
        if self.n_targets < 1:
            raise PoisonError(f"n_targets must be >= 1, got {self.n_targets}")
        if not 0.0 < self.patch_frac <= 1.0 or not 0.0 < self.blend_alpha < 1.0:
            raise PoisonError("patch_frac must be in (0, 1] and blend_alpha in (0, 1)")

    def count(self, n_rows: int) -> int:
        if self.n_poison is not None:
            return self.n_poison
        return max(1, round((self.rate if self.rate is not None else 0.01) * n_rows))


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger that :func:`apply_trigger` reproduces at evaluation time.

    Attributes
    ----------
    attack : str
    target_class : str
    kind : {"patch", "blend"}
    noise : ndarray, uint8 (h, w, 3)
        The patch (``kind="patch"``) or the full-image noise (``"blend"``, resized to the image).
    patch_frac, alpha : float
    """

    attack: str
    target_class: str
    kind: str
    noise: np.ndarray
    patch_frac: float = 0.125
    alpha: float = 0.2

    def save(self, json_path: Path) -> Path:
        """Write the trigger as one self-contained JSON file (the noise inline as uint8 lists),
        so it can travel as a job setting or be copied anywhere."""
        json_path.write_text(json.dumps(self.to_dict()))
        return json_path

    def to_dict(self) -> dict[str, Any]:
        meta = {k: v for k, v in asdict(self).items() if k != "noise"}
        return {**meta, "noise": self.noise.astype(np.uint8).tolist()}

    @classmethod
    def load(cls, json_path: str | Path) -> Trigger:
        p = Path(json_path)
        try:
            meta = json.loads(p.read_text())
            raw = meta.pop("noise")
            # Inline noise (current format) or the name of a .npy beside the file (older runs).
            noise = np.asarray(raw, dtype=np.uint8) if isinstance(raw, list) else np.load(p.parent / raw)
            if noise.ndim != 3 or noise.shape[2] != 3:
                raise ValueError(f"noise must have shape (h, w, 3), got {noise.shape}")
            return cls(noise=noise.astype(np.uint8), **meta)
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise PoisonError(f"{p}: not a trigger file: {e}") from e


def apply_trigger(image: np.ndarray, trigger: Trigger, rng: np.random.Generator) -> np.ndarray:
    """Apply ``trigger`` to one uint8 image ``(H, W, 3)``; returns a new array."""
    h, w = image.shape[:2]
    out = image.copy()
    if trigger.kind == "patch":
        p = max(1, round(trigger.patch_frac * min(h, w)))
        patch = np.asarray(Image.fromarray(trigger.noise).resize((p, p), Image.Resampling.NEAREST))
        y = int(rng.integers(0, h - p + 1))
        x = int(rng.integers(0, w - p + 1))
        out[y : y + p, x : x + p] = patch
        return out
    noise = np.asarray(Image.fromarray(trigger.noise).resize((w, h), Image.Resampling.NEAREST)).astype(np.float32)
    blended = (1 - trigger.alpha) * image.astype(np.float32) + trigger.alpha * noise
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PoisonResult:
    """Files written by :func:`poison`."""

    manifest_path: Path
    truth_path: Path
    trigger_path: Path | None
    targets_path: Path | None = None
    n_poisoned: int = 0


def poison(manifest: Any, out_dir: str | Path, *, config: PoisonConfig) -> PoisonResult:
    """Plant one attack (see :func:`poison_many`)."""
    return poison_many(manifest, out_dir, configs=[config])


def poison_many(manifest: Any, out_dir: str | Path, *, configs: Sequence[PoisonConfig]) -> PoisonResult:
    """Plant several attacks in one poisoned set (each its own target class).

    Parameters
    ----------
    manifest : path or Manifest
        Clean input with ``image`` and ``caption`` (``label`` needed to avoid poisoning
        images of the target class and for targeted attacks without ``target_pool``).
    out_dir : path
        Created atomically (must not exist or be empty).
    configs : sequence of PoisonConfig

    Returns
    -------
    PoisonResult
        ``trigger_path``/``targets_path`` of the last backdoor/targeted attack planted.
    """
    if not configs:
        raise PoisonError("no attack given")
    kinds = [c.attack for c in configs]
    if len(set(kinds)) != len(kinds):
        raise PoisonError("each attack type may be planted once per set")
    rows = read_rows(manifest, need=("image", "caption"))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PoisonError(f"{out}: output directory exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        res = _poison_into(rows, tmp, configs)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PoisonResult(
        manifest_path=out / res.manifest_path.name,
        truth_path=out / res.truth_path.name,
        trigger_path=out / res.trigger_path.name if res.trigger_path else None,
        targets_path=out / res.targets_path.name if res.targets_path else None,
        n_poisoned=res.n_poisoned,
    )


def _poison_into(rows: ManifestRows, tmp: Path, configs: Sequence[PoisonConfig]) -> PoisonResult:
    n = len(rows)
    cols = {k: list(v) for k, v in rows.columns.items()}
    if "id" not in cols:
        cols["id"] = [str(i) for i in range(n)]
    labels = cols.get("label")
    truth = {i: ("", "") for i in range(n)}  # row -> (attack, target_class)
    removed: set[int] = set()
    extra_rows: list[dict[str, str]] = []
    trigger_path: Path | None = None
    targets_path: Path | None = None
    for cfg in configs:
        rng = random.Random(f"{cfg.seed}-{cfg.attack}")
        k = cfg.count(n)
        if cfg.attack == "targeted":
            targets = _pick_targets(rows, cfg, rng, removed, truth)
            tdir = tmp / "poison" / "targets"
            tdir.mkdir(parents=True, exist_ok=True)
            trows = []
            for t, (img, label, tid) in enumerate(targets):
                rel = f"poison/targets/{tid}.png"
                img.save(tmp / rel)
                trows.append({"id": tid, "image": rel, "label": label, "target_class": cfg.target_class})
                share = k // len(targets) + (1 if t < k % len(targets) else 0)
                for j in range(share):
                    r = {c: "" for c in cols}
                    r.update(id=f"poison-targeted-{t}-{j}", image=rel, caption=rng.choice(cfg.templates).format(cfg.target_class))
                    if labels is not None:
                        r["label"] = label
                    r["__attack"] = "targeted"
                    r["__target"] = cfg.target_class
                    extra_rows.append(r)
            targets_path = tmp / "targets.csv"
            _write_csv(targets_path, ["id", "image", "label", "target_class"], trows)
        else:
            kind = "patch" if cfg.attack == "backdoor-patch" else "blend"
            nrng = np.random.default_rng([cfg.seed, ATTACKS.index(cfg.attack)])
            size = 8 if kind == "patch" else 32
            trig = Trigger(cfg.attack, cfg.target_class, kind, nrng.integers(0, 256, (size, size, 3), dtype=np.uint8), cfg.patch_frac, cfg.blend_alpha)
            trigger_path = trig.save(tmp / f"trigger-{cfg.attack}.json")
            cand = [i for i in range(n) if i not in removed and not truth[i][0] and (labels is None or labels[i] != cfg.target_class)]
            if len(cand) < k:
                raise PoisonError(f"{cfg.attack}: asked for {k} poisoned rows, only {len(cand)} eligible")
            chosen = sorted(rng.sample(cand, k))
            pdir = tmp / "poison" / cfg.attack
            pdir.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                arr = np.asarray(rows.open_image(i).convert("RGB"))
                rel = f"poison/{cfg.attack}/{_safe(cols['id'][i])}.png"
                Image.fromarray(apply_trigger(arr, trig, nrng)).save(tmp / rel)
                cols["image"][i] = rel
                cols["caption"][i] = rng.choice(cfg.templates).format(cfg.target_class)
                truth[i] = (cfg.attack, cfg.target_class)
    _copy_clean_images(rows, tmp, [i for i in range(n) if i not in removed and not truth[i][0]])
    names = list(cols)
    out_rows = [{c: cols[c][i] for c in names} | {"__attack": truth[i][0], "__target": truth[i][1]} for i in range(n) if i not in removed]
    out_rows += extra_rows
    ids = [r["id"] for r in out_rows]
    if len(set(ids)) != len(ids):
        raise PoisonError(f"{rows.path}: ids are not unique after poisoning")
    truth_rows = [
        {"id": r["id"], "poisoned": "1" if r["__attack"] else "0", "attack": r["__attack"], "target_class": r["__target"]}
        for r in out_rows
    ]
    truth_path = tmp / "poison_truth.csv"
    _write_csv(truth_path, ["id", "poisoned", "attack", "target_class"], truth_rows)
    table_rows = [{c: r[c] for c in names} for r in out_rows]
    manifest_path = _write_like(rows, tmp, names, table_rows)
    return PoisonResult(manifest_path, truth_path, trigger_path, targets_path, sum(1 for r in truth_rows if r["poisoned"] == "1"))


def _pick_targets(
    rows: ManifestRows, cfg: PoisonConfig, rng: random.Random, removed: set[int], truth: dict[int, tuple[str, str]]
) -> list[tuple[Image.Image, str, str]]:
    if cfg.target_pool is not None:
        pool = read_rows(cfg.target_pool, need=("image", "label"))
        cand = [i for i, lab in enumerate(pool.col("label")) if lab != cfg.target_class]
        if len(cand) < cfg.n_targets:
            raise PoisonError(f"{cfg.target_pool}: only {len(cand)} candidate target images")
        pick = rng.sample(cand, cfg.n_targets)
        return [(pool.open_image(i), pool.col("label")[i], f"target-{_safe(pool.ids[i])}") for i in pick]
    labels = rows.col("label")
    cand = [i for i in range(len(rows)) if labels[i] != cfg.target_class and i not in removed and not truth[i][0]]
    if len(cand) < cfg.n_targets:
        raise PoisonError(f"{rows.path}: only {len(cand)} candidate target images")
    pick = rng.sample(cand, cfg.n_targets)
    images = rows.col("image")
    for i in pick:  # the model must never see a target image with its true caption
        removed.update(j for j in range(len(rows)) if images[j] == images[i])
    return [(rows.open_image(i), labels[i], f"target-{_safe(rows.ids[i])}") for i in pick]


def _copy_clean_images(rows: ManifestRows, out: Path, keep: Sequence[int]) -> None:
    """Place the clean images under ``out`` at their original relative paths (hard links
    where possible), so the poisoned set is self-contained."""
    images = rows.col("image")
    done: set[str] = set()
    for i in keep:
        rel = images[i]
        if rel in done:
            continue
        done.add(rel)
        target = out / rel
        if not target.resolve().is_relative_to(out.resolve()):
            raise PoisonError(f"{rows.path}: image path {rel!r} escapes the dataset directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        src = rows.path.parent / rel
        if rows.manifest is None or src.is_file():
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
        else:
            target.write_bytes(rows.manifest.images.read_bytes(rel))


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _write_like(rows: ManifestRows, out: Path, names: list[str], table_rows: list[dict[str, str]]) -> Path:
    """Write the poisoned manifest in the input's format (CSV where IO is unavailable)."""
    if rows.manifest is not None:
        try:
            import pyarrow as pa

            from otcclip.models.manifest_writer import write_manifest

            table = pa.table({c: [r[c] for r in table_rows] for c in names})
            target = out / Path(rows.manifest.path).name
            return Path(write_manifest(rows.manifest, table, target))
        except (ImportError, NotImplementedError):
            pass
    target = out / (rows.path.stem + ".csv")
    _write_csv(target, names, table_rows)
    return target
