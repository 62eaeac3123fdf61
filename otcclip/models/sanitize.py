"""The sanitization pass, staged so that it can be sharded across machines (DESIGN 2.3).

Stages (each a pure function; the Celery workers fan out the first two)::

    plan_shards(n, shard_size)                      -> [(start, stop), ...]
    encode_shard(manifest, bundle, start, stop)     -> FeatureShard   (.save / .load, atomic)
    match_shard(image_shard, caption_shards)        -> ScoreShard     (.save / .load, atomic)
    decide(score_shards)                            -> Decisions
    search_trigger_templates(manifest, bundle, d)   -> Decisions      (pixels; with purified views)
    report.write_outputs(manifest, decisions, out)  -> OutputFiles

:func:`sanitize` runs them all in one process (optionally spilling shards to a work
directory, which also makes a re-run skip finished shards); :func:`sanitize_features`
runs matching and decisions on in-memory features (the trainer's re-matching). The shard
files are :mod:`otcclip.models.shards`.

Memory: an encode holds one shard; a match holds one image shard, the caption globals
(``N x d`` float32) and one caption shard at a time (shards load memory-mapped); a decide
holds one score shard and row blocks, and keeps its per-pair arrays in memory-mapped
files of a temporary spill directory (see :func:`decide`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otcclip.models.config.sanitize import SanitizeConfig
from otcclip.models.decisions import Decisions, DetectorEnv, MatchScores, decide_pairs
from otcclip.models.features import (
    ImageFeatures,
    TextFeatures,
    content_thumbnail,
    image_features,
    pad_text_features,
    purified_image_global,
    text_features,
)
from otcclip.models.progress import ProgressFn, StopFn, check_stop
from otcclip.models.scoring import CaptionBlock, score_shortlist
from otcclip.models.shards import FeatureShard, ScoreShard, caption_hash
from otcclip.models.shortlist import build_index, shortlist

log = logging.getLogger(__name__)

__all__ = [
    "SanitizeConfig", "FeatureShard", "ScoreShard", "SanitizeResult", "Decisions",
    "plan_shards", "encode_shard", "match_shard", "decide", "needs_template_search", "search_trigger_templates", "sanitize", "sanitize_features",
]


def _device(name: str) -> torch.device:
    from otcclip.models.factory import resolve_device

    return resolve_device(name)


@dataclass(frozen=True)
class SanitizeResult:
    """Outcome of :func:`sanitize`: the decisions and seconds per stage."""

    decisions: Decisions
    timings: dict[str, float]
    n_pairs: int


def plan_shards(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """Split ``range(n_rows)`` into consecutive ``(start, stop)`` shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


def encode_shard(
    manifest: Any,
    bundle: Any,
    start: int,
    stop: int,
    *,
    config: SanitizeConfig = SanitizeConfig(),
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> FeatureShard:
    """Encode images and captions of manifest rows ``[start, stop)``.

    Parameters
    ----------
    manifest : Manifest
        With ``image`` and ``caption`` columns.
    bundle : ClipBundle
        Model, tokenizer and eval transform; moved to ``config.device``.

    Returns
    -------
    FeatureShard
        Unreadable images give ``ok=False`` and zero image features.
    """
    from otcclip.models.images import load_image_batch

    if not 0 <= start <= stop <= len(manifest):
        raise ValueError(f"shard [{start}, {stop}) outside the manifest's {len(manifest)} rows")
    dev = _device(config.device)
    model = bundle.model.to(dev).eval()
    captions = manifest.captions
    ldt = torch.float16 if config.fp16_locals else torch.float32
    oks: list[torch.Tensor] = []
    igs: list[torch.Tensor] = []
    ils: list[torch.Tensor] = []
    ips: list[torch.Tensor] = []
    purify = "trigger_sensitivity" in config.decisions.detectors
    tfs: list[TextFeatures] = []
    hashes: list[int] = []
    image_hashes: list[int] = []
    thumbs: list[torch.Tensor] = []
    ids = getattr(manifest, "ids", None)
    t_decode = t_encode = 0.0
    for s in range(start, stop, config.batch_size):
        check_stop(should_stop)
        e = min(s + config.batch_size, stop)
        t0 = time.perf_counter()
        batch = load_image_batch(manifest, range(s, e), bundle.preprocess, content_hash=True)
        caps = [captions[i] for i in range(s, e)]
        tokens = bundle.tokenizer(caps)
        t1 = time.perf_counter()
        with torch.no_grad():
            fi = image_features(model, batch.pixels.to(dev))
            ft = text_features(model, tokens.to(dev))
            if purify:
                ips.append((purified_image_global(model, batch.pixels.to(dev)) * batch.ok.to(dev)[:, None, None]).float().cpu())
        ok = batch.ok.to(torch.bool)
        okd = ok.to(dev)[:, None]
        oks.append(ok)
        igs.append((fi.global_ * okd).float().cpu())
        ils.append((fi.local * okd[:, :, None]).to(ldt).cpu())
        tfs.append(TextFeatures(ft.global_.float().cpu(), ft.local.to(ldt).cpu(), ft.mask.cpu()))
        hashes.extend(caption_hash(c) for c in caps)
        image_hashes.extend(batch.hashes)
        thumbs.append((content_thumbnail(batch.pixels) * batch.ok[:, None]).to(torch.float16))
        t_encode += time.perf_counter() - t1
        t_decode += t1 - t0
        for i, err in enumerate(batch.errors):
            if err:
                log.warning("row %d: unreadable image (%s): pair dropped", s + i, err)
        if progress is not None:
            progress("encode", e - start, stop - start)
    if not oks:
        raise ValueError(f"empty shard [{start}, {stop})")
    tf = pad_text_features(tfs)
    return FeatureShard(
        start=start, stop=stop, ok=torch.cat(oks), image_global=torch.cat(igs),
        image_local=torch.cat(ils), caption_global=tf.global_, caption_local=tf.local,
        caption_mask=tf.mask, caption_hash=torch.tensor(hashes, dtype=torch.int64),
        image_purified=torch.cat(ips) if purify else None,
        image_hash=torch.tensor(image_hashes, dtype=torch.int64),
        row_key=(None if ids is None else
                 torch.tensor([caption_hash(f"id:{ids[i]}") for i in range(start, stop)], dtype=torch.int64)),
        image_thumb=torch.cat(thumbs),
        timings={"decode": t_decode, "encode": t_encode},
    )


ShardRef = FeatureShard | str | Path


def _resolve(ref: ShardRef) -> FeatureShard:
    return ref if isinstance(ref, FeatureShard) else FeatureShard.load(ref)


@dataclass(frozen=True)
class CaptionIndex:
    """Caption globals of the whole dataset, their FAISS index and the shard blocks.

    Build once with :func:`build_caption_index` and pass to :func:`match_shard` to reuse
    it across image shards in one process.
    """

    index: Any
    globals_: np.ndarray
    blocks: tuple[CaptionBlock, ...]
    seconds: float


def build_caption_index(caption_shards: Sequence[ShardRef], *, config: SanitizeConfig) -> CaptionIndex:
    """Index the caption globals of ``caption_shards`` (must cover rows 0..N contiguously)."""
    t0 = time.perf_counter()
    metas = []
    for ref in caption_shards:
        sh = _resolve(ref)
        metas.append((sh.start, sh.stop, ref, sh.caption_global.numpy().astype(np.float32, copy=True)))
    metas.sort(key=lambda m: m[0])
    pos = 0
    for s, e, _, _ in metas:
        if s != pos:
            raise ValueError(f"caption shards do not cover the rows contiguously: gap or overlap at row {pos} (next shard starts at {s})")
        pos = e
    glob = np.concatenate([m[3] for m in metas]) if metas else np.zeros((0, 0), np.float32)

    def loader(ref: ShardRef) -> Any:
        def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            sh = _resolve(ref)
            return sh.caption_local, sh.caption_mask, sh.caption_global

        return load

    blocks = tuple(CaptionBlock(s, e, loader(ref)) for s, e, ref, _ in metas)
    index = build_index(glob, settings=config.index, seed=config.seed)
    return CaptionIndex(index=index, globals_=glob, blocks=blocks, seconds=time.perf_counter() - t0)


def match_shard(
    image_shard: ShardRef,
    caption_shards: Sequence[ShardRef] | CaptionIndex,
    *,
    config: SanitizeConfig = SanitizeConfig(),
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> ScoreShard:
    """Shortlist and score the captions of one image shard (cost ~ rows * (k + 1)).

    Parameters
    ----------
    image_shard : FeatureShard or path
        The images to match (rows ``[start, stop)``; their own captions are those rows).
    caption_shards : sequence of FeatureShard or paths, or a CaptionIndex
        All shards of the dataset (captions are candidates for every image), or an index
        already built from them.

    Returns
    -------
    ScoreShard
    """
    t0 = time.perf_counter()
    cidx = caption_shards if isinstance(caption_shards, CaptionIndex) else build_caption_index(caption_shards, config=config)
    img = _resolve(image_shard)
    check_stop(should_stop)
    own = np.arange(img.start, img.stop, dtype=np.int64)
    sl = shortlist(cidx.index, img.image_global.numpy(), config.k, own=own, caption_globals=cidx.globals_)
    t1 = time.perf_counter()
    dev = _device(config.device)
    ps = score_shortlist(
        img.image_local, sl.indices, sl.scores, cidx.blocks, alpha=config.alpha, ot_settings=config.ot,
        batch_size=config.batch_size, k_ot=config.k_ot, margin=config.ot_margin, image_global=img.image_global, device=dev, progress=progress, should_stop=should_stop,
    )
    t2 = time.perf_counter()
    n_ot = int(np.isfinite(ps.ot).sum())
    log.info("rows %d-%d: OT on %d of %d shortlisted pairs in %.2f s (%.0f problems/s)", img.start, img.stop, n_ot,
             int((sl.indices >= 0).sum()), t2 - t1, n_ot / max(t2 - t1, 1e-9))
    scores = MatchScores(
        candidates=sl.indices, global_=ps.global_, ot=ps.ot, fused=ps.fused,
        ok=img.ok.numpy().astype(bool), image_global=img.image_global.numpy().astype(np.float16),
        caption_global=img.caption_global.numpy().astype(np.float16), caption_hash=img.caption_hash.numpy(),
        purified_own=(
            None if img.image_purified is None
            else torch.einsum("nvd,nd->nv", img.image_purified.float(), img.caption_global.float()).numpy().astype(np.float32)
        ),
        image_hash=None if img.image_hash is None else img.image_hash.numpy().astype(np.int64),
        row_key=None if img.row_key is None else img.row_key.numpy().astype(np.int64),
        image_thumb=None if img.image_thumb is None else img.image_thumb.numpy().astype(np.float16),
    )
    return ScoreShard(img.start, img.stop, scores, timings={"index": t1 - t0, "ot": t2 - t1})


def decide(score_shards: Sequence[ScoreShard | str | Path], *, config: SanitizeConfig = SanitizeConfig(),
           spill_dir: str | Path | None = None) -> Decisions:
    """Decisions for every pair from the score shards of the whole dataset.

    Each shard is narrowed to the two candidate columns the decisions read
    (:meth:`MatchScores.narrow`) before it joins the others. Shards given as paths are
    loaded one at a time into memory-mapped files in a temporary spill directory, and
    the decision pass keeps its per-pair arrays there too (``DetectorEnv.spill``,
    :mod:`otcclip.models.spill`): the scores, the kNN's neighbours and work copy, the
    model-quality control's cosines and sorts, the GMM's sorted scores, and the numeric
    columns of the returned :class:`Decisions` (still readable after the directory is
    removed: the maps keep the files' pages). The default detectors work in row blocks
    and spill their per-pair arrays as well (their ``env.spill`` paths). Anonymous
    memory is then one shard, the data-wide row blocks' temporaries, the few pairs of
    the groups of repeated images and, per pair, the four string columns' object
    pointers (32 B) (see docs/benchmarks.md section 2.3).

    Parameters
    ----------
    score_shards : sequence of ScoreShard or paths
        Covering rows 0..N contiguously, in any order. All in memory: nothing is spilled.
    config : SanitizeConfig
    spill_dir : path, optional
        Where the temporary spill directory is made (default: the system's temporary
        directory, ``TMPDIR``). The directory is removed on return and on any error.
    """
    spans = sorted(((s.start, s.stop, s) if isinstance(s, ScoreShard) else (*ScoreShard.span(s), s)
                    for s in score_shards), key=lambda t: t[0])
    pos = 0
    for start, stop, _ in spans:
        if start != pos:
            raise ValueError(f"score shards do not cover the rows contiguously: gap or overlap at row {pos}")
        pos = stop
    parts = ((s if isinstance(s, ScoreShard) else ScoreShard.load(s)).scores.narrow() for _, _, s in spans)
    if all(isinstance(s, ScoreShard) for _, _, s in spans):  # in memory already: nothing to spill
        env = DetectorEnv(index=config.index, seed=config.seed)
        return decide_pairs(MatchScores.stack(parts, pos), settings=config.decisions, env=env)
    # a network filesystem may keep renamed stand-ins of the unlinked, still-mapped files
    # (.nfsXXXX) until the maps go: the directory's removal must not fail the decisions
    with tempfile.TemporaryDirectory(prefix="otcclip-decide-", dir=spill_dir, ignore_cleanup_errors=True) as tmp:
        env = DetectorEnv(index=config.index, seed=config.seed, spill=tmp)
        scores = MatchScores.stack(parts, pos, spill=tmp)
        decisions = decide_pairs(scores, settings=config.decisions, env=env)
        del scores
    return decisions


def sanitize(
    manifest: Any,
    bundle: Any,
    *,
    config: SanitizeConfig = SanitizeConfig(),
    work_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SanitizeResult:
    """Run every stage in this process.

    Parameters
    ----------
    work_dir : path, optional
        Spill feature and score shards there (``features_NNNNNN.pt``,
        ``scores_NNNNNN.npz``); shards already there are reused. Without it, shards
        stay in memory.
    progress : ProgressFn, optional
        Called with stages ``encode``, ``match``, ``decide`` (done/total in pairs; ``match``
        per OT batch).
    """
    n = len(manifest)
    if n == 0:
        raise ValueError(f"{getattr(manifest, 'path', 'manifest')}: no rows to sanitize")
    plan = plan_shards(n, config.shard_size)
    wd = Path(work_dir) if work_dir is not None else None
    timings = {k: 0.0 for k in ("decode", "encode", "index", "ot", "decide")}
    feats: list[ShardRef] = []
    done = 0
    for s, e in plan:
        path = wd / f"features_{s:09d}.pt" if wd else None
        if path is not None and path.exists():
            feats.append(path)
        else:
            sh = encode_shard(manifest, bundle, s, e, config=config, should_stop=should_stop,
                              progress=_offset(progress, "encode", s, n))
            for k, v in sh.timings.items():
                timings[k] += v
            feats.append(sh.save(path) if path is not None else sh)
        done = e
        if progress is not None:
            progress("encode", done, n)
    cidx = build_caption_index(feats, config=config)
    timings["index"] += cidx.seconds
    scores: list[ScoreShard | Path] = []  # saved shards as paths: decide loads one at a time
    for ref, (s, e) in zip(feats, plan, strict=True):
        path = wd / f"scores_{s:09d}.npz" if wd else None
        if path is not None and path.exists():
            scores.append(path)
        else:
            sc = match_shard(ref, cidx, config=config, should_stop=should_stop,
                             progress=_scaled(progress, "match", s, e, n))
            for k, v in sc.timings.items():
                timings[k] += v
            scores.append(sc.save(path) if path is not None else sc)
        if progress is not None:
            progress("match", e, n)
    t0 = time.perf_counter()
    check_stop(should_stop)
    decisions = decide(scores, config=config)
    timings["decide"] = time.perf_counter() - t0
    check_stop(should_stop)
    t0 = time.perf_counter()
    decisions = search_trigger_templates(manifest, bundle, decisions, config=config)
    timings["templates"] = time.perf_counter() - t0
    if progress is not None:
        progress("decide", n, n)
    return SanitizeResult(decisions=decisions, timings=timings, n_pairs=n)


#: Decoded images kept in memory for the template search up to this many bytes (else decoded per chunk).
TEMPLATE_CACHE_BYTES = 1 << 30


def needs_template_search(decisions: Decisions, *, config: SanitizeConfig = SanitizeConfig()) -> bool:
    """Whether :func:`search_trigger_templates` would search (so a job loads the model only then)."""
    st = config.decisions
    return bool(st.template_search and "trigger_sensitivity" in st.detectors
                and (np.asarray(decisions.purified_view) >= 0).any())


def search_trigger_templates(manifest: Any, bundle: Any, decisions: Decisions, *,
                             config: SanitizeConfig = SanitizeConfig()) -> Decisions:
    """The decide stage's last step: the trigger-template search
    (:func:`~otcclip.models.triggers.apply_templates`) on the manifest's images.

    Runs when ``trigger_sensitivity`` is enabled, ``config.decisions.template_search`` is
    on and the features carry purified views; otherwise returns ``decisions`` unchanged.
    Images are decoded with the bundle's eval transform (the space the purified views
    were scored in), all at once when they fit :data:`TEMPLATE_CACHE_BYTES`.
    """
    from otcclip.models.images import load_image_batch
    from otcclip.models.triggers import apply_templates

    st = config.decisions
    if not needs_template_search(decisions, config=config):
        return decisions
    n = len(manifest)
    first = load_image_batch(manifest, [0], bundle.preprocess).pixels
    cache: torch.Tensor | None = None
    if n * first[0].numel() * 4 <= TEMPLATE_CACHE_BYTES:
        cache = torch.cat([load_image_batch(manifest, range(s, min(s + config.batch_size, n)), bundle.preprocess).pixels
                           for s in range(0, n, config.batch_size)])

    def images(idx: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            return cache[idx]
        return load_image_batch(manifest, idx.tolist(), bundle.preprocess).pixels

    out, found = apply_templates(decisions, images, settings=st, seed=config.seed)
    if found:
        log.info("trigger templates: %d found, %d pairs dropped", len(found), int((out.reason == "trigger_template").sum()))
    return out


def _offset(progress: ProgressFn | None, stage: str, offset: int, total: int) -> ProgressFn | None:
    """Report a shard's progress as progress over the whole dataset."""
    if progress is None:
        return None
    cb = progress

    def report(_stage: str, done: int, _total: int) -> None:
        cb(stage, offset + done, total)

    return report


def _scaled(progress: ProgressFn | None, stage: str, start: int, stop: int, total: int) -> ProgressFn | None:
    """Report a shard's per-batch progress in another unit (shortlisted candidates) as pairs of the dataset."""
    if progress is None:
        return None
    cb = progress

    def report(_stage: str, done: int, of: int) -> None:
        cb(stage, start + ((stop - start) * done) // max(of, 1), total)

    return report


def _embedding_hash(glob: np.ndarray) -> np.ndarray:
    """Per-row hash of float16-rounded embeddings (identical captions -> same hash)."""
    g = np.ascontiguousarray(glob.astype(np.float16))
    return np.array([caption_hash(row.tobytes().hex()) for row in g], dtype=np.int64)


def sanitize_features(
    images: ImageFeatures,
    texts: TextFeatures,
    *,
    config: SanitizeConfig = SanitizeConfig(),
    ok: torch.Tensor | None = None,
    purified: torch.Tensor | None = None,
    thumbs: torch.Tensor | None = None,
) -> Decisions:
    """Match and decide on in-memory features (pair ``i`` = image ``i`` with caption ``i``).

    Parameters
    ----------
    images : ImageFeatures
        ``global_ (N, d)``, ``local (N, P, d)``.
    texts : TextFeatures
        ``global_ (N, d)``, ``local (N, L, d)``, ``mask (N, L)``.
    ok : Tensor, shape (N,), bool, optional
        Readable images (default all).
    purified : Tensor, shape (N, V, d), optional
        Globals of the purified views (:func:`~otcclip.models.features.purified_image_global`),
        for the ``trigger_sensitivity`` detector.
    thumbs : Tensor, shape (N, t), optional
        :func:`~otcclip.models.features.content_thumbnail` of the images, for the
        ``collapse`` detector (without them it flags nothing).

    Returns
    -------
    Decisions
        Row ``i`` is pair ``i``; ``new_caption_index`` indexes the captions.
    """
    n = images.global_.shape[0]
    if texts.global_.shape[0] != n:
        raise ValueError(f"{n} images but {texts.global_.shape[0]} captions")
    cg = texts.global_.detach().float().cpu()
    shard = FeatureShard(
        start=0, stop=n,
        ok=torch.ones(n, dtype=torch.bool) if ok is None else ok.to(torch.bool).cpu(),
        image_global=images.global_.detach().float().cpu(),
        image_local=images.local.detach().cpu(),
        caption_global=cg, caption_local=texts.local.detach().cpu(), caption_mask=texts.mask.detach().cpu(),
        caption_hash=torch.from_numpy(_embedding_hash(cg.numpy())),
        image_purified=None if purified is None else purified.detach().float().cpu(),
        image_thumb=None if thumbs is None else thumbs.detach().to(torch.float16).cpu(),
    )
    sc = match_shard(shard, [shard], config=config)
    return decide([sc], config=config)
