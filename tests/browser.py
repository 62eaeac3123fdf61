"""A headless Chromium for the browser tests (Debian's ``chromium``, else Playwright's own),
with every request off the loopback aborted: pages must work without internet."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str | None:
    """Debian's chromium if installed (None: use Playwright's bundled browser if present)."""
    env = os.environ.get("OTCCLIP_CHROMIUM")
    if env:
        return env
    return next((p for p in CANDIDATES if os.path.exists(p)), None) or shutil.which("chromium")


@contextmanager
def offline_page(*, headers: dict[str, str] | None = None) -> Iterator[tuple[Any, list[str]]]:
    """``(page, blocked)``: a Playwright page where non-local requests fail and are listed in
    ``blocked``; ``headers`` go with every request (e.g. an API key's ``Authorization``)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        path = chromium_path()
        try:
            browser = pw.chromium.launch(executable_path=path, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
        except Exception as e:  # no browser on this machine
            pytest.skip(f"no Chromium to run browser tests ({e.__class__.__name__}: {str(e)[:200]})")
        blocked: list[str] = []

        def route(r: Any) -> None:
            url = r.request.url
            if url.startswith(("http://127.0.0.1", "http://localhost", "file://", "data:", "blob:")):
                r.continue_()
            else:
                blocked.append(url)
                r.abort()

        try:
            page = browser.new_page(extra_http_headers=headers)
            page.route("**/*", route)
            yield page, blocked
        finally:
            browser.close()
