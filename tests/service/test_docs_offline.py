"""``/docs`` renders without internet: Swagger UI's assets come from the installed package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from otcclip.service.core.config import Settings
from tests.browser import offline_page


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from otcclip.cli.embedded import run_service

    root = tmp_path_factory.mktemp("docs")
    with run_service(Settings(data_dir=root / "data"), worker=False) as svc:
        yield svc.url


def test_docs_page_references_only_local_assets(api_url: str) -> None:
    page = httpx.get(f"{api_url}/docs").text
    assert "/docs-static/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    js = httpx.get(f"{api_url}/docs-static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert httpx.get(f"{api_url}/docs-static/swagger-ui.css").status_code == 200
    doc = httpx.get(f"{api_url}/docs/openapi.json").json()
    assert doc["openapi"] == "3.0.3" and '{"type": "null"}' not in str(doc).replace("'", '"')
    assert doc["paths"].keys() == httpx.get(f"{api_url}/openapi.json").json()["paths"].keys()


def test_docs_render_offline_in_a_browser(api_url: str, tmp_path: Path) -> None:
    with offline_page() as (page, blocked):
        page.goto(f"{api_url}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert any("/v1/datasets" in p for p in paths) and any("/v1/jobs" in p for p in paths)
        assert page.locator(".opblock").count() >= 10
        assert "Unable to render" not in page.inner_text("#swagger-ui")
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=False)
        assert (tmp_path / "docs.png").stat().st_size > 5_000
        assert not [u for u in blocked if "swagger" in u or u.endswith((".js", ".css"))], blocked
