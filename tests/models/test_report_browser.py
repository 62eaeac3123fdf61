"""report.html in a real browser (offline): filter by reason, rows and thumbnails appear,
paging, and the CSV export holds the selection."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from otcclip.models.config import OTSettings
from otcclip.models.manifest import read_manifest
from otcclip.models.report import review_rows, write_outputs
from otcclip.models.sanitize import SanitizeConfig, sanitize
from tests.browser import offline_page
from tests.models.test_sanitize import make_manifest

CFG = SanitizeConfig(k=4, batch_size=16, shard_size=80, device="cpu", ot=OTSettings(iters=20))


def test_report_app(tmp_path: Path, tiny_bundle) -> None:
    man = read_manifest(make_manifest(tmp_path / "data", n=72, broken=5))
    d = sanitize(man, tiny_bundle, config=CFG).decisions
    # a known set of reviewed pairs: 60 re-assigned (two pages), the unreadable one dropped
    for r in range(60):
        if d.reason[r] != "unreadable_image":
            d.action[r], d.reason[r], d.new_caption_index[r] = "reassign", "better_caption", (r + 1) % 72
    for r in range(60, 72):
        d.action[r], d.reason[r], d.detectors[r] = "keep", "own_best", ""
    # one pair kept for review whose unsure proposal was a re-assignment to caption 0
    d.review[62], d.review_reason[62], d.best_caption_index[62] = True, "reassign/low_own_score: weak model", 0
    d.dup_group[:] = -1
    d.dup_group[[61, 64, 67]] = 0  # one group of repeated images: one kept, two dropped as duplicates
    for r in (64, 67):
        d.action[r], d.reason[r] = "drop", "duplicate"
    files = write_outputs(man, d, tmp_path / "out", config=CFG, model_info={"name": "otc-micro"})
    rows = review_rows(man, d)
    assert len(rows) == 63 and [r["p_clean"] for r in rows if r["p_clean"] is not None] == \
        sorted(r["p_clean"] for r in rows if r["p_clean"] is not None)
    n_better = sum(r["reason"] == "better_caption" for r in rows)
    assert n_better == 59

    with offline_page() as (page, blocked):
        page.goto(files.report_html.as_uri())
        page.wait_for_selector("#review-body tr")
        assert page.locator("#review-body tr").count() == 50  # paged
        assert page.inner_text("#page-info") == "1-50 of 63"
        assert "better_caption" in page.inner_text("#legend")
        page.select_option("#f-reason", "unreadable_image")
        assert page.locator("#review-body tr").count() == 1
        assert page.inner_text("#review-body tr >> nth=0").startswith("-")  # no thumbnail: unreadable
        page.select_option("#f-reason", "better_caption")
        assert page.inner_text("#page-info") == f"1-50 of {n_better}"
        page.click("#next")
        assert page.locator("#review-body tr").count() == n_better - 50
        widths = page.eval_on_selector_all("#review-body img.thumb", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
        group = page.locator("#duplicate-groups tr.dup-group")
        assert group.count() == 1 and "drop/duplicate: 2" in group.inner_text() and man.ids[61] in group.inner_text()
        sizes = page.eval_on_selector_all("#duplicate-groups img.thumb", "els => els.map(e => e.naturalWidth)")
        assert len(sizes) == 3 and all(w > 0 for w in sizes)
        with page.expect_download() as dl:
            page.click("#export")
        text = Path(dl.value.path()).read_text()
        page.select_option("#f-reason", "")
        page.fill("#f-text", man.ids[62])
        assert page.locator("#review-body tr").count() == 1
        cell = page.inner_text("#review-body tr >> nth=0")
        assert "proposed, not applied" in cell and man.captions[0] in cell
        assert not blocked, blocked
    exported = list(csv.DictReader(io.StringIO(text)))
    assert len(exported) == n_better and {r["reason"] for r in exported} == {"better_caption"}
    assert exported[0]["id"] == next(r["id"] for r in rows if r["reason"] == "better_caption")
    rep = json.loads(files.report_json.read_text())
    assert rep["duplicates"]["groups"] == 1 and rep["duplicates"]["list"][0]["kept"] == [man.ids[61]]
    assert rep["counts"]["action"]["reassign"] == 59 and np.isfinite(rep["scores"]["p_clean"]["all"]["mean"])
