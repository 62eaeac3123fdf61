"""The ``duplicates`` check: repeated images (exact and near duplicates) grouped, each group's
action applied, the same decisions in any row order, the groups in decisions and reports."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otcclip.models.config import OTSettings
from otcclip.models.config.detectors import DecisionSettings, DuplicatesSettings
from otcclip.models.detectors import duplicate_groups
from otcclip.models.manifest import read_manifest
from otcclip.models.sanitize import SanitizeConfig, sanitize
from otcclip.models.scores import MatchScores

CLASSES = ("cat", "dog", "ship")
N_DISTINCT = 60
BURST = 20


def _image(i: int) -> Image.Image:
    """A distinct smooth 32 px image (a 4 x 4 grid of random colours, upscaled)."""
    rng = np.random.default_rng(2000 + i)
    return Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BILINEAR)


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _dataset(root: Path, *, order: list[int] | None = None, copies: bool = True) -> tuple[Path, dict[str, str]]:
    """``N_DISTINCT`` distinct pairs; with ``copies`` also ``BURST`` byte-identical copies of
    image 0 all captioned "a photo of a truck" and three near copies of image 1 (JPEG
    quality 60, resized to 40 and to 24 px) under image 1's caption.

    Returns the manifest and ``{id: family}`` (the id of the original each row copies)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows, family = [], {}
    for i in range(N_DISTINCT):
        (root / "img" / f"{i:03d}.jpg").write_bytes(_jpeg(_image(i)))
        rows.append((f"p{i}", f"img/{i:03d}.jpg", f"a photo of a {CLASSES[i % 3]} seen from angle {i}"))
        family[f"p{i}"] = f"p{i}"
    if copies:
        blob = (root / "img" / "000.jpg").read_bytes()
        for k in range(BURST):
            (root / "img" / f"burst{k:02d}.jpg").write_bytes(blob)
            rows.append((f"burst{k}", f"img/burst{k:02d}.jpg", "a photo of a truck"))
            family[f"burst{k}"] = "p0"
        one = Image.open(root / "img" / "001.jpg").convert("RGB")
        near = {"q60": _jpeg(one, 60), "r40": _jpeg(one.resize((40, 40), Image.BICUBIC), 90),
                "r24": _jpeg(one.resize((24, 24), Image.BICUBIC), 90)}
        for name, data in near.items():
            (root / "img" / f"near-{name}.jpg").write_bytes(data)
            rows.append((f"near-{name}", f"img/near-{name}.jpg", rows[1][2]))
            family[f"near-{name}"] = "p1"
    out = root / "m.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "caption"])
        for r in order if order is not None else range(len(rows)):
            w.writerow(rows[r])
    return out, family


def _cfg(action: str = "keep_one", min_size: int = 2, **kw: object) -> SanitizeConfig:
    dup = DuplicatesSettings(action=action, min_size=min_size)
    return SanitizeConfig(k=4, batch_size=16, shard_size=40, device="cpu", ot=OTSettings(iters=20),
                          decisions=DecisionSettings(detectors=("duplicates",), min_quality_pairs=20,
                                                     duplicates=dup, **kw))  # type: ignore[arg-type]


def _by_id(man, d) -> dict[str, tuple[str, str, int]]:  # type: ignore[no-untyped-def]
    return {man.ids[r]: (str(d.action[r]), str(d.reason[r]), int(d.dup_group[r])) for r in range(len(man))}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return _dataset(tmp_path_factory.mktemp("dups"))


def test_exact_and_near_copies_are_grouped_and_distinct_images_are_not(data, tiny_bundle) -> None:
    path, family = data
    man = read_manifest(path)
    d = sanitize(man, tiny_bundle, config=_cfg("keep_all", abstain=False)).decisions
    groups: dict[int, set[str]] = {}
    for r, g in enumerate(d.dup_group.tolist()):
        if g >= 0:
            groups.setdefault(g, set()).add(man.ids[r])
    want = {frozenset(k for k, f in family.items() if f == fam) for fam in ("p0", "p1")}
    assert {frozenset(v) for v in groups.values()} == want
    assert sorted(groups) == [0, 1]
    # keep_all only reports
    assert (d.action == "keep").all() and "duplicate" not in set(d.reason)
    flagged = {man.ids[r] for r in range(len(man)) if "duplicates" in str(d.detectors[r])}
    assert flagged == set().union(*groups.values())
    # a clean set of distinct images has no group
    clean, _ = _dataset(path.parent / "clean", copies=False)
    d0 = sanitize(read_manifest(clean), tiny_bundle, config=_cfg(abstain=False)).decisions
    assert (d0.dup_group == -1).all() and "duplicate" not in set(d0.reason)


@pytest.mark.parametrize("action", ["keep_one", "drop_all"])
def test_each_action_does_what_it_says(data, tiny_bundle, action: str) -> None:
    path, family = data
    man = read_manifest(path)
    d = sanitize(man, tiny_bundle, config=_cfg(action, abstain=False)).decisions
    for fam in ("p0", "p1"):
        rows = [r for r in range(len(man)) if family[man.ids[r]] == fam]
        kept = [r for r in rows if d.action[r] != "drop"]
        assert len(kept) == (1 if action == "keep_one" else 0), (fam, [d.reason[r] for r in rows])
        assert {str(d.reason[r]) for r in rows if d.action[r] == "drop"} == {"duplicate"}
        assert len({int(d.dup_group[r]) for r in rows}) == 1
    if action == "keep_one":
        # the kept member is the one whose caption agrees best with the image (units of equal content)
        rows = [r for r in range(len(man)) if family[man.ids[r]] == "p0"]
        kept = next(r for r in rows if d.action[r] != "drop")
        truck = np.mean([d.fused_score[r] for r in rows if man.captions[r] == "a photo of a truck"])
        own = float(d.fused_score[rows[0]])
        assert (man.captions[kept] == "a photo of a truck") == (round(float(truck), 4) > round(own, 4))
    others = [r for r in range(len(man)) if family[man.ids[r]] not in ("p0", "p1")]
    assert all(d.action[r] != "drop" for r in others) and (d.dup_group[others] == -1).all()


def test_groups_below_min_size_are_reported_and_kept_whole(data, tiny_bundle) -> None:
    path, family = data
    man = read_manifest(path)
    rows = {fam: [r for r in range(len(man)) if family[man.ids[r]] == fam] for fam in ("p0", "p1")}
    min_size = DuplicatesSettings().min_size
    assert len(rows["p1"]) < min_size <= len(rows["p0"])  # a burst of copies and a small group
    d = sanitize(man, tiny_bundle, config=_cfg("drop_all", min_size=min_size, abstain=False)).decisions
    assert all(d.action[r] == "drop" and d.reason[r] == "duplicate" for r in rows["p0"])
    assert all(d.action[r] != "drop" for r in rows["p1"])
    assert len({int(d.dup_group[r]) for r in rows["p1"]}) == 1 and int(d.dup_group[rows["p1"][0]]) >= 0
    # the small group is acted on once min_size reaches down to it
    d2 = sanitize(man, tiny_bundle, config=_cfg("drop_all", min_size=len(rows["p1"]), abstain=False)).decisions
    assert all(d2.action[r] == "drop" for r in rows["p1"])


def test_row_shuffle_gives_the_same_decisions(tmp_path: Path, data, tiny_bundle) -> None:
    path, _ = data
    n = N_DISTINCT + BURST + 3
    runs = []
    for name, order in (("a", list(range(n))), ("b", np.random.default_rng(3).permutation(n).tolist())):
        p, _ = _dataset(tmp_path / name, order=order)
        man = read_manifest(p)
        runs.append(_by_id(man, sanitize(man, tiny_bundle, config=_cfg(abstain=False)).decisions))
    assert runs[0] == runs[1]
    assert sum(1 for v in runs[0].values() if v[1] == "duplicate") == BURST + 3


def test_a_weak_model_drops_exact_copies_and_reviews_near_ones(data, tiny_bundle) -> None:
    path, family = data
    man = read_manifest(path)
    d = sanitize(man, tiny_bundle, config=_cfg()).decisions  # abstain on: a random model is judged weak
    assert d.model_quality["verdict"] == "weak"
    burst = [r for r in range(len(man)) if family[man.ids[r]] == "p0"]
    near = [r for r in range(len(man)) if family[man.ids[r]] == "p1"]
    assert sum(d.action[r] == "drop" for r in burst) == BURST  # exact copies: certain whatever the model
    kept = next(r for r in burst if d.action[r] != "drop")
    assert all(d.reason[r] == "duplicate" for r in burst if r != kept)
    # near copies rest on the weak model's embeddings: kept, marked for review
    assert all(d.action[r] == "keep" for r in near)
    assert sum(bool(d.review[r]) and "duplicate" in str(d.review_reason[r]) for r in near) == len(near) - 1


def test_groups_in_decisions_report_and_options(tmp_path: Path, data, tiny_bundle) -> None:
    from otcclip.cli import main
    from otcclip.models.checkpoint import save_checkpoint

    path, family = data
    ckpt = save_checkpoint(tiny_bundle, tmp_path / "ckpt", meta={})
    out = tmp_path / "out"
    assert main(["sanitize", str(path), "--checkpoint", str(ckpt), "--out", str(out), "--k", "4", "--batch-size", "16",
                 "--device", "cpu", "--no-progress", "--decisions.detectors", "duplicates",
                 "--decisions.duplicates.action", "drop_all", "--decisions.duplicates.min-size", "2",
                 "--no-decisions.abstain"]) == 0
    tab = pq.read_table(out / "decisions.parquet").to_pylist()
    assert all((r["dup_group"] is None) == (family[r["id"]] not in ("p0", "p1")) for r in tab)
    assert all(r["action"] == "drop" and r["reason"] == "duplicate" for r in tab if r["dup_group"] is not None)
    rep = json.loads((out / "report.json").read_text())
    dup = rep["duplicates"]
    assert dup["action"] == "drop_all" and dup["groups"] == 2 and dup["pairs"] == BURST + 1 + 4
    assert dup["dropped"] == dup["pairs"] and [g["size"] for g in dup["list"]] == [BURST + 1, 4]
    assert dup["list"][0]["captions"][0] == ["a photo of a truck", BURST] and dup["list"][0]["kept"] == []
    assert dup["list"][0]["outcome"] == {"drop/duplicate": BURST + 1}
    assert rep["settings"]["decisions"]["duplicates"]["action"] == "drop_all"
    page = (out / "report.html").read_text()
    assert "Duplicate groups" in page and page.count('class="dup-group"') == 2
    cleaned = read_manifest(out / "cleaned.csv", local=True)
    assert len(cleaned) == N_DISTINCT - 2
    # the API takes the same setting, by the same name, and refuses what the core refuses
    from otcclip.service.schemas import SettingsError, validate_settings

    ok = {"checkpoint": "abc", "decisions": {"duplicates": {"action": "keep_all", "near_threshold": 0.99}}}
    assert validate_settings("sanitize", ok) == ok
    for bad in ({"action": "keep_some"}, {"near_threshold": 1.5}, {"knn": 0}, {"min_size": 1}):
        with pytest.raises(SettingsError):
            validate_settings("sanitize", {"checkpoint": "abc", "decisions": {"duplicates": bad}})


def test_keep_one_keeps_the_best_member_that_the_trigger_template_search_leaves() -> None:
    """keep_one picks a group's kept member before the trigger-template search; when the
    search then drops that member (it carries the trigger), the group keeps its best other
    member (the one dropped only as its duplicate) instead of losing every member. A
    group whose kept member survives is left as it was."""
    from otcclip.models.decisions import MatchScores, decide_pairs
    from otcclip.models.triggers import apply_templates
    from tests.models.test_triggers import N, _patched

    x, truth, _ = _patched(seed=4)
    rng = np.random.default_rng(4)
    own = rng.normal(0.3, 0.02, N).astype(np.float32)
    drop = np.where(truth[:, None], 0.0, rng.normal(0.02, 0.01, (N, 2)))  # no trigger sensitivity
    # a third of the patched pairs (and some clean ones) look mismatched: they seed the search
    mismatched = np.zeros(N, dtype=bool)
    mismatched[rng.choice(np.flatnonzero(truth), 20, replace=False)] = True
    mismatched[rng.choice(np.flatnonzero(~truth), 30, replace=False)] = True
    alt = np.where(mismatched, own + rng.uniform(0.05, 0.1, N), own - 0.05)
    fused = np.stack([own, alt], axis=1).astype(np.float32)
    img = rng.standard_normal((N, 16)).astype(np.float32)
    # group A: a patched image (scores best, so keep_one keeps it) and two unpatched near copies;
    # group B: two clean near copies
    a, b1, b2 = int(np.flatnonzero(truth & ~mismatched)[0]), *np.flatnonzero(~truth & ~mismatched)[:2].tolist()
    c1, c2 = np.flatnonzero(~truth & ~mismatched)[2:4].tolist()
    img[[b1, b2]] = img[a]
    img[c2] = img[c1]
    fused[a, 0], fused[b1, 0], fused[b2, 0] = 0.5, 0.45, 0.4
    purified = fused[:, :1] - drop
    m = MatchScores(
        candidates=np.stack([np.arange(N), (np.arange(N) + 1) % N], axis=1).astype(np.int64),
        global_=fused, ot=fused, fused=fused, ok=np.ones(N, dtype=bool), image_global=img,
        caption_global=rng.standard_normal((N, 16)).astype(np.float32), caption_hash=np.arange(N, dtype=np.int64),
        purified_own=purified.astype(np.float32), image_hash=np.arange(1, N + 1, dtype=np.int64),
    )
    st = DecisionSettings(detectors=("trigger_sensitivity", "duplicates"), abstain=False,
                          duplicates=DuplicatesSettings(min_size=2))
    d = decide_pairs(m, settings=st)
    assert d.dup_group[a] == d.dup_group[b1] == d.dup_group[b2] >= 0 and d.dup_group[c1] == d.dup_group[c2] >= 0
    assert d.action[a] == "keep" and [d.reason[r] for r in (b1, b2)] == ["duplicate", "duplicate"]
    before_c = [(d.action[r], d.reason[r]) for r in (c1, c2)]
    out, found = apply_templates(d, lambda i: x[i], settings=st)
    assert [f.kind for f in found] == ["patch"]
    assert out.action[a] == "drop" and out.reason[a] == "trigger_template"
    # the best surviving member comes back in its state before the duplicates check; the other stays dropped
    assert (out.action[b1], out.reason[b1], int(out.new_caption_index[b1])) == ("keep", "own_best", b1)
    assert (out.action[b2], out.reason[b2]) == ("drop", "duplicate")
    assert [(out.action[r], out.reason[r]) for r in (c1, c2)] == before_c
    # without the fall-back every member of group A would have been dropped
    from dataclasses import replace

    bare, _ = apply_templates(replace(d, dup_fallback={}), lambda i: x[i], settings=st)
    assert all(bare.action[r] == "drop" for r in (a, b1, b2))


def _gate_scores(*, thumbs: bool) -> tuple[MatchScores, np.ndarray, np.ndarray]:
    """120 spread images; 12 distinct images of one plain subject that the embedding packs
    within cosine 0.999 of each other but whose content thumbnails differ (cosine ~0.9),
    and 12 copies of one image (embedding and thumbnail both within rounding).
    Returns scores, the distinct-subject mask and the copies mask."""
    rng = np.random.default_rng(7)
    d, t = 32, 64

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    n = 120
    image = unit(rng.normal(size=(n, d)))
    thumb = unit(rng.normal(size=(n, t)))
    subject, copies = np.arange(0, 12), np.arange(12, 24)
    image[subject] = unit(image[0] + 0.02 * rng.normal(size=(12, d)))
    thumb[subject] = unit(thumb[0] + 0.3 * unit(rng.normal(size=(12, t))))
    image[copies] = unit(image[12] + 0.01 * rng.normal(size=(12, d)))
    thumb[copies] = unit(thumb[12] + 0.02 * unit(rng.normal(size=(12, t))))
    m = MatchScores(
        candidates=np.arange(n)[:, None], global_=np.zeros((n, 1), np.float32), ot=np.zeros((n, 1), np.float32),
        fused=np.zeros((n, 1), np.float32), ok=np.ones(n, dtype=bool), image_global=image.astype(np.float32),
        caption_global=unit(rng.normal(size=(n, d))).astype(np.float32), caption_hash=np.arange(n, dtype=np.int64),
        image_hash=np.arange(1, n + 1, dtype=np.int64), image_thumb=thumb.astype(np.float16) if thumbs else None,
    )
    return m, np.isin(np.arange(n), subject), np.isin(np.arange(n), copies)


def test_near_duplicates_need_matching_content_thumbnails() -> None:
    """The embedding alone groups distinct images of one plain subject; their thumbnails
    keep them apart, while re-encoded copies (thumbnails within rounding) stay grouped."""
    m, subject, copies = _gate_scores(thumbs=True)
    t = np.asarray(m.image_thumb, dtype=np.float32)
    assert (t[subject] @ t[subject].T)[np.triu_indices(12, 1)].max() < DuplicatesSettings().near_thumbnail
    g = duplicate_groups(m, DuplicatesSettings())
    assert not g.member[subject].any()
    assert g.member[copies].all() and len(set(g.group[copies])) == 1
    # without thumbnails (features that carry none) the embedding decides, as before
    m_plain, _, _ = _gate_scores(thumbs=False)
    g_plain = duplicate_groups(m_plain, DuplicatesSettings())
    assert g_plain.member[subject].all() and g_plain.member[copies].all()
    # a gate at -1 lets every embedding near duplicate through
    g_open = duplicate_groups(m, DuplicatesSettings(near_thumbnail=-1.0))
    assert g_open.member[subject].all()
    # flat images (blank placeholders at different sizes: other pixel hashes) have zero
    # thumbnails, nothing to compare: two flat ones agree, a flat and a textured one do not
    rows = np.nonzero(copies)[0]
    flat = np.asarray(m.image_thumb).copy()
    flat[rows[:6]] = 0.0
    g_flat = duplicate_groups(replace(m, image_thumb=flat), DuplicatesSettings())
    assert g_flat.member[rows].all()
    assert len(set(g_flat.group[rows[:6]])) == 1 and len(set(g_flat.group[rows])) == 2
