"""``GET /v1/jobs/{id}/report`` in a real browser (offline) with the owner's API key:
the report app renders, names the model, filters by a reason and shows thumbnails."""

from __future__ import annotations

import pytest

from tests.browser import offline_page
from tests.service.conftest import SANITIZE, Api


@pytest.mark.slow
def test_job_report_opens_in_a_browser_with_the_api_key(embedded, tiny_dataset) -> None:
    api = Api(embedded.url, embedded.create_key("browser"))
    ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
    job = api.wait(api.job("sanitize", ds, SANITIZE).json()["id"])
    assert job["state"] == "succeeded", job
    url = f"{embedded.url}/v1/jobs/{job['id']}/report"
    with offline_page() as (page, _):  # without the key: the API's 401, no report
        assert page.goto(url).status == 401
    with offline_page(headers={"Authorization": f"Bearer {api.key}"}) as (page, blocked):
        assert page.goto(url).status == 200
        assert "otc-micro" in page.inner_text("#run") and "small.csv" in page.inner_text("body")
        page.wait_for_selector("#review-body tr")
        reasons = [v for v in page.eval_on_selector_all("#f-reason option", "els => els.map(e => e.value)") if v]
        assert reasons
        page.select_option("#f-reason", reasons[0])
        rows = page.locator("#review-body tr")
        assert rows.count() >= 1 and all(reasons[0] in rows.nth(i).inner_text() for i in range(rows.count()))
        page.select_option("#f-reason", "")
        widths = page.eval_on_selector_all("#review-body img.thumb", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
        assert not blocked, blocked
