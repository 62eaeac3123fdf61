"""Manifests: every format round-trips, archives work, every bad input names file and row."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from otcclip.models.manifest import (
    Manifest,
    ManifestError,
    UnreadableImage,
    load_image_batch,
    read_manifest,
)
from otcclip.models.manifest_writer import write_dataset, write_manifest

ROWS: list[dict[str, Any]] = [
    {"id": "r0", "image": "images/a.png", "caption": "a red square, \"quoted\"", "label": "red", "source": "web", "score": 0.5},
    {"id": "r1", "image": "images/b.jpg", "caption": "a noisy\tpatch\nover two lines", "label": "noise", "source": "cam", "score": 1.25},
    {"id": "r2", "image": "images/sub/c.png", "caption": "ünïcödé blue", "label": "blue", "source": "", "score": None},
]
TEXT_FORMATS = ("csv", "tsv", "jsonl", "parquet")


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


IMAGES = {"images/a.png": _png((255, 0, 0)), "images/b.jpg": _jpeg(0), "images/sub/c.png": _png((0, 0, 255))}


def _images(root: Path) -> None:
    for rel, data in IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _write_raw(path: Path, fmt: str, rows: list[dict[str, Any]]) -> Path:
    """Write a manifest without the module under test (independent of write_manifest)."""
    if fmt in ("csv", "tsv"):
        names = list(rows[0])
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(names)
            for r in rows:
                w.writerow(["" if r.get(k) is None else r.get(k) for k in names])
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _dataset(tmp_path: Path, fmt: str, rows: list[dict[str, Any]] | None = None) -> Path:
    _images(tmp_path)
    return _write_raw(tmp_path / f"manifest.{fmt}", fmt, ROWS if rows is None else rows)


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
def test_read_and_round_trip(tmp_path: Path, fmt: str) -> None:
    m = read_manifest(_dataset(tmp_path, fmt))
    assert m.format == fmt and len(m) == 3 and len(m.sha256) == 64
    assert m.ids == ["r0", "r1", "r2"]
    assert m.captions == [r["caption"] for r in ROWS]
    assert m.image_paths == [r["image"] for r in ROWS]
    assert m.table.column_names[:4] == ["id", "image", "caption", "label"]
    assert {"source", "score"} <= set(m.table.column_names)
    for c in ("id", "image", "caption", "label"):
        assert m.table.schema.field(c).type == pa.string()
    if fmt in ("jsonl", "parquet"):  # original types kept
        assert m.column("score") == [0.5, 1.25, None]
    else:
        assert m.column("score") == ["0.5", "1.25", ""]
    out = write_manifest(m, m.table, tmp_path / f"copy.{fmt}")
    again = read_manifest(out)
    assert again.format == fmt
    assert again.table.equals(m.table)
    assert again.images.open(again.image_paths[2]).getpixel((0, 0)) == (0, 0, 255)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_keeps_extra_columns_after_edit(tmp_path: Path) -> None:
    m = read_manifest(_dataset(tmp_path, "jsonl"))
    new = m.table.set_column(m.table.column_names.index("caption"), "caption", pa.array(["x", "y", "z"]))
    new = new.append_column("note", pa.array([{"k": 1}, None, {"k": 2}]))
    again = read_manifest(write_manifest(m, new, tmp_path / "edited.jsonl"))
    assert again.captions == ["x", "y", "z"]
    assert again.column("source") == ["web", "cam", ""]
    assert again.column("note") == [{"k": 1}, None, {"k": 2}]


def test_generated_ids_and_label_columns(tmp_path: Path) -> None:
    rows = [{"image": r["image"], "label": r["label"]} for r in ROWS]
    m = read_manifest(_dataset(tmp_path, "csv", rows), columns=("image", "label"))
    assert m.ids == ["0", "1", "2"] and m.labels == ["red", "noise", "blue"]
    with pytest.raises(ManifestError, match="missing required column.*'caption'"):
        read_manifest(tmp_path / "manifest.csv")


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_images_inside_archive(tmp_path: Path, kind: str) -> None:
    _write_raw(tmp_path / "manifest.csv", "csv", ROWS)
    arch = tmp_path / f"images.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(arch, "w") as zf:
            for rel, data in IMAGES.items():
                zf.writestr(rel, data)
    else:
        with tarfile.open(arch, "w:gz" if kind == "tar.gz" else "w") as tf:
            for rel, data in IMAGES.items():
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    m = read_manifest(tmp_path / "manifest.csv", images=arch)
    assert m.images.open("images/a.png").getpixel((0, 0)) == (255, 0, 0)
    batch = load_image_batch(m, [2, 0], _to_tensor)
    assert batch.ok.tolist() == [True, True]
    # the archive lacks an image the manifest names
    _write_raw(tmp_path / "more.csv", "csv", [*ROWS, {**ROWS[0], "id": "r3", "image": "images/zz.png"}])
    with pytest.raises(ManifestError) as ei:
        read_manifest(tmp_path / "more.csv", images=arch)
    assert ei.value.row == 6 and "images/zz.png" in ei.value.reason and "not found" in ei.value.reason


def test_refused_archive_is_a_manifest_error(tmp_path: Path) -> None:
    _write_raw(tmp_path / "manifest.csv", "csv", ROWS)
    arch = tmp_path / "images.tar"
    with tarfile.open(arch, "w") as tf:
        info = tarfile.TarInfo("images/a.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ManifestError, match=r"images\.tar.*images/a\.png.*symlink"):
        read_manifest(tmp_path / "manifest.csv", images=arch)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, data in IMAGES.items():
            zf.writestr(rel, data)
        zf.writestr("images/huge.bmp", bytes(3 << 20))
    with pytest.raises(ManifestError, match=r"bomb\.zip.*images/huge\.bmp.*compression ratio"):
        read_manifest(tmp_path / "manifest.csv", images=bomb)


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _err(path: Path, **kw: Any) -> ManifestError:
    with pytest.raises(ManifestError) as ei:
        read_manifest(path, **kw)
    e = ei.value
    assert str(e).startswith(f"{path}:row {e.row}: " if e.row is not None else f"{path}: ")
    assert e.file == str(path)
    return e


def _bad(tmp_path: Path, fmt: str, i: int, **changes: Any) -> Path:
    rows = [dict(r) for r in ROWS]
    rows[i].update(changes)
    return _dataset(tmp_path, fmt, rows)


# Row 2 starts on line 5 of the CSV/TSV (header on line 1, row 1's caption spans lines 3-4),
# is line 3 of the JSONL and record 3 of the Parquet file.
ROW2 = {"csv": 5, "tsv": 5, "jsonl": 3, "parquet": 3}


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"caption": "   "}, "empty caption"),
        ({"image": "/etc/passwd"}, "absolute"),
        ({"image": "../outside.png"}, "escapes"),
        ({"image": "images/../../x.png"}, "escapes"),
        ({"image": "https://example.com/x.png"}, "URL"),
        ({"image": "images/nothere.png"}, "not found"),
        ({"id": "r0"}, "duplicate id 'r0'"),
        ({"id": ""}, "empty id"),
    ],
)
def test_bad_rows(tmp_path: Path, fmt: str, change: dict[str, Any], reason: str) -> None:
    e = _err(_bad(tmp_path, fmt, 2, **change))
    assert e.row == ROW2[fmt]
    assert reason in e.reason


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
@pytest.mark.parametrize("col", ["image", "caption"])
def test_missing_columns(tmp_path: Path, fmt: str, col: str) -> None:
    rows = [{k: v for k, v in r.items() if k != col} for r in ROWS]
    e = _err(_dataset(tmp_path, fmt, rows))
    assert e.row is None and f"missing required column(s) '{col}'" in e.reason


def test_symlink_escape_in_manifest(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(_png((0, 0, 0)))
    path = _dataset(root, "csv", [*ROWS[:2], {**ROWS[2], "image": "images/link.png"}])
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    e = _err(path)
    assert e.row == 5 and "outside the dataset directory" in e.reason


def test_unparsable_files(tmp_path: Path) -> None:
    _images(tmp_path)
    j = tmp_path / "bad.jsonl"
    j.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"image": "images/b.jpg", "caption": oops}\n')
    e = _err(j)
    assert e.row == 3 and "invalid JSON" in e.reason
    j.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    assert "JSON object" in _err(j).reason
    c = tmp_path / "bad.csv"
    c.write_text("id,image,caption\nr0,images/a.png,ok\nr1,images/b.jpg,too,many\n")
    e = _err(c)
    assert e.row == 3 and "4 fields" in e.reason
    c.write_bytes(b"id,image,caption\nr0,images/a.png,\xff\xfe bad\n")
    assert "UTF-8" in _err(c).reason
    c.write_text("")
    assert "empty file" in _err(c).reason
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 not really")
    assert "Parquet" in _err(p).reason
    x = tmp_path / "manifest.xlsx"
    x.write_text("x")
    assert "unknown manifest format" in _err(x).reason
    assert "not found" in _err(tmp_path / "nope.csv").reason


def test_truncated_image_is_not_a_manifest_error(tmp_path: Path) -> None:
    path = _dataset(tmp_path, "csv")
    (tmp_path / "images" / "b.jpg").write_bytes(IMAGES["images/b.jpg"][:200])
    m = read_manifest(path)  # existence only: validation passes
    with pytest.raises(UnreadableImage):
        m.images.open("images/b.jpg")
    batch = load_image_batch(m, [0, 1, 2], _to_tensor)
    assert batch.ok.tolist() == [True, False, True]
    assert batch.pixels[1].abs().sum() == 0 and batch.pixels[0].abs().sum() > 0


# ---------------------------------------------------------------- WebDataset


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _wds_samples(offset: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"s{offset + i:04d}", {"jpg" if i % 2 else "png": data, "txt": f"caption {offset + i}".encode(),
                                "cls": str(i).encode(), "json": json.dumps({"i": i}).encode()})
        for i, data in enumerate(IMAGES.values())
    ]


def test_webdataset_single_and_dir_round_trip(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "train-000.tar", _wds_samples())
    m = read_manifest(shard)
    assert m.format == "webdataset" and m.ids == ["s0000", "s0001", "s0002"]
    assert m.captions == ["caption 0", "caption 1", "caption 2"]
    assert m.labels == ["0", "1", "2"] and m.column("json")[1] == '{"i": 1}'
    assert m.image_paths[1] == "train-000.tar#s0001.jpg"
    assert m.images.open(m.image_paths[0]).getpixel((0, 0)) == (255, 0, 0)

    out = write_manifest(m, m.table, tmp_path / "out" / "clean.tar")
    again = read_manifest(out)
    assert again.table.drop_columns(["image"]).equals(m.table.drop_columns(["image"]))
    assert [again.images.read_bytes(r) for r in again.image_paths] == list(IMAGES.values())

    d = tmp_path / "shards"
    d.mkdir()
    _shard(d / "a.tar", _wds_samples())
    _shard(d / "b.tar", _wds_samples(offset=10))
    md = read_manifest(d, columns=("image", "label"))
    assert len(md) == 6 and md.image_paths[3] == "b.tar#s0010.png"
    new = md.table.set_column(2, "caption", pa.array([f"new {i}" for i in range(6)]))
    out_dir = write_manifest(md, new, tmp_path / "clean_shards")
    back = read_manifest(out_dir)
    assert back.captions == [f"new {i}" for i in range(6)] and back.ids == md.ids
    assert back.column("json") == md.column("json")


def test_webdataset_errors(tmp_path: Path) -> None:
    samples = _wds_samples()
    del samples[1][1]["txt"]
    e = _err(_shard(tmp_path / "a.tar", samples))
    assert e.row == 2 and "empty caption" in e.reason
    samples = _wds_samples()
    del samples[2][1]["png"]
    e = _err(_shard(tmp_path / "b.tar", samples))
    assert e.row == 3 and "no image member" in e.reason
    d = tmp_path / "dup"
    d.mkdir()
    _shard(d / "a.tar", _wds_samples())
    _shard(d / "b.tar", _wds_samples()[:1])
    e = _err(d)
    assert e.row == 4 and "duplicate id 's0000'" in e.reason
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .tar shards" in _err(empty).reason


# ---------------------------------------------------------------- materialising


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_write_dataset_with_new_images(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    m = read_manifest(_dataset(src, fmt))
    extra = {"id": ["p0"], "image": ["poison/p0.png"], "caption": ["a poisoned caption"], "label": ["red"],
             "source": ["attack"], "score": [None if fmt == "parquet" else ""]}
    table = pa.concat_tables([m.table, pa.table(extra, schema=m.table.schema)])
    path = write_dataset(m, table, tmp_path / "out", new_images={"poison/p0.png": _png((7, 7, 7))})
    back = read_manifest(path)
    assert back.ids == ["r0", "r1", "r2", "p0"] and back.format == fmt
    assert back.images.open("poison/p0.png").getpixel((0, 0)) == (7, 7, 7)
    assert (tmp_path / "out" / "images" / "sub" / "c.png").read_bytes() == IMAGES["images/sub/c.png"]


def test_write_dataset_webdataset(tmp_path: Path) -> None:
    m = read_manifest(_shard(tmp_path / "w.tar", _wds_samples()))
    table = m.table.set_column(1, "image", pa.array(["w.tar#s0000.png", "new/x.png", "w.tar#s0002.png"]))
    path = write_dataset(m, table, tmp_path / "out", new_images={"new/x.png": _png((3, 3, 3))})
    back = read_manifest(path)
    assert isinstance(back, Manifest) and back.images.open(back.image_paths[1]).getpixel((0, 0)) == (3, 3, 3)


def test_manifest_validation_speed_many_rows(tmp_path: Path) -> None:
    """20k rows sharing a few image files validate quickly (existence checks, no decoding)."""
    _images(tmp_path)
    path = tmp_path / "big.csv"
    refs = list(IMAGES)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "caption"])
        for i in range(20_000):
            w.writerow([f"x{i}", refs[i % 3], f"caption number {i}"])
    m = read_manifest(path)
    assert len(m) == 20_000 and m.ids[-1] == "x19999"


def test_write_webdataset_picks_up_new_images_beside_output(tmp_path: Path) -> None:
    m = read_manifest(_shard(tmp_path / "w.tar", _wds_samples()))
    out = tmp_path / "poisoned"
    (out / "poison").mkdir(parents=True)
    (out / "poison" / "p.png").write_bytes(_png((5, 6, 7)))
    table = m.table.set_column(1, "image", pa.array(["w.tar#s0000.png", "poison/p.png", "w.tar#s0002.png"]))
    back = read_manifest(write_manifest(m, table, out / "w.tar"))
    assert back.images.open(back.image_paths[1]).getpixel((0, 0)) == (5, 6, 7)
    bad = m.table.set_column(1, "image", pa.array(["w.tar#s0000.png", "../escape.png", "w.tar#s0002.png"]))
    with pytest.raises(ManifestError) as ei:
        write_manifest(m, bad, out / "bad.tar")
    assert ei.value.row == 2 and "escape" in ei.value.reason
    assert not (out / "bad.tar").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
