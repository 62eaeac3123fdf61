"""Reading the layouts data engineers have: img2dataset folders, HF Parquet with image bytes,
any manifest through a column mapping; and writing them back in their own columns."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otcclip.models.manifest import ColumnMapping, ManifestError, read_manifest
from otcclip.models.manifest_writer import write_manifest
from tests.models.layouts import caption, failed, hf_parquet, img2dataset, jpg, mapped_csv

N = 24
OK = [i for i in range(N) if not failed(i)]


def _decodes(m, row: int) -> bool:
    return m.images.open(m.image_paths[row]).size == (16, 16)


@pytest.mark.parametrize("fmt", ["files", "parquet", "webdataset"])
def test_img2dataset_folder(tmp_path: Path, fmt: str) -> None:
    root = img2dataset(tmp_path / "out", N, fmt=fmt)
    m = read_manifest(root)
    assert len(m) == len(OK)  # failed downloads skipped
    assert sorted(m.captions) == sorted(caption(i) for i in OK)
    assert all(_decodes(m, r) for r in range(len(m)))
    if fmt != "webdataset":
        assert m.format == "parquet" and m.source_names["id"] == "key"
        assert set(m.table.column("status").to_pylist()) == {"success"}
        first = m.ids.index("000000000")
        assert m.images.read_bytes(m.image_paths[first]) == jpg(0)


def test_img2dataset_written_back_in_its_columns(tmp_path: Path) -> None:
    m = read_manifest(img2dataset(tmp_path / "in", N, fmt="parquet"))
    out = write_manifest(m, m.table.slice(0, 5), tmp_path / "cleaned.parquet")
    t = pq.read_table(out)
    assert "key" in t.column_names and "id" not in t.column_names
    assert t.schema.field("jpg").type == pa.binary() and "image" not in t.column_names
    assert t.column("jpg").to_pylist() == [m.images.read_bytes(r) for r in m.image_paths[:5]]
    back = read_manifest(out)
    assert back.ids == m.ids[:5] and back.captions == m.captions[:5]


def test_hf_parquet_with_image_bytes(tmp_path: Path) -> None:
    path = hf_parquet(tmp_path / "hf" / "train.parquet", N)
    m = read_manifest(path)
    assert m.captions == [caption(i) for i in range(N)] and m.source_names == {"caption": "text"}
    assert all(_decodes(m, r) for r in range(N))
    assert m.images.read_bytes(m.image_paths[7]) == jpg(7)
    out = write_manifest(m, m.table.take([3, 1]), tmp_path / "o" / "cleaned.parquet")
    t = pq.read_table(out)
    assert pa.types.is_struct(t.schema.field("image").type) and "text" in t.column_names
    assert [v["bytes"] for v in t.column("image").to_pylist()] == [jpg(3), jpg(1)]
    assert [v["path"] for v in t.column("image").to_pylist()] == ["00003.jpg", "00001.jpg"]
    assert read_manifest(out).captions == [caption(3), caption(1)]
    # a 'caption' column is used as is
    m2 = read_manifest(hf_parquet(tmp_path / "hf2.parquet", 4, column="caption"))
    assert m2.captions == [caption(i) for i in range(4)] and m2.source_names == {}


def test_column_mapping_round_trip(tmp_path: Path) -> None:
    path = mapped_csv(tmp_path / "d", N)
    with pytest.raises(ManifestError, match="missing required column"):
        read_manifest(path)
    cmap = ColumnMapping(image="filepath", caption="alt", id="uid")
    m = read_manifest(path, mapping=cmap)
    assert m.ids[:2] == ["u0", "u1"] and m.captions[2] == caption(2) and _decodes(m, 0)
    out = write_manifest(m, m.table, tmp_path / "d" / "clean.csv")
    with out.open(newline="") as f:
        header = next(csv.reader(f))
    assert set(header) == {"uid", "filepath", "alt", "source"}
    assert read_manifest(out, mapping={"image": "filepath", "caption": "alt", "id": "uid"}).captions == m.captions


def test_mapping_errors(tmp_path: Path) -> None:
    path = mapped_csv(tmp_path, 3)
    with pytest.raises(ManifestError, match=r"--caption-col 'nope': no such column \(found: 'uid'"):
        read_manifest(path, mapping={"caption": "nope", "image": "filepath"})
    both = tmp_path / "both.csv"
    both.write_text("image,filepath,caption\npics/000.jpg,pics/001.jpg,x\n")
    with pytest.raises(ManifestError, match="already has a column 'image'"):
        read_manifest(both, mapping={"image": "filepath"})
    with pytest.raises(ManifestError, match="unknown key column"):
        read_manifest(path, mapping={"label": "x"})


def test_empty_captions_name_the_row(tmp_path: Path) -> None:
    path = mapped_csv(tmp_path, 4)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace(caption(2), "  ")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as ei:
        read_manifest(path, mapping={"image": "filepath", "caption": "alt", "id": "uid"})
    assert ei.value.row == 4 and "empty caption" in ei.value.reason
    pq_path = hf_parquet(tmp_path / "hf.parquet", 4)
    t = pq.read_table(pq_path)
    t = t.set_column(1, "text", pa.array([caption(0), None, caption(2), caption(3)]))
    pq.write_table(t, pq_path)
    with pytest.raises(ManifestError) as ei:
        read_manifest(pq_path)
    assert ei.value.row == 2 and "empty caption" in str(ei.value)


def test_parquet_folder_errors_name_the_file(tmp_path: Path) -> None:
    root = img2dataset(tmp_path / "o", 10, fmt="files")
    (root / "00001" / "000010007.jpg").unlink()
    with pytest.raises(ManifestError) as ei:
        read_manifest(root)
    assert ei.value.file.endswith("00001.parquet") and ei.value.row == 3


def test_webdataset_keeps_shards_members_and_both_captions(tmp_path: Path) -> None:
    import json
    import tarfile

    root = img2dataset(tmp_path / "wds", 12, fmt="webdataset")
    m = read_manifest(root)
    t = m.table
    caps = m.captions
    caps[0] = "a brand new caption"
    t = t.set_column(t.column_names.index("caption"), "caption", pa.array(caps))
    t = t.append_column("otcclip_action", pa.array(["reassign"] + ["keep"] * (len(m) - 1)))
    t = t.filter(pa.array([i != 1 for i in range(len(m))]))
    out = write_manifest(m, t, tmp_path / "cleaned")
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar"]

    def members(p: Path) -> dict[str, bytes]:
        with tarfile.open(p) as tf:
            return {i.name: tf.extractfile(i).read() for i in tf.getmembers()}  # type: ignore[union-attr]

    before = {n for s in ("00000.tar", "00001.tar") for n in members(root / s)}
    after = {n: b for s in ("00000.tar", "00001.tar") for n, b in members(out / s).items()}
    key0, key1 = m.ids[0], m.ids[1]
    assert set(after) == before - {f"{key1}.jpg", f"{key1}.txt", f"{key1}.json"}
    assert after[f"{key0}.txt"].decode() == "a brand new caption"
    meta = json.loads(after[f"{key0}.json"])
    assert meta["caption"] == "a brand new caption" and meta["otcclip_action"] == "reassign" and meta["url"]
    assert after[f"{key0}.jpg"] == m.images.read_bytes(m.image_paths[0])
    assert all((out / s).stat().st_mode & 0o777 == 0o644 for s in ("00000.tar", "00001.tar"))
    assert read_manifest(out).captions[0] == "a brand new caption"


def test_parquet_folder_with_differing_shard_schemas(tmp_path: Path) -> None:
    root = img2dataset(tmp_path / "o", 14, fmt="parquet")
    t = pq.read_table(root / "00001.parquet")  # error_message all null there: typed null
    pq.write_table(t.set_column(t.column_names.index("error_message"), "error_message", pa.nulls(t.num_rows)),
                   root / "00001.parquet")
    assert pa.types.is_null(pq.read_schema(root / "00001.parquet").field("error_message").type)
    m = read_manifest(root)
    assert len(m) == sum(not failed(i) for i in range(14)) and m.table.schema.field("error_message").type == pa.string()
