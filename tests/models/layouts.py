"""Builders of the input layouts data engineers have (img2dataset folders, HF Parquet, mapped CSV).

Written with pyarrow / csv directly, independent of the manifest reader and writer under test.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CLASSES = ("cat", "dog", "ship")


def jpg(i: int, size: int = 16) -> bytes:
    """A distinct random JPEG for index ``i``."""
    rng = np.random.default_rng(1000 + i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def caption(i: int) -> str:
    return f"a photo of a {CLASSES[i % 3]} number {i % 4}"


def failed(i: int) -> bool:
    """Rows whose (simulated) download failed."""
    return i % 7 == 3


def img2dataset(root: Path, n: int = 24, *, fmt: str = "files", shards: int = 2) -> Path:
    """An img2dataset output folder: ``{shard}.parquet`` plus ``{shard}/{key}.jpg`` (files),
    a ``jpg`` bytes column (parquet) or ``{shard}.tar`` (webdataset); failed rows have status
    ``failed_to_download`` and no image."""
    root.mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    for s in range(shards):
        shard = f"{s:05d}"
        rows = []
        tar = tarfile.open(root / f"{shard}.tar", "w") if fmt == "webdataset" else None
        for i in range(s * per, min(n, (s + 1) * per)):
            key = f"{s:05d}{i:04d}"
            ok = not failed(i)
            meta = {"key": key, "caption": caption(i), "url": f"http://example.com/{i}.jpg",
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "404"}
            row = dict(meta)
            if fmt == "parquet":
                row["jpg"] = jpg(i) if ok else None
            rows.append(row)
            if not ok:
                continue
            members = {f"{key}.jpg": jpg(i), f"{key}.txt": caption(i).encode(), f"{key}.json": json.dumps(meta).encode()}
            if fmt == "files":
                (root / shard).mkdir(exist_ok=True)
                for name, data in members.items():
                    (root / shard / name).write_bytes(data)
            elif tar is not None:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if tar is not None:
            tar.close()
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard}.parquet")
        (root / f"{shard}_stats.json").write_text("{}")
    return root


def hf_parquet(path: Path, n: int = 24, *, column: str = "text") -> Path:
    """A Hugging Face ``datasets`` Parquet export: ``image`` struct ``{bytes, path}`` and a text column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": jpg(i), "path": f"{i:05d}.jpg"} for i in range(n)], image_type),
        column: [caption(i) for i in range(n)],
        "label": [i % 3 for i in range(n)],
    })
    pq.write_table(table, path)
    return path


def mapped_csv(root: Path, n: int = 24) -> Path:
    """A CSV with the key columns under other names: ``uid``, ``filepath``, ``alt``."""
    (root / "pics").mkdir(parents=True, exist_ok=True)
    out = root / "pairs.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "filepath", "alt", "source"])
        for i in range(n):
            (root / "pics" / f"{i:03d}.jpg").write_bytes(jpg(i))
            w.writerow([f"u{i}", f"pics/{i:03d}.jpg", caption(i), f"s{i}"])
    return out
