"""``otcclip sanitize --model NAME --pretrained PATH``: same decisions as the same weights as --checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch

from otcclip.cli import main
from otcclip.models.checkpoint import load_checkpoint, save_checkpoint
from otcclip.models.factory import load_pretrained, register_shipped_configs
from tests.models.test_sanitize import make_manifest

COMMON = ["--k", "4", "--batch-size", "8", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    register_shipped_configs()
    torch.manual_seed(9)
    model = open_clip.create_model("otc-micro")
    path = tmp_path_factory.mktemp("w") / "micro.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_pretrained_path_round_trip(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    man = make_manifest(tmp_path / "data")
    rc = main(["sanitize", str(man), "--model", "otc-micro", "--pretrained", str(weights), "--out", str(tmp_path / "a"), *COMMON])
    assert rc == 0, capsys.readouterr().err
    ckpt = save_checkpoint(load_pretrained("otc-micro", weights), tmp_path / "ckpt")
    assert load_checkpoint(ckpt).name == "otc-micro"
    rc = main(["sanitize", str(man), "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), *COMMON])
    assert rc == 0, capsys.readouterr().err
    a, b = (pq.read_table(tmp_path / d / "decisions.parquet") for d in ("a", "b"))
    assert a.num_rows == 24 and a.column_names == b.column_names
    for name in a.column_names:  # NaN in the same places counts as equal
        assert [_nan(v) for v in a.column(name).to_pylist()] == [_nan(v) for v in b.column(name).to_pylist()], name


def _nan(v: object) -> object:
    return "nan" if isinstance(v, float) and math.isnan(v) else v


def test_cli_refuses_bad_models(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    man = make_manifest(tmp_path / "data", n=6)
    out = ["--out", str(tmp_path / "out")]

    def err(*argv: str) -> str:
        assert main(["sanitize", str(man), *argv, *out, *COMMON]) == 2
        return capsys.readouterr().err

    assert "either --checkpoint" in err()
    assert "either --checkpoint" in err("--checkpoint", str(tmp_path), "--model", "otc-micro")
    assert "unknown model 'ViT-Q-99'" in err("--model", "ViT-Q-99", "--pretrained", str(weights))
    assert "pretrained weights are required" in err("--model", "otc-micro")
    assert "neither a known tag" in err("--model", "otc-micro", "--pretrained", str(tmp_path / "none.pt"))
    msg = err("--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k")  # not cached, HF_HUB_OFFLINE=1
    assert "'ViT-B-32'" in msg and "'laion2b_s34b_b79k'" in msg and "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" in msg
    assert not (tmp_path / "out").exists()
