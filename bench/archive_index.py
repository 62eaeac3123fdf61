"""Opening a huge image archive with and without its stored member index.

Builds a zip of ``--members`` tiny PNGs (200,000 by default, the issue's case) and a CSV
manifest naming every one, then measures, each ``--repeats`` times with the process's
index cache cleared before every open (as in a fresh API process or a worker child):

* ``store open``: :class:`~otcclip.models.stores.ZipImageStore` on the zip;
* ``worker open``: what a task does first, ``read_manifest`` of the manifest with the zip;
* ``first GET rows``: ``GET /v1/datasets/{id}/rows`` of the uploaded dataset on the
  embedded service (in this process, no worker), its preview cache cleared too;
* ``next GET rows``: the same request again (the API keeps the manifest table of the
  datasets it previewed last).

"parse" is without the index file (``<archive>.index`` removed), "index" with the file the
upload stored. Prints the median seconds of each. Everything runs on loopback in a
temporary folder; a run takes about a minute at 200,000 members.

Usage::

    .venv/bin/python bench/archive_index.py                      # 200,000 members, 3 repeats
    .venv/bin/python bench/archive_index.py --members 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx


def build(root: Path, members: int) -> tuple[Path, Path]:
    """``images.zip`` (stored 4x4 PNGs, one colour each) and ``m.csv`` naming them."""
    from PIL import Image

    zpath, mpath = root / "images.zip", root / "m.csv"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf, open(mpath, "w") as m:
        m.write("image,caption\n")
        for i in range(members):
            png = io.BytesIO()
            Image.new("RGB", (4, 4), (i % 256, (i >> 8) % 256, (i >> 16) % 256)).save(png, "PNG")
            zf.writestr(f"img/{i:07d}.png", png.getvalue())
            m.write(f"img/{i:07d}.png,a square of colour {i}\n")
    return zpath, mpath


def timed(fn: Callable[[], object], *, repeats: int, before: Callable[[], None]) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, ``before()`` run (untimed) ahead of each."""
    times = []
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from otcclip.cli.embedded import run_service
    from otcclip.models import stores
    from otcclip.models.manifest import read_manifest
    from otcclip.models.stores import ZipImageStore, clear_index_cache, index_path
    from otcclip.service.api.routes.datasets import clear_preview_cache
    from otcclip.service.core.config import Settings

    with tempfile.TemporaryDirectory(prefix="otcclip-index-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        zpath, mpath = build(root, args.members)
        print(f"built {zpath.name}: {args.members} members, {zpath.stat().st_size / 1e6:.1f} MB "
              f"in {time.perf_counter() - t0:.1f}s")

        settings = Settings(data_dir=root / "data", max_upload_bytes=1 << 30)
        with run_service(settings, worker=False) as svc:
            key = svc.create_key("bench")
            http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
            t0 = time.perf_counter()
            with open(mpath, "rb") as m, open(zpath, "rb") as z:
                r = http.post("/v1/datasets", files={"manifest": ("m.csv", m), "images": ("images.zip", z)})
            r.raise_for_status()
            ds = r.json()["id"]
            print(f"upload (validation + index stored): {time.perf_counter() - t0:.1f}s")
            stored = settings.storage_root / "datasets" / ds
            side = index_path(stored / "images.zip")
            kept = side.read_bytes()
            print(f"index file: {side.stat().st_size / 1e6:.1f} MB")

            def rows() -> None:
                http.get(f"/v1/datasets/{ds}/rows", params={"limit": 10}).raise_for_status()

            def worker_open() -> None:
                read_manifest(stored / "manifest.csv", images=stored / "images.zip").images.close()

            def store_open() -> None:
                ZipImageStore(stored / "images.zip").close()

            def without_index() -> None:
                side.unlink(missing_ok=True)
                clear_index_cache()
                clear_preview_cache()

            def with_index() -> None:
                if not side.exists():
                    side.write_bytes(kept)
                clear_index_cache()
                clear_preview_cache()

            # parse first: a store that parses with a stale or missing index never writes one
            # (only an existing, stale file is rewritten), so each "parse" run really parses
            results = {}
            for name, fn in (("store open", store_open), ("worker open", worker_open), ("first GET rows", rows)):
                parsed0 = stores.INDEX_COUNTS["parsed"]
                parse = timed(fn, repeats=args.repeats, before=without_index)
                assert stores.INDEX_COUNTS["parsed"] - parsed0 == args.repeats
                loaded0 = stores.INDEX_COUNTS["loaded"]
                index = timed(fn, repeats=args.repeats, before=with_index)
                assert stores.INDEX_COUNTS["loaded"] - loaded0 == args.repeats
                results[name] = (parse, index)
            rows()  # the manifest table is now kept for the preview: the next pages
            results["next GET rows"] = (float("nan"), timed(rows, repeats=args.repeats, before=lambda: None))

    print(f"\n{args.members} members, median of {args.repeats}, index cache cleared before each open")
    print(f"| {'what':<16} | {'parse (s)':>9} | {'index (s)':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 18}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for name, (parse, index) in results.items():
        if parse != parse:  # nan: not a before/after pair
            print(f"| {name:<16} | {'':>9} | {index:9.3f} | {'':>8} |")
        else:
            print(f"| {name:<16} | {parse:9.3f} | {index:9.3f} | {parse / index:7.1f}x |")


if __name__ == "__main__":
    main()
