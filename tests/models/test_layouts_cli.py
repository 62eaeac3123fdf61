"""``otcclip sanitize`` end to end on the layouts data engineers have; the cleaned output of
each is read back by ``otcclip sanitize`` itself."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from otcclip.cli import main
from otcclip.models.checkpoint import save_checkpoint
from tests.models.layouts import failed, hf_parquet, img2dataset, mapped_csv

COMMON = ["--k", "4", "--batch-size", "8", "--device", "cpu", "--no-progress"]
N = 18
MAP = ["--image-col", "filepath", "--caption-col", "alt", "--id-col", "uid"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_bundle) -> Path:
    return save_checkpoint(tiny_bundle, tmp_path_factory.mktemp("ckpt") / "c", meta={})


@pytest.mark.parametrize("layout", ["img2dataset-files", "img2dataset-parquet", "hf-parquet", "mapped-csv"])
def test_layout_sanitizes_and_reads_back(tmp_path: Path, ckpt: Path, layout: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra: list[str] = []
    if layout.startswith("img2dataset"):
        src = img2dataset(tmp_path / "in", N, fmt=layout.split("-")[1])
        rows, cleaned = sum(not failed(i) for i in range(N)), "cleaned.parquet"
    elif layout == "hf-parquet":
        src, rows, cleaned = hf_parquet(tmp_path / "in" / "train.parquet", N), N, "cleaned.parquet"
    else:
        src, rows, cleaned, extra = mapped_csv(tmp_path / "in", N), N, "cleaned.csv", MAP
    out = tmp_path / "out"
    assert main(["sanitize", str(src), "--checkpoint", str(ckpt), "--out", str(out), *extra, *COMMON]) == 0, \
        capsys.readouterr().err
    assert pq.read_table(out / "decisions.parquet").num_rows == rows
    assert (out / cleaned).stat().st_mode & 0o777 == 0o644
    # read back from the output folder, by the CLI itself (no --images)
    out2 = tmp_path / "out2"
    assert main(["sanitize", str(out / cleaned), "--checkpoint", str(ckpt), "--out", str(out2), *extra, *COMMON]) == 0, \
        capsys.readouterr().err
    again = pq.read_table(out2 / "decisions.parquet")
    first = pq.read_table(out / "decisions.parquet")
    assert again.num_rows == first.num_rows - first.column("action").to_pylist().count("drop")
    if layout == "mapped-csv":
        header = (out / cleaned).read_text().splitlines()[0].split(",")
        assert header[:4] == ["uid", "filepath", "alt", "source"] or {"uid", "filepath", "alt"} <= set(header)
        assert "otcclip_action" in header
