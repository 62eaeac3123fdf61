"""The staged sanitization API on a tiny random model and a tiny on-disk manifest."""

from __future__ import annotations

import csv
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from otcclip.models.config import DecisionSettings, OTSettings
from otcclip.models.features import image_features, text_features
from otcclip.models.manifest import read_manifest
from otcclip.models.progress import Cancelled
from otcclip.models.sanitize import (
    FeatureShard,
    SanitizeConfig,
    ScoreShard,
    decide,
    encode_shard,
    match_shard,
    plan_shards,
    sanitize,
    sanitize_features,
)
from otcclip.models.scores import MatchScores
from tests.models.same_decisions import assert_same_decisions

CFG = SanitizeConfig(k=4, batch_size=8, shard_size=10, device="cpu", ot=OTSettings(iters=30))


def make_manifest(root: Path, n: int = 24, *, broken: int = 5) -> Path:
    """``n`` random 16 px images with captions of 3 classes; row ``broken`` is not a JPEG."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = ["cat", "dog", "ship"]
    rows = []
    for i in range(n):
        path = root / "img" / f"{i:03d}.jpg"
        if i == broken:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"p{i}", "image": f"img/{i:03d}.jpg", "caption": f"a photo of a {names[i % 3]} number {i % 4}",
                     "source": f"s{i}"})
    out = root / "manifest.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_plan_shards() -> None:
    assert plan_shards(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert plan_shards(0, 10) == []
    with pytest.raises(ValueError):
        plan_shards(5, 0)


def test_staged_equals_one_process_and_shards_round_trip(tmp_path: Path, tiny_bundle) -> None:
    man = read_manifest(make_manifest(tmp_path))
    shards = []
    for s, e in plan_shards(len(man), CFG.shard_size):
        sh = encode_shard(man, tiny_bundle, s, e, config=CFG)
        path = sh.save(tmp_path / "work" / f"f{s}.pt")
        shards.append(path)
    loaded = FeatureShard.load(shards[0])
    assert loaded.image_local.dtype == torch.float16 and loaded.caption_mask.dtype == torch.bool
    assert not bool(loaded.ok[5]) and bool(loaded.ok[:5].all())
    assert loaded.image_local[5].abs().sum() == 0
    # the model-free content thumbnail: unit norm where readable, zeros where not
    assert loaded.image_thumb is not None and loaded.image_thumb.shape == (10, 64)
    assert loaded.image_thumb[5].abs().sum() == 0
    assert torch.allclose(loaded.image_thumb[:5].float().norm(dim=1), torch.ones(5), atol=1e-2)
    scores = []
    for p in reversed(shards):  # any order
        sc = match_shard(p, shards, config=CFG)
        scores.append(ScoreShard.load(sc.save(tmp_path / "work" / f"s{sc.start}.npz")))
    assert scores[0].scores.candidates.shape[1] == CFG.k + 1
    assert (scores[-1].scores.candidates[:, 0] == np.arange(0, 10)).all()
    assert scores[-1].scores.image_thumb is not None and scores[-1].scores.image_thumb.shape == (10, 64)
    staged = decide(scores, config=CFG)
    whole = sanitize(man, tiny_bundle, config=CFG).decisions
    assert len(staged) == len(man)
    np.testing.assert_array_equal(staged.action, whole.action)
    np.testing.assert_allclose(staged.fused_score, whole.fused_score, atol=1e-3)
    assert staged.action[5] == "drop" and staged.reason[5] == "unreadable_image"
    fin = np.isfinite(staged.fused_score)
    expect = CFG.alpha * staged.global_score + (1 - CFG.alpha) * staged.ot_score
    np.testing.assert_allclose(staged.fused_score[fin], expect[fin], atol=1e-5)
    with pytest.raises(ValueError, match="contiguously"):
        decide(scores[:1], config=CFG)
    # shards given as paths are streamed into the arrays, one at a time: the same decisions
    paths = [tmp_path / "work" / f"s{sc.start}.npz" for sc in scores]
    assert ScoreShard.span(paths[0]) == (scores[0].start, scores[0].stop)
    assert ScoreShard.timings_of(paths[0]) == scores[0].timings and "ot" in scores[0].timings
    streamed = decide(paths, config=CFG)
    np.testing.assert_array_equal(streamed.action, staged.action)
    np.testing.assert_array_equal(streamed.new_caption_index, staged.new_caption_index)


def test_stack_equals_plain_concatenation_with_padding_and_optional_arrays() -> None:
    rng = np.random.default_rng(0)

    def block(n: int, k: int, hashed: bool) -> MatchScores:
        f = rng.standard_normal((n, k)).astype(np.float32)
        return MatchScores(candidates=rng.integers(0, 50, (n, k)), global_=f, ot=f + 1, fused=f + 2,
                           ok=rng.random(n) > 0.2, image_global=rng.standard_normal((n, 4)).astype(np.float16),
                           caption_global=rng.standard_normal((n, 4)).astype(np.float16),
                           caption_hash=rng.integers(0, 9, n), image_hash=rng.integers(0, 9, n) if hashed else None,
                           row_key=rng.integers(0, 9, n))
    parts = [block(5, 3, True), block(4, 5, True), block(3, 4, False)]
    b = MatchScores.stack(iter(parts), 12)
    fill = {"candidates": -1, "global_": np.nan, "ot": np.nan, "fused": np.nan}

    def reference(name: str) -> np.ndarray | None:  # plain concatenation, columns padded
        arrays = [getattr(p, name) for p in parts]
        if any(x is None for x in arrays):
            return None
        if name in fill:
            arrays = [np.pad(x, ((0, 0), (0, 5 - x.shape[1])), constant_values=fill[name]) for x in arrays]
        return np.concatenate(arrays)

    for f in fields(MatchScores):
        x, y = reference(f.name), getattr(b, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            assert x.dtype == y.dtype, f.name
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="rows"):
        MatchScores.stack(iter(parts), 13)
    np.testing.assert_array_equal(MatchScores.concat(parts).fused, b.fused)


def test_work_dir_reuse_progress_and_cancel(tmp_path: Path, tiny_bundle) -> None:
    man = read_manifest(make_manifest(tmp_path))
    calls: list[tuple[str, int, int]] = []
    first = sanitize(man, tiny_bundle, config=CFG, work_dir=tmp_path / "w", progress=lambda *a: calls.append(a))
    assert {c[0] for c in calls} >= {"encode", "match", "decide"}
    assert calls[-1] == ("decide", len(man), len(man))
    files = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert len([f for f in files if f.startswith("features_")]) == 3
    assert not any(f.startswith(".") for f in files)
    again = sanitize(man, tiny_bundle, config=CFG, work_dir=tmp_path / "w")
    assert again.timings["encode"] == 0.0  # every shard was reused
    np.testing.assert_array_equal(again.decisions.action, first.decisions.action)
    with pytest.raises(Cancelled):
        sanitize(man, tiny_bundle, config=CFG, should_stop=lambda: True)


def test_sanitize_features_in_memory(tiny_bundle) -> None:
    torch.manual_seed(0)
    model = tiny_bundle.model.eval()
    with torch.no_grad():
        fi = image_features(model, torch.randn(12, 3, 16, 16))
        ft = text_features(model, tiny_bundle.tokenizer([f"caption {i}" for i in range(12)]))
    d = sanitize_features(fi, ft, config=SanitizeConfig(k=3, device="cpu", ot=OTSettings(iters=20)))
    tab = d.to_arrow()
    assert tab.num_rows == 12
    new = np.array(tab.column("new_caption_index").to_pylist())
    act = np.array(tab.column("action").to_pylist())
    assert ((new >= 0) == (act != "drop")).all() and (new < 12).all()
    with pytest.raises(ValueError, match="captions"):
        sanitize_features(fi, type(ft)(ft.global_[:5], ft.local[:5], ft.mask[:5]))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="alpha"):
        SanitizeConfig(alpha=2)
    with pytest.raises(ValueError, match="unknown detectors"):
        SanitizeConfig(decisions=DecisionSettings(detectors=("magic",)))
    assert SanitizeConfig(decisions=DecisionSettings(detectors=["density"])).to_dict()["decisions"]["detectors"] == ["density"]  # type: ignore[arg-type]


def _class_features(n: int = 240, classes: int = 6, swap: float = 0.1, seed: int = 0):
    """Synthetic features with class structure: each class has 4 patch and 3 token
    prototypes; an image's patches and its caption's tokens are noisy prototypes of its
    class; globals are noisy class centroids. ``swap`` of the captions come from another
    class. Returns (ImageFeatures, TextFeatures, swapped row indices)."""
    from otcclip.models.features import ImageFeatures, TextFeatures

    g = torch.Generator().manual_seed(seed)
    d, p, length = 32, 8, 6
    proto = F.normalize(torch.randn(classes, 4, d, generator=g), dim=-1)
    cent = F.normalize(proto.sum(1), dim=-1)
    cls = torch.arange(n) % classes
    cap_cls = cls.clone()
    swapped = torch.randperm(n, generator=g)[: int(n * swap)]
    cap_cls[swapped] = (cls[swapped] + 1 + torch.randint(0, classes - 1, (len(swapped),), generator=g)) % classes

    def noisy(v: torch.Tensor, s: float) -> torch.Tensor:
        return F.normalize(v + s * torch.randn(v.shape, generator=g), dim=-1)

    pick_p = torch.randint(0, 4, (n, p), generator=g)
    pick_t = torch.randint(0, 4, (n, length), generator=g)
    img = ImageFeatures(noisy(cent[cls], 0.12), noisy(proto[cls[:, None], pick_p], 0.15))
    mask = torch.arange(length)[None, :] < torch.randint(3, length + 1, (n, 1), generator=g)
    tok = noisy(proto[cap_cls[:, None], pick_t], 0.15) * mask[:, :, None]
    txt = TextFeatures(noisy(cent[cap_cls], 0.12), tok, mask)
    return img, txt, swapped.numpy()


def test_plain_and_log_domain_give_the_same_decisions() -> None:
    img, txt, _ = _class_features()
    out = {}
    for method in ("auto", "log_sinkhorn"):
        cfg = SanitizeConfig(k=8, device="cpu", ot=OTSettings(method=method))
        out[method] = sanitize_features(img, txt, config=cfg)
    np.testing.assert_array_equal(out["auto"].action, out["log_sinkhorn"].action)
    np.testing.assert_array_equal(out["auto"].new_caption_index, out["log_sinkhorn"].new_caption_index)
    np.testing.assert_allclose(out["auto"].ot_score, out["log_sinkhorn"].ot_score, atol=1e-4)


def test_pruned_candidates_get_no_ot_and_are_never_chosen() -> None:
    img, txt, swapped = _class_features(seed=1)
    # the engine's proposals (abstain off: abstaining re-pairs only the clearest half of random swaps)
    off = DecisionSettings(abstain=False)
    full = sanitize_features(img, txt, config=SanitizeConfig(k=12, k_ot=12, ot_margin=2.0, device="cpu", decisions=off))
    pruned_cfg = SanitizeConfig(k=12, k_ot=3, ot_margin=0.15, device="cpu", decisions=off)
    pruned = sanitize_features(img, txt, config=pruned_cfg)
    # the swapped pairs are found as well with OT on the best few candidates only
    for d in (full, pruned):
        assert (d.action[swapped] != "keep").mean() > 0.9
        assert (np.delete(d.action, swapped) == "keep").mean() > 0.9
    assert (pruned.action == full.action).mean() > 0.97
    # the match stage's own view: pruned entries have a global score but NaN OT/fused
    fi = FeatureShard(start=0, stop=240, ok=torch.ones(240, dtype=torch.bool),
                      image_global=img.global_, image_local=img.local, caption_global=txt.global_,
                      caption_local=txt.local, caption_mask=txt.mask,
                      caption_hash=torch.arange(240, dtype=torch.int64))
    m = match_shard(fi, [fi], config=pruned_cfg).scores
    has_ot = np.isfinite(m.ot)
    assert has_ot[:, 0].all() and (has_ot[:, 1:].sum(axis=1) <= 3).all() and np.isfinite(m.global_[m.candidates >= 0]).all()
    assert (~has_ot[:, 1:]).any()
    best = np.nanmax(np.where(m.candidates >= 0, m.global_, np.nan), axis=1, keepdims=True)
    assert (m.global_[:, 1:][has_ot[:, 1:]] >= np.broadcast_to(best, has_ot[:, 1:].shape)[has_ot[:, 1:]] - 0.15 - 1e-6).all()
    chosen = pruned.new_caption_index[pruned.action == "reassign"]
    rows = np.nonzero(pruned.action == "reassign")[0]
    for r, c in zip(rows, chosen, strict=True):
        col = int(np.nonzero(m.candidates[r] == c)[0][0])
        assert has_ot[r, col]


def _score_shards(n: int, shard: int, k: int, d: int, *, seed: int = 0) -> list[ScoreShard]:
    """Synthetic score shards with what the decisions react to: matched and swapped
    captions, candidates missing (-1) or unscored (NaN), ties with the own score, a
    repeated caption on unrelated images, repeated images, unreadable rows, purified views."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    cls = rng.integers(0, 8, n)
    img = centres[cls] + 0.3 * rng.standard_normal((n, d))
    cap = centres[cls] + 0.3 * rng.standard_normal((n, d))
    swapped = rng.random(n) < 0.1
    cap[swapped] = centres[(cls[swapped] + 1) % 8] + 0.3 * rng.standard_normal((int(swapped.sum()), d))
    img[n // 2 : n // 2 + 6] = img[n // 2]  # repeated images
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    chash = np.arange(n, dtype=np.int64)
    chash[rng.choice(n, 12, replace=False)] = -7  # one caption on 12 unrelated images
    cand = np.concatenate([np.arange(n)[:, None], rng.integers(0, n, (n, k))], axis=1)
    glob = np.einsum("nd,nkd->nk", img, cap[cand]).astype(np.float32)
    ot = (glob + 0.05 * rng.standard_normal(glob.shape)).astype(np.float32)
    ot[:, 1 + k // 2 :] = np.nan
    fused = np.where(np.isfinite(ot), 0.5 * (glob + ot), glob).astype(np.float32)
    cand[rng.random((n, k + 1)) < 0.05] = -1
    cand[:, 0] = np.arange(n)
    fused[rng.random((n, k + 1)) < 0.03] = np.nan
    tie = rng.random(n) < 0.05
    fused[tie, 2] = fused[tie, 0]
    ok = rng.random(n) > 0.02
    purified = (glob[:, :1] - np.abs(0.05 * rng.standard_normal((n, 2)))).astype(np.float32)
    purified[:5] -= 0.8  # collapse on a purified view
    ihash = rng.integers(1, 2**62, n)
    ihash[n // 2 : n // 2 + 6] = 11
    out = []
    for s in range(0, n, shard):
        e = min(n, s + shard)
        out.append(ScoreShard(s, e, MatchScores(
            candidates=cand[s:e], global_=glob[s:e], ot=ot[s:e], fused=fused[s:e], ok=ok[s:e],
            image_global=img[s:e].astype(np.float16), caption_global=cap[s:e].astype(np.float16),
            caption_hash=chash[s:e], purified_own=purified[s:e], image_hash=ihash[s:e],
            row_key=rng.integers(1, 2**62, e - s), image_thumb=rng.random((e - s, 6)).astype(np.float16))))
    return out


def test_streamed_narrow_memory_mapped_decide_equals_in_memory_decisions(tmp_path: Path) -> None:
    """decide() on saved shards (narrowed to two candidate columns, embeddings memory-mapped,
    the detectors' kNN through the IVF self-join on a memory-mapped work copy) decides every
    pair as decide_pairs on the full in-memory arrays."""
    from otcclip.models.config import IndexSettings
    from otcclip.models.config.detectors import DETECTORS
    from otcclip.models.decisions import DetectorEnv, decide_pairs

    shards = _score_shards(900, 128, 8, 16)
    index = IndexSettings(exact_threshold=200, list_size=64, nprobe=4)
    for abstain in (True, False):
        cfg = SanitizeConfig(k=8, shard_size=128, index=index, device="cpu",
                             decisions=DecisionSettings(detectors=DETECTORS, abstain=abstain))
        full = MatchScores.concat([s.scores for s in shards])
        ref = decide_pairs(full, settings=cfg.decisions, env=DetectorEnv(index=index, seed=cfg.seed))
        paths = [s.save(tmp_path / f"scores_{s.start:09d}_{abstain}.npz") for s in shards]
        spill = tmp_path / f"spill_{abstain}"
        spill.mkdir()
        with tempfile.TemporaryDirectory(dir=spill) as blocks_dir:  # every row block boundary inside the data
            tiny = decide_pairs(MatchScores.stack((s.scores.narrow() for s in shards), len(full), spill=blocks_dir),
                                settings=cfg.decisions, env=DetectorEnv(index=index, seed=cfg.seed, spill=blocks_dir),
                                block=7)
        streamed = decide(paths, config=cfg, spill_dir=spill)
        assert not any(spill.iterdir())  # the spill directory is gone once decide returns
        for got in (streamed, decide(shards, config=cfg), tiny):
            assert_same_decisions(got, ref)
        # the streamed numeric columns are memory-mapped files, the in-memory ones are not
        numeric = [k for k, v in vars(streamed).items() if isinstance(v, np.ndarray) and v.dtype != object]
        assert len(numeric) >= 15 and all(_mapped(getattr(streamed, k)) for k in numeric)
        assert not any(_mapped(getattr(ref, k)) for k in numeric)
        assert (ref.action != "keep").sum() > 10 and len(set(ref.reason.tolist())) >= 4  # the case decides things
        assert set(ref.detectors.tolist()) - {""}  # and detectors flag


def _mapped(a: np.ndarray) -> bool:
    """Whether ``a``'s memory is a memory-mapped file."""
    import mmap

    b = a
    while b is not None:
        if isinstance(b, mmap.mmap):
            return True
        b = getattr(b, "base", None)
    return False


def test_decide_removes_its_spill_directory_on_error(tmp_path: Path) -> None:
    shards = _score_shards(300, 100, 4, 8)
    paths = [s.save(tmp_path / f"scores_{s.start:09d}.npz") for s in shards]
    with np.load(paths[1]) as z:  # a shard whose span reads but whose scores do not load
        kept = {k: z[k] for k in z.files if k != "fused"}
    np.savez(paths[1], **kept)
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(TypeError):
        decide(paths, config=SanitizeConfig(k=4, shard_size=100, device="cpu"), spill_dir=spill)
    assert not any(spill.iterdir())


def test_a_spilled_array_frees_its_file_when_dropped(tmp_path: Path) -> None:
    """The file behind a spilled array is unlinked once mapped: the directory holds
    nothing while the array works, and its disk is freed when the array goes."""
    import gc
    import shutil

    from otcclip.models import spill as sp

    x = sp.empty(tmp_path, (1000, 64), np.float32)
    x[:] = np.arange(64, dtype=np.float32)
    y = sp.select(x[:, 3], lambda s, e: np.arange(s, e) % 2 == 0, tmp_path, block=7)
    assert not list(tmp_path.iterdir())
    assert float(x.sum()) == 1000 * sum(range(64)) and len(y) == 500 and (y == 3).all()
    assert sp.nonzero(10, lambda s, e: np.arange(s, e) >= 7, tmp_path, block=3).tolist() == [7, 8, 9]
    used = shutil.disk_usage(tmp_path).used
    big = sp.full(tmp_path, 64 << 20, 1, np.uint8)  # 64 MB written
    assert int(big[-1]) == 1 and shutil.disk_usage(tmp_path).used >= used + (32 << 20)
    del big
    gc.collect()
    assert shutil.disk_usage(tmp_path).used < used + (32 << 20)


def test_spilled_order_statistics_equal_numpy() -> None:
    from otcclip.models import spill as sp
    from otcclip.models.decisions import _rank_sum

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        for n in (1, 2, 1001, 1002):
            x = np.round(rng.standard_normal(n), 2).astype(np.float32)
            med = sp.median(x, d)
            assert med == np.median(x) and med.dtype == np.median(x).dtype
            assert sp.median_abs_dev(x, med, d, block=100) == np.median(np.abs(x - med))
            assert sp.median_abs_dev(x, float(med), d) == np.median(np.abs(x - float(med)))
        v = np.array([1.0, np.nan, 0.0, np.nan, 1.0])
        assert _rank_sum(v, 2, spill=d) == _rank_sum(v, 2) == 2.5 + 4.5  # ties share ranks, NaNs last


def test_caption_groups_from_the_spilled_sort_equal_the_in_memory_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from otcclip.models import detectors

    monkeypatch.setattr(detectors, "ROW_BLOCK", 5)  # groups across row blocks
    h = np.random.default_rng(2).integers(0, 30, 400).astype(np.int64)
    with tempfile.TemporaryDirectory() as d:
        got = [g.tolist() for g in detectors._hash_groups(h, 12, d)]
    assert got == [g.tolist() for g in detectors._hash_groups(h, 12, None)] and len(got) > 5


def test_narrow_keeps_the_own_and_the_best_column() -> None:
    sc = _score_shards(200, 200, 8, 16)[0].scores
    nw = sc.narrow()
    assert nw.candidates.shape == (200, 2) and nw.fused.shape == (200, 2)
    fused = np.where(sc.candidates >= 0, sc.fused, -np.inf)
    best = np.argmax(np.where(np.isfinite(fused), fused, -np.inf), axis=1)
    rows = np.arange(200)
    np.testing.assert_array_equal(nw.candidates[:, 0], sc.candidates[:, 0])
    np.testing.assert_array_equal(nw.candidates[:, 1], sc.candidates[rows, best])
    np.testing.assert_array_equal(nw.ot[:, 1], sc.ot[rows, best])
    assert (best != 0).any() and (best == 0).any()


def test_model_quality_control_does_not_depend_on_its_block_size() -> None:
    from otcclip.models.decisions import assess_model

    m = MatchScores.concat([s.scores for s in _score_shards(300, 300, 4, 16)])
    whole = assess_model(m, block=10**6)
    assert assess_model(m, block=7) == whole and whole["control_auc"] > 0.5


def test_rank_sum_matches_ranks_with_averaged_ties() -> None:
    from scipy.stats import rankdata

    from otcclip.models.decisions import _rank_sum

    rng = np.random.default_rng(0)
    v = np.round(rng.standard_normal(500), 1)  # many ties
    assert _rank_sum(v, 200) == rankdata(v)[:200].sum()
    assert _rank_sum(np.arange(10.0), 3) == 6.0
