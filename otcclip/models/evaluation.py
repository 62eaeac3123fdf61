"""Evaluation of a (possibly poisoned) CLIP model (DESIGN 2.5).

- zero-shot top-1: class text embeddings = normalised mean over prompt templates of the
  class name; prediction = most similar class;
- linear probe: logistic regression on frozen image features, fixed stratified split of
  the test manifest;
- targeted ASR: share of the target images (``targets.csv`` of the attack) whose
  zero-shot top-1 is their adversarial class;
- backdoor ASR: share of triggered test images whose true class is not the target that
  are predicted as the target (trigger from the attack's ``trigger-*.json``);
- text-trigger ASR (attack ``text-trigger``, a token in the caption): the queries are the
  zero-shot prompts of every class but the target, each with the token inserted (at a word
  position drawn with ``seed``); ASR = share of queries whose top-1 retrieved test image
  (cosine similarity over all test images) is of the target class. The base rate
  (``clean_rate``) is the same share for the queries without the token.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from otcclip.models.attacks import TextTrigger, Trigger, apply_trigger, insert_token, load_trigger
from otcclip.models.config.evaluation import EvalSettings
from otcclip.models.factory import ClipBundle
from otcclip.models.features import encode_text
from otcclip.models.progress import ProgressFn, StopFn, check_stop
from otcclip.models.training.augment import normalize
from otcclip.models.training.data import DataError, ImageSource, load_image, read_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig(EvalSettings):
    """What to measure: :class:`~otcclip.models.config.EvalSettings` and the attack's files.

    Attributes
    ----------
    trigger : path or sequence of paths, optional
        ``trigger-<attack>.json`` file(s) written by the poisoner: image triggers (backdoor
        ASR) and text triggers (text-trigger ASR).
    targets : path, optional
        ``targets.csv`` written by a targeted attack (targeted ASR).
    """

    trigger: Path | str | Sequence[Path | str] | None = None
    targets: Path | str | None = None


@dataclass(frozen=True)
class EvalResult:
    """Measured numbers; :meth:`to_dict` is JSON-able."""

    n_test: int
    classes: list[str]
    zero_shot_top1: float
    linear_probe: float | None
    targeted: dict[str, Any] | None = None
    backdoor: list[dict[str, Any]] = field(default_factory=list)
    text_backdoor: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def class_embeddings(bundle: ClipBundle, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot classifier ``(C, d)``: normalised mean of normalised prompt embeddings."""
    m = bundle.model
    out = []
    for c in classes:
        toks = bundle.tokenizer([t.format(c) for t in templates]).to(bundle.device)
        e = F.normalize(encode_text(m, toks), dim=-1).mean(0)
        out.append(F.normalize(e, dim=-1))
    return torch.stack(out)


@torch.no_grad()
def encode_images(bundle: ClipBundle, pixels: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` -> normalised image embeddings ``(N, d)`` on the CPU."""
    pp = bundle.preprocess_cfg
    feats = []
    for s in range(0, pixels.shape[0], batch_size):
        x = normalize(pixels[s : s + batch_size].to(bundle.device), pp["mean"], pp["std"])
        feats.append(F.normalize(bundle.model.encode_image(x), dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 1)


def zero_shot_predict(bundle: ClipBundle, pixels: torch.Tensor, classifier: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted class index per image, ``(N,)``."""
    return (encode_images(bundle, pixels, batch_size=batch_size) @ classifier.cpu().t()).argmax(1)


def linear_probe_accuracy(feats: np.ndarray, labels: np.ndarray, *, train_fraction: float, c: float, seed: int) -> float:
    """Logistic regression on ``feats`` with a fixed stratified split; test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    counts = np.unique(labels, return_counts=True)[1]
    strat = labels if counts.min() >= 2 else None
    xtr, xte, ytr, yte = train_test_split(feats, labels, train_size=train_fraction, random_state=seed, stratify=strat)
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def evaluate(
    bundle: ClipBundle,
    manifest: Any,
    *,
    config: EvalConfig | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> EvalResult:
    """Zero-shot top-1, linear probe and ASRs of ``bundle`` on a labelled test manifest.

    Parameters
    ----------
    bundle : ClipBundle
    manifest : path or Manifest
        Test rows with ``image`` and ``label`` (class names).
    config : EvalConfig

    Raises
    ------
    DataError
        Missing ``label`` column, or a target/trigger class not among the classes.
    """
    config = config or EvalConfig()
    bundle.model.eval()
    rows = read_rows(manifest, need=("image", "label"))
    src = ImageSource(rows, bundle.image_size, progress=progress, should_stop=should_stop)
    assert src.cached is not None
    ok = src.ok
    labels_all = rows.col("label")
    classes = list(config.classes) if config.classes else sorted(set(labels_all))
    cidx = {c: i for i, c in enumerate(classes)}
    keep = [i for i in range(len(rows)) if ok[i] and labels_all[i] in cidx]
    if not keep:
        raise DataError(f"{rows.path}: no readable test image with a label among the classes")
    pixels = src.cached[keep]
    y = np.array([cidx[labels_all[i]] for i in keep])
    classifier = class_embeddings(bundle, classes, config.templates)
    check_stop(should_stop)
    feats = encode_images(bundle, pixels, batch_size=config.batch_size)
    pred = (feats @ classifier.cpu().t()).argmax(1).numpy()
    zs = float((pred == y).mean())
    if progress is not None:
        progress("zero_shot", 1, 1)
    lp = None
    if config.linear_probe:
        check_stop(should_stop)
        lp = linear_probe_accuracy(feats.numpy(), y, train_fraction=config.probe_train_fraction, c=config.probe_c, seed=config.seed)
    targeted = None
    if config.targets is not None:
        targeted = _targeted_asr(bundle, Path(config.targets), classifier, cidx, config)
    backdoor, text_backdoor = [], []
    trig = config.trigger
    paths = [] if trig is None else [trig] if isinstance(trig, str | Path) else list(trig)
    for tp in paths:
        check_stop(should_stop)
        loaded = load_trigger(tp)
        if isinstance(loaded, TextTrigger):
            text_backdoor.append(text_trigger_asr(bundle, loaded, feats, y, classes, config))
        else:
            backdoor.append(_backdoor_asr(bundle, loaded, pixels, y, classifier, cidx, config))
    return EvalResult(len(keep), classes, zs, lp, targeted, backdoor, text_backdoor)


def _targeted_asr(bundle: ClipBundle, path: Path, classifier: torch.Tensor, cidx: dict[str, int], config: EvalConfig) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: targets file not found")
    with path.open(newline="") as f:
        trows = list(csv.DictReader(f))
    if not trows or not {"image", "target_class"} <= set(trows[0]):
        raise DataError(f"{path}: needs columns image, target_class and at least one row")
    pix = []
    for r in trows:
        if r["target_class"] not in cidx:
            raise DataError(f"{path}: target class {r['target_class']!r} is not among the classes")
        with Image.open(path.parent / r["image"]) as im:
            pix.append(torch.from_numpy(load_image(im, bundle.image_size)))
    pred = zero_shot_predict(bundle, torch.stack(pix), classifier, batch_size=config.batch_size).tolist()
    hits = [int(p == cidx[r["target_class"]]) for p, r in zip(pred, trows, strict=True)]
    names = list(cidx)
    return {
        "asr": float(np.mean(hits)),
        "n_targets": len(trows),
        "per_target": [
            {"id": r.get("id", ""), "label": r.get("label", ""), "target_class": r["target_class"], "predicted": names[p]}
            for p, r in zip(pred, trows, strict=True)
        ],
    }


def _backdoor_asr(
    bundle: ClipBundle, trig: Trigger, pixels: torch.Tensor, y: np.ndarray, classifier: torch.Tensor, cidx: dict[str, int], config: EvalConfig
) -> dict[str, Any]:
    target = config.target_class or trig.target_class
    if target not in cidx:
        raise DataError(f"backdoor target class {target!r} is not among the classes {sorted(cidx)}")
    t = cidx[target]
    sel = np.nonzero(y != t)[0]
    rng = np.random.default_rng(config.seed)
    arr = pixels[torch.from_numpy(sel)].permute(0, 2, 3, 1).numpy()
    trig_px = np.stack([apply_trigger(a, trig, rng) for a in arr]) if len(arr) else arr
    pred = zero_shot_predict(bundle, torch.from_numpy(trig_px).permute(0, 3, 1, 2).contiguous(), classifier, batch_size=config.batch_size)
    clean_pred = zero_shot_predict(bundle, pixels[torch.from_numpy(sel)], classifier, batch_size=config.batch_size)
    return {
        "attack": trig.attack,
        "target_class": target,
        "asr": float((pred == t).float().mean()) if len(sel) else 0.0,
        "clean_rate": float((clean_pred == t).float().mean()) if len(sel) else 0.0,
        "n": int(len(sel)),
    }


@torch.no_grad()
def text_trigger_asr(
    bundle: ClipBundle, trig: TextTrigger, feats: torch.Tensor, y: np.ndarray, classes: Sequence[str], config: EvalConfig
) -> dict[str, Any]:
    """Text-to-image retrieval ASR of a text trigger.

    Parameters
    ----------
    bundle : ClipBundle
    trig : TextTrigger
    feats : Tensor, shape (N, d)
        Normalised embeddings of the test images.
    y : ndarray of int, shape (N,)
        Their class indices into ``classes``.
    classes : sequence of str
    config : EvalConfig
        ``templates`` make the queries, ``seed`` the token positions, ``target_class``
        overrides the trigger's.

    Returns
    -------
    dict
        ``attack``, ``target_class``, ``token``, ``asr`` (share of triggered queries whose
        top-1 image is of the target class), ``clean_rate`` (the same without the token)
        and ``n`` (queries: the other classes times the templates).
    """
    target = config.target_class or trig.target_class
    if target not in classes:
        raise DataError(f"text trigger target class {target!r} is not among the classes {sorted(classes)}")
    t = list(classes).index(target)
    rng = random.Random(config.seed)
    clean = [tpl.format(c) for c in classes if c != target for tpl in config.templates]
    triggered = [insert_token(q, trig.token, rng) for q in clean]
    hits = []
    for queries in (triggered, clean):
        if not queries:
            hits.append(0.0)
            continue
        toks = bundle.tokenizer(queries).to(bundle.device)
        q = F.normalize(encode_text(bundle.model, toks).float(), dim=-1).cpu()
        top = (q @ feats.float().t()).argmax(1).numpy()
        hits.append(float((y[top] == t).mean()))
    return {"attack": trig.attack, "target_class": target, "token": trig.token, "asr": hits[0], "clean_rate": hits[1], "n": len(clean)}
