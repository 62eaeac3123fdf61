"""The decision step abstains when unsure: a weak model's scores change nothing, a strong
model's clear re-assignments are kept, and doubtful proposals are marked for review."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from otcclip.models.decisions import (
    REVIEW,
    DecisionSettings,
    MatchScores,
    assess_model,
    decide_pairs,
)
from tests.models.test_decisions import _scores


def _weak(m: MatchScores, seed: int = 0) -> MatchScores:
    """The same shortlist scores, but image and caption embeddings that do not match
    (a model that does not tell a true pair from a random one)."""
    rng = np.random.default_rng(seed)
    n, d = m.image_global.shape
    return MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok,
                       rng.standard_normal((n, d)).astype(np.float32),
                       rng.standard_normal((n, d)).astype(np.float32), m.caption_hash)


def test_a_weak_model_reassigns_nothing_and_says_so() -> None:
    m, bad, _ = _scores(n=400, seed=2)
    d = decide_pairs(_weak(m), settings=DecisionSettings(detectors=()))
    q = d.model_quality
    assert q["verdict"] == "weak" and abs(q["control_auc"] - 0.5) < 0.1
    assert "weak" in q["message"] and q["message"].endswith(".") and ". " not in q["message"]
    assert (d.action == "keep").all()
    np.testing.assert_array_equal(d.new_caption_index, np.arange(len(m)))
    # what it would have changed is visible, with the proposal
    assert d.review[bad].all() and set(d.reason[bad]) == {REVIEW}
    assert all(str(r).startswith("reassign/") and "weak model" in str(r) for r in d.review_reason[bad])
    assert d.review[~bad].mean() < 0.05 and (d.review_reason[~d.review] == "").all()
    tab = d.to_arrow()
    assert {"review", "review_reason"} <= set(tab.column_names)


def test_a_strong_model_keeps_its_clear_reassignments() -> None:
    """Every wrong caption that fits its image no better than a typical random caption
    (the control's median) and has a new caption scoring like a typical true pair is
    re-assigned; the other wrong captions are marked for review; true pairs are kept."""
    from otcclip.models.decisions import _own_cosine

    m, bad, _ = _scores(n=400, seed=2)
    d = decide_pairs(m, settings=DecisionSettings(detectors=()))
    q = d.model_quality
    assert q["verdict"] == "ok" and q["control_auc"] > 0.8 and q["gmm_separation"] > 3
    clear = bad & (_own_cosine(m) <= q["shuffled_cosine"][0]) & (m.fused[:, 1] >= np.median(m.fused[:, 0]))
    assert clear.sum() >= 5 and (d.action[clear] == "reassign").all() and not d.review[clear].any()
    assert (d.action[bad & ~clear] == "keep").all() and d.review[bad & ~clear].all()
    assert (d.action[~bad] == "keep").all()


def test_a_margin_without_calibrated_evidence_is_marked_for_review() -> None:
    m, bad, _ = _scores(n=400, seed=8, poison=0.0)
    fused = m.fused.copy()
    rng = np.random.default_rng(8)
    odd = rng.choice(len(m), 12, replace=False)
    # own score ordinary for a matched pair, yet another caption scores far higher
    fused[odd, 0] = np.median(fused[:, 0])
    fused[odd, 1] = fused[odd, 0] + 0.3
    m2 = MatchScores(m.candidates, fused, fused, fused, m.ok, m.image_global, m.caption_global, m.caption_hash)
    d = decide_pairs(m2, settings=DecisionSettings(detectors=()))
    assert d.model_quality["verdict"] == "ok"
    assert (d.action == "keep").all() and d.review[odd].all()
    assert all(str(r).startswith("reassign/better_caption") for r in d.review_reason[odd])
    # without abstaining the engine acts on the margin alone, and judges nothing
    d2 = decide_pairs(m2, settings=DecisionSettings(detectors=(), abstain=False))
    assert (d2.action[odd] == "reassign").all() and not d2.review.any() and d2.model_quality == {}


def test_a_strong_model_changes_a_pair_only_when_its_caption_fits_like_a_random_one() -> None:
    """A strong model re-assigns a pair only when its own caption's cosine is no higher
    than the shuffled-caption control's median; a true pair the model merely scores low
    on the fused score (a hard image whose caption still fits better than a random one)
    is kept for review, however large the margin."""
    from otcclip.models.decisions import _own_cosine

    m, bad, _ = _scores(n=400, seed=2)
    rng = np.random.default_rng(2)
    fused = m.fused.copy()
    cos = _own_cosine(m)
    hard = rng.choice(np.flatnonzero(~bad & (cos >= np.median(cos[~bad]))), 8, replace=False)
    fused[hard, 0] = rng.normal(0.1, 0.03, len(hard))  # as low as a wrong caption's
    m2 = MatchScores(m.candidates, fused, fused, fused, m.ok, m.image_global, m.caption_global, m.caption_hash)
    d = decide_pairs(m2, settings=DecisionSettings(detectors=()))
    q = d.model_quality
    assert q["verdict"] == "ok" and q["shuffled_cosine"][0] < q["own_cosine"][0]
    assert (d.action[hard] == "keep").all() and d.review[hard].all()
    assert all(str(r).startswith("reassign/low_own_score: margin not calibrated") for r in d.review_reason[hard])
    assert (d.action[~bad] == "keep").all()
    # acting on every proposal, the scores alone would have re-assigned the hard images too
    d2 = decide_pairs(m2, settings=DecisionSettings(detectors=(), abstain=False))
    assert (d2.action[hard] == "reassign").all()


def test_an_untrusted_detector_flag_needs_the_calibrated_score_evidence_under_a_strong_model() -> None:
    """``density`` says a pair is unusual, not that its caption is wrong: under a strong
    model its flag on a pair whose scores are a true pair's changes nothing (the proposal
    is kept for review); a trusted detector (``weak_model_detectors``) acts on its own."""
    m, bad, _ = _scores(n=400, seed=3)
    rng = np.random.default_rng(3)
    img, cap = m.image_global.copy(), m.caption_global.copy()
    odd = rng.choice(np.flatnonzero(~bad), 10, replace=False)
    far = 4 * rng.standard_normal((len(odd), img.shape[1]))  # true pairs far from every other pair
    img[odd], cap[odd] = far, far + 0.1 * rng.standard_normal(far.shape)
    m2 = MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok, img.astype(np.float32), cap.astype(np.float32),
                     m.caption_hash)
    proposed = decide_pairs(m2, settings=DecisionSettings(detectors=("density",), abstain=False)).action != "keep"
    d = decide_pairs(m2, settings=DecisionSettings(detectors=("density",)))
    assert d.model_quality["verdict"] == "ok"
    assert all("density" in str(f) for f in d.detectors[odd]) and proposed[odd].any()
    assert (d.action[odd] == "keep").all() and d.review[odd].tolist() == proposed[odd].tolist()
    assert all(str(r).endswith("detector flag without calibrated score evidence") for r in d.review_reason[odd[proposed[odd]]])
    trusted = decide_pairs(m2, settings=DecisionSettings(detectors=("density",), weak_model_detectors=("density",)))
    assert (trusted.action[odd] != "keep").tolist() == proposed[odd].tolist()


def test_a_weak_model_drops_only_on_trusted_detectors() -> None:
    m, _, _ = _scores(n=200, seed=4, poison=0.0)
    img = m.image_global.copy()
    rng = np.random.default_rng(5)
    target = img[0] / np.linalg.norm(img[0])
    for r in range(1, 9):  # an image burst: 8 near-copies of image 0 under distinct captions
        img[r] = target + 1e-4 * rng.standard_normal(16)
    weak = _weak(m, seed=1)
    img_w = weak.image_global.copy()
    img_w[:9] = img[:9]
    m2 = MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok, img_w, weak.caption_global, m.caption_hash)
    d = decide_pairs(m2, settings=DecisionSettings(detectors=("image_burst", "density")))
    assert d.model_quality["verdict"] == "weak"
    assert (d.action[:9] == "drop").all() and set(d.reason[:9]) == {"image_burst"}
    # other detectors' flags and every score-based proposal are kept for review
    rest = np.arange(9, len(m))
    assert (d.action[rest] == "keep").all()
    d2 = decide_pairs(m2, settings=DecisionSettings(detectors=("image_burst", "density"), weak_model_detectors=()))
    assert (d2.action == "keep").all() and d2.review[:9].all()
    assert all("image_burst" in str(r) for r in d2.review_reason[:9])


def test_too_few_pairs_to_judge_count_as_weak() -> None:
    m, _, _ = _scores(n=30, seed=1)
    q = assess_model(m, settings=DecisionSettings())
    assert q["verdict"] == "weak" and "Too few" in q["message"]
    assert assess_model(m, settings=DecisionSettings(min_quality_pairs=20))["verdict"] == "ok"


def test_a_random_model_changes_nothing_score_based_and_the_report_says_why(tmp_path: Path, tiny_bundle) -> None:
    """End to end on a randomly initialised model: the verdict opens report.json and the
    HTML summary; decisions.parquet carries the review columns."""
    from otcclip.models.config import OTSettings
    from otcclip.models.manifest import read_manifest
    from otcclip.models.report import write_outputs
    from otcclip.models.sanitize import SanitizeConfig, sanitize
    from tests.models.test_sanitize import make_manifest

    man = read_manifest(make_manifest(tmp_path, n=60))
    cfg = SanitizeConfig(k=4, batch_size=16, device="cpu", ot=OTSettings(iters=20),
                         decisions=DecisionSettings(detectors=("density",), min_quality_pairs=20))
    d = sanitize(man, tiny_bundle, config=cfg).decisions
    assert d.model_quality["verdict"] == "weak"
    assert set(d.action[d.reason != "unreadable_image"]) == {"keep"}
    files = write_outputs(man, d, tmp_path / "out", config=cfg, model_info={"name": "otc-micro"})
    rep = json.loads(files.report_json.read_text())
    assert list(rep)[:2] == ["model_quality", "review"]
    assert rep["model_quality"]["verdict"] == "weak" and rep["review"]["pairs"] == int(d.review.sum())
    assert sum(rep["review"]["proposed"].values()) == rep["review"]["pairs"]
    tab = pq.read_table(files.decisions)
    assert tab.column("review").to_pylist() == d.review.tolist()
    assert rep["model_quality"]["message"] in files.report_html.read_text()


@pytest.mark.parametrize("layout", ["csv", "webdataset"])
def test_cli_cleaned_manifest_carries_the_review_columns(tmp_path: Path, tiny_bundle, layout: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``otcclip sanitize`` on a randomly initialised (weak) model: the cleaned manifest's
    ``otcclip_review`` / ``otcclip_review_reason`` are decisions.parquet's ``review`` /
    ``review_reason`` of the kept rows (CSV columns; WebDataset ``.json`` keys), and
    ``--no-provenance`` leaves them out."""
    import tarfile

    from otcclip.cli import main
    from otcclip.models.checkpoint import save_checkpoint
    from otcclip.models.manifest import read_manifest
    from tests.models.layouts import img2dataset
    from tests.models.test_sanitize import make_manifest

    src = make_manifest(tmp_path / "in", n=60) if layout == "csv" else img2dataset(tmp_path / "in", 60, fmt="webdataset")
    ckpt = save_checkpoint(tiny_bundle, tmp_path / "ckpt", meta={})
    common = ["--checkpoint", str(ckpt), "--k", "4", "--batch-size", "16", "--device", "cpu", "--no-progress",
              "--decisions.detectors", "density", "--decisions.min-quality-pairs", "20"]
    out = tmp_path / "out"
    assert main(["sanitize", str(src), "--out", str(out), *common]) == 0, capsys.readouterr().err
    dec = pq.read_table(out / "decisions.parquet").to_pylist()
    assert json.loads((out / "report.json").read_text())["model_quality"]["verdict"] == "weak"
    kept = [r for r in dec if r["action"] != "drop"]
    assert any(r["review"] for r in kept), "a random model proposes changes, all kept for review"
    if layout == "csv":
        cleaned = read_manifest(out / "cleaned.csv", local=True).table.to_pylist()
        got = [(str(r["id"]), str(r["otcclip_review"]).lower() == "true", r["otcclip_review_reason"] or "")
               for r in cleaned]
    else:
        got = []
        for shard in sorted((out / "cleaned").glob("*.tar")):
            with tarfile.open(shard) as tf:
                for info in tf.getmembers():
                    if info.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(info).read())  # type: ignore[union-attr]
                        got.append((info.name[: -len(".json")], meta["otcclip_review"], meta["otcclip_review_reason"]))
    want = [(str(r["id"]), bool(r["review"]), str(r["review_reason"])) for r in kept]
    assert sorted(got) == sorted(want)
    assert any(reason.startswith(("reassign/", "drop/")) for _, flag, reason in got if flag)

    bare = tmp_path / "bare"
    assert main(["sanitize", str(src), "--out", str(bare), "--no-provenance", *common]) == 0
    text = next(bare.glob("cleaned*"))
    blob = text.read_bytes() if text.is_file() else b"".join(p.read_bytes() for p in text.glob("*.tar"))
    assert b"otcclip_review" not in blob


def test_a_trusted_flag_drops_under_a_weak_model_whatever_else_flagged_the_pair() -> None:
    """Two copies of a burst's image also carry a caption repeated on a cluster of other
    images (``caption_burst`` flags them too): the image-burst evidence still drops them."""
    m, _, _ = _scores(n=200, seed=4, poison=0.0)
    rng = np.random.default_rng(5)
    weak = _weak(m, seed=1)
    img = weak.image_global.copy()
    target = img[0] / np.linalg.norm(img[0])
    for r in range(1, 9):  # an image burst: 8 near-copies of image 0 under distinct captions
        img[r] = target + 1e-4 * rng.standard_normal(16)
    u = rng.standard_normal(16)
    img[9:29] = u / np.linalg.norm(u) + 0.1 * rng.standard_normal((20, 16))
    hashes = m.caption_hash.copy()
    hashes[[1, 2, *range(9, 29)]] = 10_000  # one caption text on rows 1, 2 and the cluster
    m2 = MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok, img, weak.caption_global, hashes)
    d = decide_pairs(m2, settings=DecisionSettings(detectors=("image_burst", "caption_burst")))
    assert d.model_quality["verdict"] == "weak"
    assert all(set(str(d.detectors[r]).split(",")) == {"image_burst", "caption_burst"} for r in (1, 2))
    assert (d.action[:9] == "drop").all() and set(d.reason[:9]) == {"image_burst"}
    assert not d.review[:9].any()
